"""The agent's own speed: socket API, alloc+free, xpuctl start-up, footprint.

Each number that has a floor is measured side by side in the same run:
- ``GET /v1/node`` on the real daemon vs a bare aiohttp handler on a Unix socket;
- ``xpuctl status`` wall time vs ``python3 -c pass``.

Run: ``python -m benchmarks.api [--seconds 5] [--concurrency 16] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.harness import AgentProcess

BARE_SERVER = """
import sys
from aiohttp import web
async def node(request):
    return web.json_response({"node": "bare", "capacity": {"memory_mib": 1}})
app = web.Application()
app.router.add_get("/v1/node", node)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
"""


async def _load(socket_path: str, seconds: float, concurrency: int, make: Any) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.UnixConnector(path=socket_path, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(n: int) -> None:
            nonlocal errors
            i = 0
            while time.monotonic() < deadline:
                i += 1
                start = time.perf_counter()
                ok = await make(session, f"{n}-{i}")
                latencies.append(time.perf_counter() - start)
                errors += 0 if ok else 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 3),
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 3),
        "errors": errors,
    }


async def _get_node(session: aiohttp.ClientSession, _: str) -> bool:
    async with session.get("http://agent/v1/node") as response:
        await response.read()
        return response.status == 200


async def _alloc_free(session: aiohttp.ClientSession, key: str) -> bool:
    body = {"memory_mib": 64, "compute_pct": 1, "request_id": key}
    async with session.post("http://agent/v1/slices", json=body) as response:
        created = await response.json()
        if response.status != 201:
            return False
    async with session.delete(f"http://agent/v1/slices/{created['id']}") as response:
        await response.read()
        return response.status == 200


def _wall(cmd: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run(seconds: float, concurrency: int, idle_s: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="xab", dir="/tmp"))
    agent = AgentProcess(
        work,
        config="[slicing]\nmax_slices_per_device = 1000\ncompute_step_pct = 1\n",
        mock_devices='[{ model = "MockA100-80G", memory_mib = 81920, count = 8 }]',
    )
    bare_path = str(work / "bare.sock")
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, bare_path])
    agent.start()
    try:
        while not os.path.exists(bare_path):
            time.sleep(0.05)
        assert agent.proc is not None
        pid = agent.proc.pid
        # Footprint first, while the agent is idle (sampling 8 mock cards every 500 ms).
        time.sleep(2)
        cpu0, t0 = _cpu_s(pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu_pct = 100 * (_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
        rss_mib = psutil.Process(pid).memory_info().rss / 2**20
        bare_node = asyncio.run(_load(bare_path, seconds, concurrency, _get_node))
        agent_node = asyncio.run(_load(str(agent.socket), seconds, concurrency, _get_node))
        pairs = asyncio.run(_load(str(agent.socket), seconds, concurrency, _alloc_free))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        python_pass = _wall([sys.executable, "-c", "pass"], 20)
        xpuctl_status = _wall(
            [sys.executable, "-m", "agent.cli.xpuctl", "--socket", str(agent.socket), "status"],
            20,
            env,
        )
        xpuctl_bin = Path(sys.executable).parent / "xpuctl"
        xpuctl_entry = (
            _wall([str(xpuctl_bin), "--socket", str(agent.socket), "status"], 20)
            if xpuctl_bin.exists()
            else None
        )
    finally:
        agent.cleanup()
        bare.terminate()
        bare.wait()
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "get_node": {
            "agent": agent_node,
            "bare_aiohttp": bare_node,
            "ratio": round(agent_node["per_s"] / bare_node["per_s"], 3),
        },
        "alloc_free_pairs": pairs,
        "xpuctl_status_s": round(xpuctl_status, 4),
        "xpuctl_entry_point_s": round(xpuctl_entry, 4) if xpuctl_entry else None,
        "python_pass_s": round(python_pass, 4),
        "xpuctl_ratio": round(xpuctl_status / python_pass, 2),
        "idle_cpu_pct": round(idle_cpu_pct, 2),
        "rss_mib": round(rss_mib, 1),
        "concurrency": concurrency,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.concurrency, args.idle_seconds)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
