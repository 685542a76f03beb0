"""Placement benchmark on the Alibaba GPU-sharing trace (FGD paper protocol).

    python -m benchmarks.placement --nodes NODES.csv --pods PODS.csv --policy agent \\
        --seeds 42-51 --json

Per seed: shuffle the tasks, inflate with random draws to 130 % of the cluster's GPUs,
place them one at a time (a task that fits nowhere is dropped) and record allocated against
arrived GPU. Reports "unallocated GPU %" at 100 % arrival (mean and SD over seeds) and the
allocation curve. ``agent*`` policies place through the agent's own ``Placer`` (what the
core calls for every decision), which learns the request mix online; the others are the
paper's baselines (benchmarks.placement_baselines).
See docs/benchmarks.md for the protocol, the trace mapping and results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import placement
from benchmarks.placement_baselines import (
    BestFit,
    DotProduct,
    FragmentationGradientDescent,
    GpuClustering,
    GpuPacking,
    RandomFit,
    typical_mix,
)
from benchmarks.placement_sim import (
    MILLI,
    Cluster,
    Key,
    NodeSpec,
    Replay,
    Scorer,
    Task,
    allocation_curve,
    arrival_order,
    gpu_capacity,
    load_nodes,
    load_tasks,
    replay,
)

#: Nominal card memory: the trace states GPU *shares* only, so a card is given 1000 MiB and a
#: task of ``gpu_milli`` asks for that many MiB (memory and compute move together, as with
#: Alibaba's GPU sharing that isolates both by the same share).
CARD_MIB = MILLI
#: The trace sets no per-card limit on sharers; the smallest task is 5 %, so 100 never binds.
CARD_SLOTS = 100
#: Weights the CLI can change for ablations (``--<name>-weight``).
ABLATION_WEIGHTS = ("stranding", "lookahead", "scarcity", "host_fit")
#: How often (in tasks) the replay tells the placer what the pool has.
SUPPLY_EVERY = 50

AGENT_POLICIES: dict[str, placement.Policy] = {
    "agent": "fragmentation",
    "agent-best-fit": "best-fit",
    "agent-spread": "spread",
}
BASELINE_POLICIES = ("random", "dot-product", "gpu-clustering", "gpu-packing", "best-fit", "fgd")
POLICY_NAMES = (*BASELINE_POLICIES, *AGENT_POLICIES)


def to_request(task: Task) -> placement.Request:
    """A trace task as an agent request: a shared task is one card at ``gpu_milli``/10 %
    (and as many nominal MiB); whole-card tasks are ``num_gpu`` exclusive cards."""
    if task.gpu_total == 0:
        return placement.Request(
            placement.Demand(0, 0), count=0, cpu_milli=task.cpu_milli, memory_mib=task.memory_mib
        )
    if not task.shared:
        return placement.Request(
            placement.Demand(CARD_MIB, placement.FULL_PCT),
            count=task.num_gpu,
            exclusive=True,
            cpu_milli=task.cpu_milli,
            memory_mib=task.memory_mib,
            models=placement.parse_models(task.gpu_spec),
        )
    pct = math.ceil(task.gpu_milli / 10)
    return placement.Request(
        placement.Demand(pct * CARD_MIB // 100, pct),
        cpu_milli=task.cpu_milli,
        memory_mib=task.memory_mib,
        models=placement.parse_models(task.gpu_spec),
    )


def rounded(task: Task, step_pct: int) -> Task:
    """The task as the agent grants it: its share rounded up to ``step_pct`` (agent's
    ``round_up_compute``); 100 % becomes a whole card."""
    if not task.shared:
        return task
    pct = placement.round_up_compute(math.ceil(task.gpu_milli / 10), step_pct)
    return Task(task.cpu_milli, task.memory_mib, 1, pct * 10, task.gpu_spec)


def node_state(spec: NodeSpec, key: Key) -> placement.NodeState:
    """An engine node state as the agent's ``NodeState`` (card ids are positions)."""
    _, cpu, mem, cards, _ = key
    return placement.NodeState(
        id=spec.name,
        cards=tuple(
            placement.CardState(
                id=f"{i:02d}",
                memory_total_mib=CARD_MIB,
                memory_free_mib=free * CARD_MIB // MILLI,
                compute_free_pct=free // 10,
                slices=0 if free >= MILLI else 1,
                max_slices=CARD_SLOTS,
                model=spec.model,
                node=spec.name,
            )
            for i, free in enumerate(cards)
        ),
        cpu_free_milli=cpu,
        memory_free_mib=mem,
    )


def replay_agent(
    nodes: Sequence[NodeSpec],
    order: Sequence[Task],
    placer: placement.Placer,
    step_pct: int,
) -> Replay:
    """Place ``order`` one task at a time through the product's own :class:`Placer` — the
    object the agent's core calls: it observes every request as it arrives (the only
    history a live agent has), then ``rank_nodes`` over every node picks where it goes; a
    task that fits nowhere is dropped. ``Cluster`` charges the choice and refuses any
    over-commit, so a wrong answer from the placer fails loudly."""
    cluster = Cluster(nodes, track_affinity=False)
    states = [node_state(spec, cluster.key_of[i]) for i, spec in enumerate(cluster.specs)]
    index = {spec.name: i for i, spec in enumerate(cluster.specs)}
    arrived_total = allocated_total = placed = failed = 0
    arrived: list[int] = []
    allocated: list[int] = []
    placements: list[tuple[int, tuple[int, ...]] | None] = []
    for n, asked in enumerate(order):
        arrived_total += asked.gpu_total
        task = rounded(asked, step_pct)
        request = to_request(task)
        placer.observe(request)
        if n % SUPPLY_EVERY == 0:
            # The daemon tells its placer what the pool has on every ``place``; here it is
            # told every SUPPLY_EVERY tasks (a full count of 1,213 nodes costs ~1 ms).
            placer.set_supply(placement.supply_of(states))
        best = placer.rank_nodes(states, request, limit=1)
        if not best:
            failed += 1
            placements.append(None)
        else:
            i = index[best[0].node]
            positions = tuple(int(d) for d in best[0].devices)
            cluster.apply(i, task, positions)
            states[i] = node_state(cluster.specs[i], cluster.key_of[i])
            placements.append((i, positions))
            allocated_total += asked.gpu_total
            placed += 1
        arrived.append(arrived_total)
        allocated.append(allocated_total)
    return Replay(gpu_capacity(nodes), arrived, allocated, placed, failed, placements)


def make_scorer(policy: str, tasks: Sequence[Task]) -> Scorer:
    """A baseline behind its CLI name; FGD learns its typical pods from the pods file, as
    the paper's simulator does (the agent learns online instead: :func:`replay_agent`)."""
    scorers: dict[str, Scorer] = {
        "random": RandomFit(),
        "dot-product": DotProduct(),
        "gpu-clustering": GpuClustering(),
        "gpu-packing": GpuPacking(),
        "best-fit": BestFit(),
    }
    if policy == "fgd":
        return FragmentationGradientDescent(typical_mix(tasks))
    return scorers[policy]


@dataclass(frozen=True, slots=True)
class SeedResult:
    seed: int
    unallocated_pct: float
    curve: dict[int, float]
    tasks: int
    failed: int
    seconds: float


def run_seed(
    nodes: Sequence[NodeSpec],
    tasks: Sequence[Task],
    policy: str,
    seed: int,
    step_pct: int,
    weights: placement.Weights = placement.DEFAULT_WEIGHTS,
) -> SeedResult:
    """One replay. Baselines see the nodes in a per-seed random order (the simulator renames
    nodes at random and breaks score ties by that order); the agent sees them by id."""
    started = time.perf_counter()
    order = arrival_order(tasks, gpu_capacity(nodes), seed)
    node_order = sorted(nodes, key=lambda n: n.name)  # rank_nodes breaks ties by node id
    if policy not in AGENT_POLICIES:
        node_order = list(nodes)
        random.Random(f"nodes-{seed}").shuffle(node_order)
    if policy in AGENT_POLICIES:
        run = replay_agent(
            node_order, order, placement.Placer(AGENT_POLICIES[policy], weights), step_pct
        )
    else:
        run = replay(node_order, order, make_scorer(policy, tasks), seed)
    curve = allocation_curve(run)
    return SeedResult(
        seed=seed,
        unallocated_pct=round(100.0 - curve[100], 4),
        curve=curve,
        tasks=len(order),
        failed=run.failed,
        seconds=round(time.perf_counter() - started, 2),
    )


def _run_seed_args(
    args: tuple[list[NodeSpec], list[Task], str, int, int, placement.Weights],
) -> SeedResult:
    return run_seed(*args)


def benchmark(
    nodes_file: Path,
    pods_file: Path,
    policy: str,
    seeds: Sequence[int],
    step_pct: int = 1,
    jobs: int = 1,
    weights: placement.Weights = placement.DEFAULT_WEIGHTS,
) -> dict[str, Any]:
    """Run every seed (in ``jobs`` processes) and summarise as the CLI's JSON object."""
    started = time.perf_counter()
    nodes = load_nodes(nodes_file)
    tasks = load_tasks(pods_file)
    work = [(nodes, tasks, policy, s, step_pct, weights) for s in seeds]
    if jobs > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(seeds))) as pool:
            results = list(pool.map(_run_seed_args, work))
    else:
        results = [_run_seed_args(w) for w in work]
    values = [r.unallocated_pct for r in results]
    common = set.intersection(*(set(r.curve) for r in results)) if results else set()
    curve = [[p, round(statistics.mean(r.curve[p] for r in results), 3)] for p in sorted(common)]
    return {
        "policy": policy,
        "nodes_file": nodes_file.name,
        "pods_file": pods_file.name,
        "seeds": list(seeds),
        "round_step_pct": step_pct if policy in AGENT_POLICIES else None,
        "weights": dataclasses.asdict(weights) if policy in AGENT_POLICIES else None,
        "unallocated_pct_at_100": round(statistics.mean(values), 3),
        "unallocated_pct_sd": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "unallocated_pct_per_seed": values,
        "curve": curve,
        "tasks_per_seed": [r.tasks for r in results],
        "failed_tasks_per_seed": [r.failed for r in results],
        "seconds_per_seed": [r.seconds for r in results],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def parse_seeds(text: str) -> list[int]:
    """``42-51`` or ``42,43,50``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__)
    parser.add_argument(
        "--nodes", type=Path, required=True, help="node list CSV (sn,cpu_milli,...)"
    )
    parser.add_argument(
        "--pods", type=Path, required=True, help="pod list CSV (name,cpu_milli,...)"
    )
    parser.add_argument("--policy", choices=POLICY_NAMES, default="agent")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("42-51"))
    parser.add_argument(
        "--round-step", type=int, default=1, help="agent grant step in %% of a card (1 = exact)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    for name in ABLATION_WEIGHTS:
        parser.add_argument(
            f"--{name.replace('_', '-')}-weight",
            type=float,
            default=getattr(placement.DEFAULT_WEIGHTS, name),
            help=f"agent only, for ablations (placement.Weights.{name})",
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.round_step <= 100 or 100 % args.round_step:
        parser.error("--round-step must divide 100")
    weights = dataclasses.replace(
        placement.DEFAULT_WEIGHTS,
        **{name: getattr(args, f"{name}_weight") for name in ABLATION_WEIGHTS},
    )
    result = benchmark(
        args.nodes, args.pods, args.policy, args.seeds, args.round_step, args.jobs, weights
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['policy']} on {result['pods_file']}: unallocated GPU at 100 % arrival "
            f"{result['unallocated_pct_at_100']:.2f} % (sd {result['unallocated_pct_sd']:.2f}, "
            f"{len(result['seeds'])} seeds, {result['wall_seconds']:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
