"""Helpers shared by the enforcement tests: real ``xpuctl run`` children, CPU shares and
process states read from /proc (never from the agent), and a CPU-priority fixture."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PY, REPO, AgentProcess, agent_env, json_out, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")

BUSY = (
    "import os, time\n"
    "print(os.getpid(), flush=True)\n"
    "end = time.monotonic() + 60\n"
    "while time.monotonic() < end: pass\n"
)
SLEEP = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"


def holding(mib: int) -> str:
    """A child that prints its pid, then the time just before it crosses to ``mib`` MiB
    resident (the last 150 MiB arrive in one fast memset), then the time after."""
    return (
        "import os, time\n"
        "print(os.getpid(), flush=True)\n"
        f"base = bytearray({max(0, mib - 150)} * 1024 * 1024)\n"
        "for i in range(0, len(base), 4096): base[i] = 1\n"
        "print(time.time(), flush=True)\n"
        "top = b'\\x01' * (150 * 1024 * 1024)\n"
        "print(time.time(), flush=True)\n"
        "time.sleep(60)\n"
    )


def gone(pid: int) -> bool:
    try:
        return proc_state(pid) in ("Z", "X")
    except FileNotFoundError:
        return True


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` from /proc, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def shares(pids: list[int], window_s: float) -> list[float]:
    """Each process's CPU share of one core over ``window_s``, in percent."""
    before = [cpu_s(p) for p in pids]
    started = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - started
    return [100 * (cpu_s(p) - b) / elapsed for p, b in zip(pids, before, strict=True)]


@pytest.fixture
def cpu_priority() -> Iterator[None]:
    """These tests measure our duty cycle, not the host: on a shared host, other sessions'
    load (the kernel shares CPU between sessions' autogroups) would starve the busy loops
    whatever the agent does. As root, give this session's autogroup more weight for the
    test and restore it after; elsewhere this is a no-op."""
    path = Path("/proc/self/autogroup")
    try:
        before = path.read_text().split("nice")[1].strip()
        path.write_text("-15")
    except (OSError, IndexError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.write_text(before)


@contextlib.contextmanager
def running(agent: AgentProcess, *args: str, code: str) -> Iterator[tuple[Any, int]]:
    """``xpuctl run ARGS -- python -c CODE``; yields (the xpuctl process, the child's pid).
    On exit xpuctl gets SIGTERM (forwarded to the child; xpuctl then frees the slice)."""
    env = agent_env()
    env["PYTHONPATH"] = str(REPO)
    cmd = [PY, "-m", "agent.cli.xpuctl", "--socket", str(agent.socket), "run", *args]
    run = subprocess.Popen(
        [*cmd, "--", PY, "-c", code], stdout=subprocess.PIPE, env=env, cwd="/tmp"
    )
    try:
        assert run.stdout is not None
        line = run.stdout.readline()
        assert line, f"xpuctl run printed nothing (exit {run.wait()})"
        yield run, int(line)
    finally:
        if run.poll() is None:
            run.terminate()
            try:
                run.wait(10)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        assert run.stdout is not None
        run.stdout.close()


def events(agent: AgentProcess, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json_out(agent.xpuctl("--json", "events", "--limit", "500"))
    return [e for e in found if e["kind"] == kind]


def slice_usage(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {s["id"]: s["usage"] or {} for s in json_out(agent.xpuctl("--json", "slices"))}


def reconfigure(agent: AgentProcess, old: str, new: str) -> None:
    """Edit the agent's config file and reload it (SIGHUP), as an operator would."""
    text = agent.config_path.read_text()
    assert old in text
    agent.config_path.write_text(text.replace(old, new))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in agent.log(), 5)


def finish(*children: subprocess.Popen[bytes]) -> None:
    """Kill (if need be), reap and close each child."""
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
