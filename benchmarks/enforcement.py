"""Enforcement on real processes: memory reaction time, compute share error, agent CPU.

Everything is measured from outside the agent: process death by polling /proc, CPU shares
from /proc/<pid>/stat (utime + stime), the agent's own CPU the same way.

- memory: a child in a 512 MiB slice crosses to 600 MiB in one fast memset; reaction =
  from just before the crossing to the child's death (``memory_action = "term"``).
- compute: two busy loops in 30 % and 70 % slices on one card (work-conserving), then one
  busy loop alone in a 30 % slice with ``hard``; per-second shares show convergence.
- agent CPU: 8 mock cards x 10 slices, each slice with one sleeping (or, one per card,
  lightly busy) process; the agent's CPU over ``--cpu-seconds``, next to the same agent
  with no slices (the mock backend's own sampling cost).

On a shared host, other sessions' load starves busy loops whatever the agent does; as root
the run raises this session's autogroup weight (restored at the end), as the tests do.

Run: ``python -m benchmarks.enforcement [--trials 12] [--window 10] [--cpu-seconds 30]
[--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.harness import PY, REPO, AgentProcess, agent_env

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY = (
    "import os, time\n"
    "print(os.getpid(), flush=True)\n"
    "end = time.monotonic() + 600\n"
    "while time.monotonic() < end: pass\n"
)
HOG = (
    "import os, random, time\n"
    "print(os.getpid(), flush=True)\n"
    "base = bytearray(450 * 1024 * 1024)\n"
    "for i in range(0, len(base), 4096): base[i] = 1\n"
    "time.sleep(random.uniform(0, 0.5))  # a random phase against the 500 ms sampler\n"
    "print(time.time(), flush=True)\n"
    "top = b'\\x01' * (150 * 1024 * 1024)\n"
    "print(time.time(), flush=True)\n"
    "time.sleep(60)\n"
)
LIGHT = "while :; do i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 0.1; done"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


@contextlib.contextmanager
def boosted() -> Iterator[bool]:
    path = Path("/proc/self/autogroup")
    try:
        before = path.read_text().split("nice")[1].strip()
        path.write_text("-15")
    except (OSError, IndexError):
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            path.write_text(before)


@contextlib.contextmanager
def agent_running(config: str = "", cards: int = 4) -> Iterator[AgentProcess]:
    devices = f'[{{ model = "MockA100-80G", memory_mib = 81920, count = {cards} }}]'
    agent = AgentProcess(config=config, mock_devices=devices).start()
    try:
        yield agent
    finally:
        agent.cleanup()


@contextlib.contextmanager
def xpuctl_run(agent: AgentProcess, *args: str, code: str) -> Iterator[subprocess.Popen[bytes]]:
    env = agent_env()
    env["PYTHONPATH"] = str(REPO)
    cmd = [PY, "-m", "agent.cli.xpuctl", "--socket", str(agent.socket), "run", *args]
    run = subprocess.Popen([*cmd, "--", PY, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        yield run
    finally:
        if run.poll() is None:
            run.terminate()
            try:
                run.wait(10)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        if run.stdout is not None:
            run.stdout.close()


def memory_reaction(trials: int) -> dict[str, Any]:
    reactions: list[float] = []
    with agent_running('[enforcement]\nmemory_action = "term"\n') as agent:
        for _ in range(trials):
            with xpuctl_run(agent, "--memory", "512MiB", "--compute", "10", code=HOG) as run:
                assert run.stdout is not None
                pid = int(run.stdout.readline())
                crossing = float(run.stdout.readline())
                while state(pid) not in ("Z", "X"):
                    time.sleep(0.002)
                reactions.append(time.time() - crossing)
                run.wait(10)
    return {
        "trials": trials,
        "interval_ms": 500,
        "mean_s": round(statistics.fmean(reactions), 3),
        "max_s": round(max(reactions), 3),
        "min_s": round(min(reactions), 3),
    }


def _series(pids: list[int], seconds: int) -> list[list[float]]:
    """Per-second CPU shares (percent of one core) of each pid."""
    rows = []
    last = [cpu_s(p) for p in pids]
    at = time.monotonic()
    for _ in range(seconds):
        time.sleep(1.0)
        now = time.monotonic()
        cur = [cpu_s(p) for p in pids]
        rows.append([round(100 * (c - b) / (now - at), 1) for c, b in zip(cur, last, strict=True)])
        last, at = cur, now
    return rows


def _share_stats(series: list[list[float]], targets: list[int], settle_s: int) -> dict[str, Any]:
    window = series[settle_s:]
    means = [statistics.fmean(r[i] for r in window) for i in range(len(targets))]
    spread = [round(max(abs(r[i] - targets[i]) for r in window), 1) for i in range(len(targets))]
    return {
        "targets_pct": targets,
        "achieved_pct": [round(m, 1) for m in means],
        "error_pp": [round(m - t, 1) for m, t in zip(means, targets, strict=True)],
        "worst_1s_error_pp": spread,
        "per_second": series,
    }


def compute_shares(window_s: int, settle_s: int = 3, cgroup_root: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    with agent_running() as agent:
        base = ("--memory", "256MiB", "--device", "mock-0")
        with (
            xpuctl_run(agent, *base, "--compute", "30", code=BUSY) as low,
            xpuctl_run(agent, *base, "--compute", "70", code=BUSY) as high,
        ):
            assert low.stdout is not None
            assert high.stdout is not None
            pids = [int(low.stdout.readline()), int(high.stdout.readline())]
            assert agent.proc is not None
            agent_before = cpu_s(agent.proc.pid)
            series = _series(pids, settle_s + window_s)
            agent_cpu = 100 * (cpu_s(agent.proc.pid) - agent_before) / (settle_s + window_s)
            out["two_slices_work_conserving"] = _share_stats(series, [30, 70], settle_s)
            out["two_slices_work_conserving"]["agent_cpu_pct"] = round(agent_cpu, 1)
    alone = ("--memory", "256MiB", "--compute", "30")
    with (
        agent_running('[enforcement]\ncompute_policy = "hard"\n') as agent,
        xpuctl_run(agent, *alone, code=BUSY) as run,
    ):
        assert run.stdout is not None
        series = _series([int(run.stdout.readline())], settle_s + window_s)
        out["alone_hard"] = _share_stats(series, [30], settle_s)
    if cgroup_root:
        config = f'[enforcement]\ncgroup_root = "{cgroup_root}"\n'
        base = ("--memory", "256MiB", "--device", "mock-0")
        with (
            agent_running(config) as agent,
            xpuctl_run(agent, *base, "--compute", "30", code=BUSY) as low,
            xpuctl_run(agent, *base, "--compute", "70", code=BUSY) as high,
        ):
            assert low.stdout is not None
            assert high.stdout is not None
            pids = [int(low.stdout.readline()), int(high.stdout.readline())]
            series = _series(pids, settle_s + window_s)
            out["two_slices_cgroup_freezer"] = _share_stats(series, [30, 70], settle_s)
    with agent_running() as agent, xpuctl_run(agent, *alone, code=BUSY) as run:
        assert run.stdout is not None
        series = _series([int(run.stdout.readline())], 2 + 4)
        out["alone_work_conserving"] = {
            "quota_pct": 30,
            "achieved_pct": round(statistics.fmean(r[0] for r in series[2:]), 1),
        }
    return out


def _agent_cpu(agent: AgentProcess, seconds: float) -> float:
    assert agent.proc is not None
    before = cpu_s(agent.proc.pid)
    time.sleep(seconds)
    return round(100 * (cpu_s(agent.proc.pid) - before) / seconds, 2)


def agent_cpu(seconds: float, cards: int = 8, per_card: int = 10) -> dict[str, Any]:
    with agent_running(cards=cards) as agent:
        idle = _agent_cpu(agent, min(seconds, 10.0))
        children: list[subprocess.Popen[bytes]] = []
        try:
            for card in range(cards):
                for n in range(per_card):
                    status, created, _ = agent.api(
                        "POST",
                        "/v1/slices",
                        {"memory_mib": 1024, "compute_pct": 10, "device": f"mock-{card}"},
                    )
                    assert status == 201, created
                    cmd = ["sh", "-c", LIGHT] if n == 0 else ["sleep", "600"]
                    child = subprocess.Popen(cmd)
                    children.append(child)
                    status, bound, _ = agent.api(
                        "POST", f"/v1/slices/{created['id']}/processes", {"pid": child.pid}
                    )
                    assert status in (200, 201), bound
            time.sleep(2.0)  # let the first samples settle
            loaded = _agent_cpu(agent, seconds)
        finally:
            for child in children:
                child.kill()
            for child in children:
                child.wait()
    return {
        "cards": cards,
        "slices": cards * per_card,
        "processes": len(children),
        "seconds": seconds,
        "agent_cpu_pct_no_slices": idle,
        "agent_cpu_pct": loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.enforcement", description=__doc__)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--window", type=int, default=10, help="compute window, seconds")
    parser.add_argument("--cpu-seconds", type=float, default=30.0)
    parser.add_argument(
        "--cgroup-root", default="", help="also measure with this delegated cgroup v2 dir"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with boosted() as boost:
        result = {
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "load_1m_at_start": round(os.getloadavg()[0], 2),
                "session_boosted": boost,
            },
            "memory_reaction": memory_reaction(args.trials),
            "compute": compute_shares(args.window, cgroup_root=args.cgroup_root),
            "agent_cpu": agent_cpu(args.cpu_seconds),
        }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        mem = result["memory_reaction"]
        print(f"memory reaction: mean {mem['mean_s']}s, max {mem['max_s']}s ({mem['trials']})")
        for name, stats in result["compute"].items():
            print(f"{name}: {stats.get('achieved_pct')} (targets {stats.get('targets_pct')})")
        cpu = result["agent_cpu"]
        print(
            f"agent CPU, {cpu['slices']} slices on {cpu['cards']} cards: "
            f"{cpu['agent_cpu_pct']}% (no slices: {cpu['agent_cpu_pct_no_slices']}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
