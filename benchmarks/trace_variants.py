"""Trace variants for checking that placement generalises: built from the default pods file
the way the upstream README and the FGD paper (§6.5) describe theirs, with our own seeds.

    python -m benchmarks.trace_variants --nodes NODES.csv --pods DEFAULT.csv --out DIR \\
        [--seed 1] [--gpuspec 10,20,25,33] [--cpu 50,100,200,250]

* ``gpuspecNN``: NN % of the GPU tasks (chosen at random) may run only on named GPU models.
  Each constrained task gets one of the model groups below, drawn in proportion to the GPUs
  of that group that could hold the task at all (a node of the group with enough cards, CPU
  and memory), so constrained demand follows supply, as in production.
* ``cpuNNN``: the CPU-only tasks are redrawn (with replacement, from the default's own) until
  their CPU request is NNN % of the default's CPU-only request; GPU tasks are unchanged.

The files have the default's columns; names say ``seed`` so that variants built with
another seed never pass for the ones a result was tuned on.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Sequence
from pathlib import Path

from benchmarks.placement_sim import NodeSpec, load_nodes

#: Model groups a constrained task may ask for (``|``-separated, as in ``gpu_spec``).
GROUPS: tuple[tuple[str, ...], ...] = (
    ("V100M16", "V100M32"),
    ("V100M32",),
    ("P100",),
    ("T4",),
    ("A10",),
    ("G2",),
    ("G3",),
    ("G2", "G3"),
)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or ()), list(reader)


def _write(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({**row, "name": f"openb-pod-{i:04d}"})


def _holders(row: dict[str, str], nodes: Sequence[NodeSpec], group: tuple[str, ...]) -> int:
    """GPUs of ``group`` on nodes that could hold the task."""
    gpus, cpu, mem = int(row["num_gpu"]), int(row["cpu_milli"]), int(row["memory_mib"])
    return sum(
        n.gpus
        for n in nodes
        if n.model in group and n.gpus >= gpus and n.cpu_milli >= cpu and n.memory_mib >= mem
    )


def gpuspec(
    rows: Sequence[dict[str, str]], nodes: Sequence[NodeSpec], pct: int, seed: int
) -> list[dict[str, str]]:
    rng = random.Random(f"gpuspec-{pct}-{seed}")
    out = [dict(r) for r in rows]
    gpu_rows = [r for r in out if int(r["num_gpu"]) > 0 and int(r["gpu_milli"]) > 0]
    for row in rng.sample(gpu_rows, round(len(gpu_rows) * pct / 100)):
        weights = [_holders(row, nodes, g) for g in GROUPS]
        if sum(weights) > 0:
            row["gpu_spec"] = "|".join(rng.choices(GROUPS, weights)[0])
    return out


def cpu_heavy(rows: Sequence[dict[str, str]], pct: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"cpu-{pct}-{seed}")

    def uses_gpu(r: dict[str, str]) -> bool:
        return int(r["num_gpu"]) > 0 and int(r["gpu_milli"]) > 0

    gpu = [dict(r) for r in rows if uses_gpu(r)]
    cpu_only = [dict(r) for r in rows if not uses_gpu(r)]
    target = sum(int(r["cpu_milli"]) for r in cpu_only) * pct / 100
    drawn: list[dict[str, str]] = []
    total = 0
    while cpu_only and total < target:
        row = dict(rng.choice(cpu_only))
        drawn.append(row)
        total += int(row["cpu_milli"])
    mixed = gpu + drawn
    rng.shuffle(mixed)
    return mixed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trace_variants", description=__doc__
    )
    parser.add_argument("--nodes", type=Path, required=True)
    parser.add_argument("--pods", type=Path, required=True, help="the default pods file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gpuspec", default="10,20,25,33")
    parser.add_argument("--cpu", default="50,100,200,250")
    args = parser.parse_args(argv)
    nodes = load_nodes(args.nodes)
    fields, rows = _rows(args.pods)
    args.out.mkdir(parents=True, exist_ok=True)
    for pct in (int(p) for p in args.gpuspec.split(",") if p):
        path = args.out / f"openb_pod_list_gpuspec{pct:02d}-seed{args.seed}.csv"
        _write(path, fields, gpuspec(rows, nodes, pct, args.seed))
        print(path)
    for pct in (int(p) for p in args.cpu.split(",") if p):
        path = args.out / f"openb_pod_list_cpu{pct:03d}-seed{args.seed}.csv"
        _write(path, fields, cpu_heavy(rows, pct, args.seed))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
