"""What ``xpuctl run --pool`` costs over a plain ``ssh``, and how fast a lender's reclaim
ends the remote job.

Two real agents (a borrower with one 16 GiB mock card, a lender with one 80 GiB card), a
real Mosquitto and a real OpenSSH server on loopback (the tests' own, ``tests/sshd.py``).
Each round runs, side by side and in alternating order,

- ``ssh <the launcher's options> 127.0.0.1 -- echo first`` and
- ``xpuctl run --pool --memory 40GiB --compute 30 -- echo first`` (the installed
  ``xpuctl`` script, as a user runs it: place, borrow over MQTT, ssh, the lender's
  ``xpuctl run --slice`` binding before exec, the lease returned at the end),

timing each from its start to the first line of output on its stdout. Then, for the
reclaim, a ``run --pool -- sleep 120`` is started, and the lender allocates locally what
only fits once the lent slice is reclaimed; timed from that ``xpuctl alloc`` to the remote
job's pid being gone and to the borrower's ``xpuctl`` exiting (75).

Run: ``python -m benchmarks.run_pool [--rounds 10] [--json]`` (needs mosquitto, sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.broker import Mosquitto, mqtt_config, topic_root
from tests.harness import AgentProcess, agent_env, json_out, wait_for
from tests.sshd import Sshd

XPUCTL = str(Path(sys.executable).parent / "xpuctl")
SMALL = '[{ model = "MockA100-16G", memory_mib = 16384, count = 1 }]'
BIG = '[{ model = "MockA100-80G", memory_mib = 81920, count = 1 }]'


def _first_line_s(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    took = time.perf_counter() - started
    proc.stdout.close()
    proc.wait(30)
    if line.strip() != b"first" or proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} said {line!r}, exit {proc.returncode}")
    return took


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def measure(rounds: int, reclaims: int) -> dict[str, Any]:
    broker = Mosquitto().start()
    sshd = Sshd().start()
    agents: list[AgentProcess] = []
    try:
        root = topic_root()
        launcher = sshd.launcher()
        borrower_pool = f'launcher = {json.dumps(launcher)}\nremote_xpuctl = "{XPUCTL}"\n'
        a = AgentProcess(
            node="a", mock_devices=SMALL, config=mqtt_config(broker, root, "a", pool=borrower_pool)
        )
        b = AgentProcess(
            node="b",
            mock_devices=BIG,
            config=mqtt_config(broker, root, "b", node_extra='address = "127.0.0.1"'),
        )
        agents += [a, b]
        for agent in agents:
            agent.start()
        wait_for(
            lambda: [p["node"] for p in a.api("GET", "/v1/pool")[1] if p["placeable"]] == ["b"],
            10,
        )
        env = agent_env()
        plain = [w.replace("{address}", "127.0.0.1") for w in launcher] + ["--", "echo first"]
        run_pool = [XPUCTL, "--socket", str(a.socket), "run", "--pool", "--memory", "40GiB"]
        pool = [*run_pool, "--compute", "30", "--", "echo", "first"]
        ssh_s: list[float] = []
        pool_s: list[float] = []
        _first_line_s(pool, env)  # warm: the page cache, sshd's first key exchange
        for i in range(rounds):
            order = [(plain, ssh_s), (pool, pool_s)]
            for argv, into in order if i % 2 == 0 else order[::-1]:
                into.append(_first_line_s(argv, env))
        wait_for(lambda: [s for s in b.api("GET", "/v1/slices")[1] if s["borrower"]] == [], 5)

        job_end: list[float] = []
        exit_at: list[float] = []
        for _ in range(reclaims):
            run = subprocess.Popen(
                [*run_pool, "--compute", "50", "--", "sleep", "120"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
            lent = wait_for(
                lambda: next(
                    (s for s in b.api("GET", "/v1/slices")[1] if s["borrower"] and s["processes"]),
                    None,
                ),
                20,
            )
            pid = lent["processes"][0]["pid"]
            started = time.perf_counter()
            local = json_out(b.xpuctl("--json", "alloc", "--memory", "60GiB", "--compute", "60"))
            wait_for(lambda pid=pid: not _alive(pid), 10, interval_s=0.002)
            job_end.append(time.perf_counter() - started)
            run.wait(20)
            exit_at.append(time.perf_counter() - started)
            assert run.returncode == 75, run.stderr.read() if run.stderr else ""
            if run.stderr:
                run.stderr.close()
            b.xpuctl("free", local["id"]).check_returncode()
        ssh_summary, pool_summary = _summary(ssh_s), _summary(pool_s)
        return {
            "rounds": rounds,
            "ssh_first_line": ssh_summary,
            "run_pool_first_line": pool_summary,
            "overhead_median_ms": round(pool_summary["median_ms"] - ssh_summary["median_ms"], 1),
            "reclaims": reclaims,
            "reclaim_to_job_end": _summary(job_end),
            "reclaim_to_xpuctl_exit": _summary(exit_at),
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        }
    finally:
        for agent in agents:
            agent.cleanup()
        sshd.cleanup()
        broker.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reclaims", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.rounds, args.reclaims)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    s, p = result["ssh_first_line"], result["run_pool_first_line"]
    print(f"first line, {args.rounds} rounds (median / p90 / max ms):")
    print(f"  ssh            {s['median_ms']:7.1f} {s['p90_ms']:7.1f} {s['max_ms']:7.1f}")
    print(f"  xpuctl --pool  {p['median_ms']:7.1f} {p['p90_ms']:7.1f} {p['max_ms']:7.1f}")
    print(f"  overhead (median): {result['overhead_median_ms']:.1f} ms (goal <= 300 ms)")
    j, x = result["reclaim_to_job_end"], result["reclaim_to_xpuctl_exit"]
    print(f"reclaim by a local alloc, {args.reclaims} times (median / max ms):")
    print(f"  to the remote job's end   {j['median_ms']:7.1f} {j['max_ms']:7.1f}")
    print(f"  to the borrower's exit 75 {x['median_ms']:7.1f} {x['max_ms']:7.1f}")


if __name__ == "__main__":
    main()
