"""``place`` over a pool the size of the Alibaba trace's cluster, in-process.

    python -m benchmarks.place_latency --nodes NODES.csv --pods PODS.csv \\
        [--arrival 0.9] [--requests 2000] [--json]

The pool is the trace's 1,213 GPU nodes, each a peer as the bus delivers it (``PeerCards``:
its cards and spare host CPU and memory), in the state the agent's own placement leaves
them after ``--arrival`` of the trace's tasks (seed 42). A real ``NodeService`` (mock cards,
a ledger in a temporary directory) that has seen those requests answers
``service.place(request, peers)`` — exactly what ``POST /v1/pool/place`` runs between
parsing the body and encoding the answer — for the next ``--requests`` one-card tasks of
the trace. Reported: per-request latency p50/p99/max, and the first call (cold caches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import placement
from agent.config import from_mapping
from agent.core.events import EventHub
from agent.core.inventory import Inventory
from agent.core.pool import PeerCards, PeerDevice
from agent.core.service import NodeService
from agent.ledger.store import Ledger
from agent.model import SliceRequest
from benchmarks.placement import CARD_MIB, node_state, replay_agent, to_request
from benchmarks.placement_sim import (
    MILLI,
    Cluster,
    Task,
    arrival_order,
    gpu_capacity,
    load_nodes,
    load_tasks,
)


def _peers(cluster: Cluster) -> list[PeerCards]:
    peers = []
    for i, spec in enumerate(cluster.specs):
        cards = cluster.cards[i]
        peers.append(
            PeerCards(
                node=spec.name,
                devices=tuple(
                    PeerDevice(
                        id=f"{j:02d}",
                        model=spec.model,
                        vendor="mock",
                        health="ok",
                        memory_total_mib=CARD_MIB,
                        memory_free_mib=free * CARD_MIB // MILLI,
                        compute_free_pct=free // 10,
                        slices=0 if free >= MILLI else 1,
                        max_slices=100,
                    )
                    for j, free in enumerate(cards)
                ),
                cpu_free_milli=cluster.cpu[i],
                host_memory_free_mib=cluster.mem[i],
            )
        )
    return peers


def _request(task: Task) -> SliceRequest:
    return SliceRequest(
        memory_mib=max(1, task.gpu_milli * CARD_MIB // MILLI),
        compute_pct=max(1, math.ceil(task.gpu_milli / 10)),
        owner_uid=os.getuid(),
        models=placement.parse_models(task.gpu_spec),
        cpu_milli=task.cpu_milli,
        host_memory_mib=task.memory_mib,
    )


async def _measure(
    peers: Sequence[PeerCards], seen: Sequence[Task], asks: Sequence[Task]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = from_mapping(
            {
                "version": 1,
                "node": {"name": "bench-local"},
                "paths": {"state_dir": tmp, "runtime_dir": tmp},
                "slicing": {"compute_step_pct": 1, "max_slices_per_device": 100},
                "backends": {"enabled": ["mock"]},
            }
        )
        from agent.backends.mock import MockBackend  # noqa: PLC0415

        inventory = Inventory([MockBackend([])])
        await inventory.discover()
        service = NodeService(config, inventory, Ledger(Path(tmp) / "l.sqlite"), EventHub())
        await service.open()
        try:
            for task in seen:
                service.placer.observe(to_request(task))
            times = []
            for task in asks:
                started = time.perf_counter()
                service.place(_request(task), peers, limit=10)
                times.append(time.perf_counter() - started)
        finally:
            await service.close()
    first, rest = times[0], sorted(times[1:])
    return {
        "first_ms": round(first * 1000, 2),
        "p50_ms": round(statistics.median(rest) * 1000, 3),
        "p99_ms": round(rest[int(0.99 * (len(rest) - 1))] * 1000, 3),
        "max_ms": round(rest[-1] * 1000, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.place_latency", description=__doc__)
    parser.add_argument("--nodes", type=Path, required=True)
    parser.add_argument("--pods", type=Path, required=True)
    parser.add_argument(
        "--arrival", type=float, default=0.9, help="share of the trace placed first"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    nodes = sorted(load_nodes(args.nodes), key=lambda n: n.name)
    tasks = load_tasks(args.pods)
    order = arrival_order(tasks, gpu_capacity(nodes), seed=42)
    target = args.arrival * gpu_capacity(nodes)
    total, cut = 0, len(order)
    for i, task in enumerate(order):
        total += task.gpu_total
        if total > target:
            cut = i
            break
    seen = order[:cut]
    replay = replay_agent(nodes, seen, placement.Placer(), 1)
    cluster = Cluster(nodes, track_affinity=False)
    for task, where in zip(seen, replay.placements, strict=True):
        if where is not None:
            cluster.apply(where[0], task, where[1])
    assert all(node_state(s, cluster.key_of[i]) for i, s in enumerate(cluster.specs))
    asks = [t for t in order[cut:] if t.shared][: args.requests]
    result = asyncio.run(_measure(_peers(cluster), seen, asks))
    result |= {
        "nodes": len(nodes),
        "arrival": args.arrival,
        "requests": len(asks),
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"place over {len(nodes)} nodes at {args.arrival:.0%} arrival: p50 "
            f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
            f"(first {result['first_ms']} ms; {len(asks)} requests)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
