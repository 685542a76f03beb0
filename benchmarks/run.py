"""``make bench`` (quick set) and ``make bench-full`` (everything).

Each benchmark is its own module with its own CLI (see docs/benchmarks.md); this runs them
one after another and writes their JSON to ``bench-results/``. The placement benchmark
needs the public trace: ``--data DIR`` (default ``../shared/data/alibaba-gpu-v2023``);
without it that part is skipped with a message.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("bench-results")
DEFAULT_DATA = Path("../shared/data/alibaba-gpu-v2023")


def _placement(data: Path, full: bool) -> list[tuple[str, list[str]]]:
    nodes = data / "openb_node_list_gpu_node.csv"
    if not nodes.exists():
        print(f"placement: skipped, no trace at {data} (pass --data DIR)", file=sys.stderr)
        return []
    pods = (
        sorted(data.glob("openb_pod_list_*.csv")) if full else [data / "openb_pod_list_default.csv"]
    )
    policies = ["agent", "fgd", "best-fit"] if full else ["agent"]
    seeds = "42-51" if full else "42-44"
    runs = [
        (
            "place-latency",
            [
                "benchmarks.place_latency",
                "--nodes",
                str(nodes),
                "--pods",
                str(data / "openb_pod_list_default.csv"),
                "--requests",
                "2000" if full else "300",
                "--json",
            ],
        )
    ]
    for pod_file in pods:
        for policy in policies:
            name = f"placement-{pod_file.stem.removeprefix('openb_pod_list_')}-{policy}"
            runs.append(
                (
                    name,
                    [
                        "benchmarks.placement",
                        "--nodes",
                        str(nodes),
                        "--pods",
                        str(pod_file),
                        "--policy",
                        policy,
                        "--seeds",
                        seeds,
                        "--json",
                    ],
                )
            )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick set (default)")
    mode.add_argument("--full", action="store_true", help="everything")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    full = bool(args.full)
    runs: list[tuple[str, list[str]]] = [
        (
            "api",
            [
                "benchmarks.api",
                "--seconds",
                "5" if full else "2",
                "--idle-seconds",
                "10" if full else "3",
                "--json",
            ],
        ),
        (
            "pool-scale",
            [
                "benchmarks.pool_scale",
                "--json",
                *(
                    ["--peers", "1000", "2000"]
                    if full
                    else ["--peers", "200", "--changes", "10", "--window", "12"]
                ),
            ],
        ),
        (
            "enforcement",
            [
                "benchmarks.enforcement",
                "--json",
                *([] if full else ["--trials", "4", "--window", "5", "--cpu-seconds", "10"]),
            ],
        ),
        ("startup", ["benchmarks.startup", "--json", "--runs", "40" if full else "15"]),
        *_placement(args.data, full),
    ]
    runs.append(
        (
            "run-pool",
            ["benchmarks.run_pool", "--json", "--rounds", "20" if full else "5"]
            + ([] if full else ["--reclaims", "3"]),
        )
    )
    if full:
        runs.append(("mqtt-latency", ["benchmarks.mqtt_latency", "--json"]))
        runs.append(("attack", ["benchmarks.attack", "--json"]))
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name, module_args in runs:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        with open(RESULTS / f"{name}.json", "w") as out:
            code = subprocess.run(
                [sys.executable, "-m", *module_args], stdout=out, check=False
            ).returncode
        print(
            f"   {'ok' if code == 0 else f'exit {code}'} in {time.monotonic() - started:.0f}s"
            f" -> {RESULTS / (name + '.json')}",
            flush=True,
        )
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
