"""The published baselines, written from the FGD paper's description of its simulator.

Each reproduces the simulator's integer node score (0..100, higher better) and its
Kubernetes tie-break (uniform among the best nodes), because coarse integer scores with
random ties are part of why the published numbers are what they are. Costs handed to the
engine are the negated scores. GPU choice inside a node is "best fit" (the fullest card that
fits) except for Random (a random card) and FGD (the card whose use grows fragmentation least).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.placement_sim import MILLI, Choice, Key, NodeSpec, Task, candidate_cards

MAX_SPEC_CPU = 128_000  # normalisers the simulator uses (largest node in the trace)
MAX_SPEC_GPU = 8 * MILLI


def _fullest(cards: tuple[int, ...], positions: tuple[int, ...]) -> tuple[int, ...]:
    """Best-fit card for a shared task: the one with the least free share (last in the tuple)."""
    return (max(positions, key=lambda p: (-cards[p], p)),)


@dataclass(slots=True)
class RandomFit:
    name: str = "random"
    random_ties: bool = True
    random_card: bool = True
    track_affinity: bool = False

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        return None if fit is None else (0.0, fit)


@dataclass(slots=True)
class BestFit:
    """Least weighted free CPU and GPU left after placing (weights 0.5/0.5 of the max spec)."""

    name: str = "best-fit"
    random_ties: bool = False
    random_card: bool = False
    track_affinity: bool = False

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        if fit is None:
            return None
        _, cpu, _, cards, _ = key
        left = 0.5 * (cpu - task.cpu_milli) / MAX_SPEC_CPU
        left += 0.5 * (sum(cards) - task.gpu_total) / MAX_SPEC_GPU
        score = int((1.0 - left) * 100)
        return (-score, _fullest(cards, fit) if task.shared else fit)


@dataclass(slots=True)
class DotProduct:
    """Tetris-style alignment of free (CPU, GPU) with the request; smaller product wins."""

    name: str = "dot-product"
    random_ties: bool = False
    random_card: bool = False
    track_affinity: bool = False

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        if fit is None:
            return None
        _, cpu, _, cards, _ = key
        dot = (cpu / MAX_SPEC_CPU) * (task.cpu_milli / MAX_SPEC_CPU)
        dot += (sum(cards) / MAX_SPEC_GPU) * (task.gpu_total / MAX_SPEC_GPU)
        score = int(100 * (1.0 - dot / 2))
        return (-score, _fullest(cards, fit) if task.shared else fit)


@dataclass(slots=True)
class GpuPacking:
    """Prefer shared cards already in use, then free cards on used nodes, then idle nodes."""

    name: str = "gpu-packing"
    random_ties: bool = False
    random_card: bool = False
    track_affinity: bool = False

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        if fit is None:
            return None
        cards = key[3]
        chosen = _fullest(cards, fit) if task.shared else fit
        if task.gpu_total == 0:
            return (0.0, chosen)
        fully_free = sum(1 for c in cards if c == MILLI)
        if fully_free == len(cards):
            score = max(100 // 3 - fully_free, fully_free)
        else:
            new_cards = sum(1 for p in chosen if cards[p] == MILLI)
            if new_cards:
                score = max(100 // 2 - new_cards, 100 // 3)
            else:
                ratio = sum(cards[p] * 100 // MILLI for p in chosen)
                score = max(100 - ratio // 10, 100 // 2)
        return (-score, chosen)


@dataclass(slots=True)
class GpuClustering:
    """Keep tasks of the same GPU shape (shared, 1-GPU, 2-GPU, ...) on the same nodes."""

    name: str = "gpu-clustering"
    random_ties: bool = False
    random_card: bool = False
    track_affinity: bool = True

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        if fit is None:
            return None
        cards, tags = key[3], key[4]
        chosen = _fullest(cards, fit) if task.shared else fit
        if task.gpu_total == 0:
            return (0.0, chosen)
        used = 25 * (MAX_SPEC_GPU - sum(cards)) // MAX_SPEC_GPU
        if task.affinity in tags:
            score = used + (75 if len(tags) == 1 else 50)
        else:
            score = used + (25 if not tags else 0)
        return (-score, chosen)


#: One entry of FGD's typical task mix: (cpu milli, milli-GPU per card, cards, models, weight).
MixShape = tuple[int, int, int, frozenset[str], float]


def typical_mix(tasks: Sequence[Task], coverage: float = 0.95) -> tuple[MixShape, ...]:
    """FGD's "typical pods": the most frequent (CPU, GPU share, card count, model) shapes,
    most popular first, until they cover ``coverage`` of all tasks; weights renormalised."""
    counts = Counter((t.cpu_milli, t.gpu_milli, t.num_gpu, t.gpu_spec) for t in tasks)
    ranked = sorted(
        counts.items(),
        key=lambda kv: (kv[1], kv[0][0], kv[0][1], kv[0][2], sorted(kv[0][3])),
        reverse=True,
    )
    total = len(tasks)
    chosen: list[tuple[tuple[int, int, int, frozenset[str]], int]] = []
    covered = 0
    for shape, n in ranked:
        if covered >= coverage * total:
            break
        chosen.append((shape, n))
        covered += n
    return tuple((c, m, g, s, n / covered) for (c, m, g, s), n in chosen)


@dataclass(slots=True)
class FragmentationGradientDescent:
    """FGD: place where the node's fragmentation (expected free GPU share that a task drawn
    from the typical mix could not use) grows least; score = int(100*sigmoid(-growth/1000))."""

    mix: tuple[MixShape, ...]
    name: str = "fgd"
    random_ties: bool = False
    random_card: bool = False
    track_affinity: bool = False
    _memo: dict[tuple[str, int, tuple[int, ...]], float] = field(default_factory=dict)

    def fragmentation(self, model: str, cpu: int, cards: tuple[int, ...]) -> float:
        memo_key = (model, cpu, cards)
        cached = self._memo.get(memo_key)
        if cached is not None:
            return cached
        total = sum(cards)
        frag = 0.0
        if total:
            for cpu_m, milli, count, spec, weight in self.mix:
                if milli == 0 or (spec and model not in spec):
                    frag += weight * total  # CPU-only or wrong model: none of the GPU serves it
                    continue
                usable = sum(1 for c in cards if c >= milli)
                if usable >= count and cpu >= cpu_m:
                    frag += weight * sum(c for c in cards if c < milli)
                else:
                    frag += weight * total
        self._memo[memo_key] = frag
        return frag

    def evaluate(self, spec: NodeSpec, key: Key, task: Task) -> Choice | None:
        fit = candidate_cards(spec, key, task)
        if fit is None:
            return None
        _, cpu, _, cards, _ = key
        before = self.fragmentation(spec.model, cpu, cards)
        cpu_after = cpu - task.cpu_milli
        options = fit if task.shared else (fit,)
        best_score = -1
        best: tuple[int, ...] = ()
        seen: set[int] = set()
        for option in options:
            positions = (option,) if isinstance(option, int) else option
            if task.shared:
                if cards[positions[0]] in seen:
                    continue  # equal cards give equal scores; the first one is kept
                seen.add(cards[positions[0]])
            after_cards = list(cards)
            for p in positions:
                after_cards[p] -= task.gpu_milli
            after = self.fragmentation(
                spec.model, cpu_after, tuple(sorted(after_cards, reverse=True))
            )
            score = int(_sigmoid((before - after) / MILLI) * 100)
            if score > best_score:
                best_score, best = score, positions
        return (-best_score, best)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


BASELINES = ("random", "dot-product", "gpu-clustering", "gpu-packing", "best-fit", "fgd")
