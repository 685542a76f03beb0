"""Trace loading, the published arrival protocol and the replay engine of the placement benchmark.

The engine is policy-agnostic: a :class:`Scorer` says what placing a task on a node *state*
costs (lower is better). Nodes in the same state (same type, free CPU, free memory, free
share of every card) cost the same, so the engine scores each distinct state once per task
shape and caches it; that is what makes a 1,213-node, 10,000-task replay take seconds in
pure Python.
"""

from __future__ import annotations

import bisect
import csv
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

MILLI = 1000  # one whole card in the trace's units

#: Node state: (node type index, free CPU milli, free memory MiB, free milli-GPU of every card in
#: descending order, GPU-affinity tags of the tasks on it (only for policies that need them)).
Key = tuple[int, int, int, tuple[int, ...], frozenset[str]]
#: (cost, card positions within the key's card tuple); lower cost wins.
Choice = tuple[float, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str


@dataclass(frozen=True, slots=True)
class Task:
    """One trace row: ``num_gpu`` cards of ``gpu_milli`` each (below 1000 only for one card)."""

    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: frozenset[str] = frozenset()

    @property
    def gpu_total(self) -> int:
        return self.num_gpu * self.gpu_milli

    @property
    def shared(self) -> bool:
        return self.num_gpu == 1 and 0 < self.gpu_milli < MILLI

    @property
    def affinity(self) -> str:
        """GPU-affinity tag (GPU clustering groups tasks by it)."""
        if self.num_gpu == 0 or self.gpu_milli == 0:
            return "no-gpu"
        return "share-gpu" if self.shared else f"{self.num_gpu}-gpu"


def load_nodes(path: Path) -> list[NodeSpec]:
    with path.open(newline="") as fh:
        return [
            NodeSpec(
                name=row["sn"],
                cpu_milli=int(row["cpu_milli"]),
                memory_mib=int(row["memory_mib"]),
                gpus=int(row["gpu"]),
                model=row.get("model", "") or "",
            )
            for row in csv.DictReader(fh)
        ]


def load_tasks(path: Path) -> list[Task]:
    with path.open(newline="") as fh:
        tasks = []
        for row in csv.DictReader(fh):
            num_gpu = int(row["num_gpu"])
            milli = int(row["gpu_milli"]) if num_gpu else 0
            spec = row.get("gpu_spec") or ""
            tasks.append(
                Task(
                    cpu_milli=int(row["cpu_milli"]),
                    memory_mib=int(row["memory_mib"]),
                    num_gpu=num_gpu if milli else 0,
                    gpu_milli=milli,
                    gpu_spec=frozenset(s for s in spec.split("|") if s),
                )
            )
        return tasks


def gpu_capacity(nodes: Iterable[NodeSpec]) -> int:
    return sum(n.gpus for n in nodes) * MILLI


def arrival_order(
    tasks: Sequence[Task], capacity_milli: int, seed: int, ratio: float = 1.3
) -> list[Task]:
    """The published protocol: shuffle, then draw with replacement until the GPU request would
    pass ``ratio`` x capacity. A file that already asks for more is cut at that point, which
    for a shuffled list is the same as the simulator's random removal."""
    rng = random.Random(seed)
    order = list(tasks)
    rng.shuffle(order)
    target = ratio * capacity_milli
    total = 0
    for i, task in enumerate(order):
        if total + task.gpu_total > target:
            return order[:i]
        total += task.gpu_total
    while True:
        task = tasks[rng.randrange(len(tasks))]
        if total + task.gpu_total > target:
            return order
        order.append(task)
        total += task.gpu_total


class Scorer(Protocol):
    """A placement policy as the engine sees it."""

    name: str
    #: Break equal costs uniformly at random, as the Kubernetes scheduler does; otherwise the
    #: lowest node index wins (the agent's ``rank_nodes`` order).
    random_ties: bool
    #: Pick the card of a shared task at random among the returned positions.
    random_card: bool
    #: Whether keys carry the GPU-affinity tags of the node's tasks.
    track_affinity: bool

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None: ...


def candidate_cards(spec: NodeSpec, key: Key, task: Task) -> tuple[int, ...] | None:
    """Positions a task may use on a node state, or None if CPU, memory, model or cards say no.

    Shared task: every card with enough free share. Whole-card task: the first ``num_gpu``
    fully free cards (they lead the descending tuple). CPU-only task: ().
    """
    _, cpu, mem, cards, _ = key
    if cpu < task.cpu_milli or mem < task.memory_mib:
        return None
    if task.gpu_total == 0:
        return ()
    if not cards or (task.gpu_spec and spec.model not in task.gpu_spec):
        return None
    if task.shared:
        fit = tuple(i for i, free in enumerate(cards) if free >= task.gpu_milli)
        return fit or None
    if task.num_gpu <= len(cards) and cards[task.num_gpu - 1] >= MILLI:
        return tuple(range(task.num_gpu))
    return None


@dataclass(slots=True)
class Replay:
    """Per task: GPU arrived and allocated so far (milli) and where it went (node index and
    card positions at that moment, or None if dropped)."""

    capacity_milli: int
    arrived: list[int]
    allocated: list[int]
    placed: int
    failed: int
    placements: list[tuple[int, tuple[int, ...]] | None]


class Cluster:
    """Mutable replay state, grouped by node state so that each state is scored once."""

    def __init__(self, nodes: Sequence[NodeSpec], track_affinity: bool) -> None:
        self.specs = list(nodes)
        types: dict[tuple[int, int, int, str], int] = {}
        self.type_of = [
            types.setdefault((n.cpu_milli, n.memory_mib, n.gpus, n.model), len(types))
            for n in nodes
        ]
        self.type_spec: dict[int, NodeSpec] = {}
        for spec, t in zip(self.specs, self.type_of, strict=True):
            self.type_spec.setdefault(t, spec)
        self.track_affinity = track_affinity
        self.cpu = [n.cpu_milli for n in nodes]
        self.mem = [n.memory_mib for n in nodes]
        self.cards = [[MILLI] * n.gpus for n in nodes]
        self.tags: list[Counter[str]] = [Counter() for _ in nodes]
        self.key_of: list[Key] = []
        self.members: dict[Key, list[int]] = {}
        for i in range(len(nodes)):
            key = self._key(i)
            self.key_of.append(key)
            self.members.setdefault(key, []).append(i)

    def _key(self, i: int) -> Key:
        tags = (
            frozenset(t for t, n in self.tags[i].items() if n > 0)
            if self.track_affinity
            else frozenset()
        )
        return (self.type_of[i], self.cpu[i], self.mem[i], tuple(self.cards[i]), tags)

    def apply(self, i: int, task: Task, positions: Sequence[int]) -> None:
        """Charge a task to node ``i``; refuses anything that would over-commit."""
        cards = self.cards[i]
        if self.cpu[i] < task.cpu_milli or self.mem[i] < task.memory_mib:
            raise ValueError(f"over-commit of CPU/memory on {self.specs[i].name}")
        if len(positions) != (task.num_gpu if task.gpu_total else 0) or len(set(positions)) != len(
            positions
        ):
            raise ValueError(f"wrong card count for {task}: {positions}")
        for p in positions:
            if cards[p] < task.gpu_milli or (not task.shared and cards[p] != MILLI):
                raise ValueError(f"over-commit of card {p} on {self.specs[i].name}")
        old = self.key_of[i]
        self.cpu[i] -= task.cpu_milli
        self.mem[i] -= task.memory_mib
        for p in positions:
            cards[p] -= task.gpu_milli
        cards.sort(reverse=True)
        if task.gpu_total:
            self.tags[i][task.affinity] += 1
        new = self._key(i)
        self.key_of[i] = new
        group = self.members[old]
        group.remove(i)
        if not group:
            del self.members[old]
        bisect.insort(self.members.setdefault(new, []), i)


def replay(
    nodes: Sequence[NodeSpec],
    order: Sequence[Task],
    scorer: Scorer,
    tie_seed: int,
    charge: Callable[[Task], Task] | None = None,
) -> Replay:
    """Place ``order`` one task at a time; a task that fits nowhere is dropped.

    ``charge`` maps a task to what it takes from a node (e.g. its GPU share rounded up to
    the agent's grant step); allocation is still counted as what the task asked for.
    """
    cluster = Cluster(nodes, scorer.track_affinity)
    rng = random.Random(tie_seed)
    cache: dict[Task, dict[Key, Choice | None]] = {}
    arrived_total = allocated_total = placed = failed = 0
    arrived: list[int] = []
    allocated: list[int] = []
    placements: list[tuple[int, tuple[int, ...]] | None] = []
    charged: dict[Task, Task] = {}
    for asked in order:
        arrived_total += asked.gpu_total
        task = asked
        if charge is not None:
            task = charged.get(asked) or charged.setdefault(asked, charge(asked))
        scores = cache.get(task)
        if scores is None:
            scores = cache[task] = {}
        best = float("inf")
        best_keys: list[Key] = []
        for key in cluster.members:
            choice = scores.get(key, _Sentinel.MISSING)
            if choice is _Sentinel.MISSING:
                choice = scores[key] = scorer.evaluate(cluster.type_spec[key[0]], key, task)
            if choice is None:
                continue
            cost = choice[0]
            if cost < best:
                best = cost
                best_keys = [key]
            elif cost == best:
                best_keys.append(key)
        if not best_keys:
            failed += 1
            placements.append(None)
        else:
            node, key = _pick(cluster, best_keys, scorer.random_ties, rng)
            chosen = scores[key]
            assert chosen is not None
            positions = chosen[1]
            if scorer.random_card and task.shared:
                positions = (positions[rng.randrange(len(positions))],)
            cluster.apply(node, task, positions)
            placements.append((node, tuple(positions)))
            allocated_total += asked.gpu_total
            placed += 1
            _forget(cache, key, cluster)
        arrived.append(arrived_total)
        allocated.append(allocated_total)
    return Replay(gpu_capacity(nodes), arrived, allocated, placed, failed, placements)


class _Sentinel(Enum):
    MISSING = 0


def _pick(
    cluster: Cluster, keys: list[Key], random_ties: bool, rng: random.Random
) -> tuple[int, Key]:
    if not random_ties:
        return min((cluster.members[k][0], k) for k in keys)
    total = sum(len(cluster.members[k]) for k in keys)
    r = rng.randrange(total)
    for k in keys:
        group = cluster.members[k]
        if r < len(group):
            return group[r], k
        r -= len(group)
    raise AssertionError("unreachable")


def _forget(cache: dict[Task, dict[Key, Choice | None]], key: Key, cluster: Cluster) -> None:
    """Drop cached scores of a state no node is in any more (keeps memory flat)."""
    if key in cluster.members:
        return
    for scores in cache.values():
        scores.pop(key, None)


def allocation_curve(run: Replay, max_pct: int = 130) -> dict[int, float]:
    """Allocated GPU (% of capacity) at each whole arrival percentage, the way the published
    analysis does it: the mean over all tasks whose arrival rounds to that percentage (or, if
    none, to within one point of it)."""
    cap = run.capacity_milli
    by_pct: dict[int, list[float]] = {}
    for a, b in zip(run.arrived, run.allocated, strict=True):
        by_pct.setdefault(round(100.0 * a / cap), []).append(100.0 * b / cap)
    curve: dict[int, float] = {}
    for pct in range(max_pct + 1):
        vals = by_pct.get(pct)
        if not vals:
            vals = [v for p in (pct - 1, pct, pct + 1) for v in by_pct.get(p, [])]
        if vals:
            curve[pct] = round(sum(vals) / len(vals), 4)
    return curve
