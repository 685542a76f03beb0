"""Mock semantics on real processes (DESIGN.md §5)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import psutil

from agent.backends.mock import MockBackend
from tests.harness import AgentProcess, spawn, wait_for

HOLD_300_MIB = (
    "import time\n"
    "block = bytearray(300 * 1024 * 1024)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def stop(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait()
    if child.stdout is not None:
        child.stdout.close()


BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


async def test_rss_is_card_memory_for_env_named_process() -> None:
    backend = MockBackend([("M", 1024)] * 2)
    child = spawn(HOLD_300_MIB, env={"XPU_DEVICE": "mock-1"}, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        samples = {s.device_id: s for s in await backend.sample({})}
        assert child.pid not in {p.pid for p in samples["mock-0"].processes}
        procs = {p.pid: p for p in samples["mock-1"].processes}
        assert child.pid in procs
        assert 290 <= (procs[child.pid].memory_mib or 0) <= 340
        assert (samples["mock-1"].memory_used_mib or 0) >= 290
    finally:
        stop(child)


async def test_busy_loop_shows_about_100_percent() -> None:
    backend = MockBackend([("M", 1024)])
    child = spawn(BUSY)
    try:
        bound = {"mock-0": frozenset({child.pid})}
        proc = psutil.Process(child.pid)
        await asyncio.sleep(0.3)
        await backend.sample(bound)
        before, t0 = proc.cpu_times(), time.monotonic()
        await asyncio.sleep(1.0)
        sample = (await backend.sample(bound))[0]
        after, t1 = proc.cpu_times(), time.monotonic()
        util = {p.pid: p.utilisation_pct for p in sample.processes}[child.pid]
        # Ground truth from /proc over the same window (on an idle machine: ~100 %).
        truth = 100 * ((after.user + after.system) - (before.user + before.system)) / (t1 - t0)
        assert truth > 40, f"the child did not get the CPU ({truth:.0f} %)"
        assert util is not None and abs(util - truth) < 12, (util, truth)
    finally:
        stop(child)


def test_daemon_reports_process_memory_on_its_card(agent: AgentProcess) -> None:
    child = spawn(HOLD_300_MIB, env={"XPU_DEVICE": "mock-2"}, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"

        def used() -> float:
            # A sample taken while the child was still touching its pages (before "ready"
            # was read) shows less: wait for one of the whole block.
            _, device, _ = agent.api("GET", "/v1/devices/mock-2")
            value: float = device["memory_used_mib"] or 0.0
            return value if value >= 290 else 0.0

        assert wait_for(used, 10) <= 340
        _, device, _ = agent.api("GET", "/v1/devices/mock-2")
        assert child.pid in device["unsliced_pids"]
    finally:
        stop(child)
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == "zombie"
