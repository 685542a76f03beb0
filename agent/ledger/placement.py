"""Pure placement: which card should a request go to?

Shared by in-node allocation and pool-wide ``place``. No I/O, no clocks: data in, ranking
out, deterministic for equal inputs.

``fragmentation`` follows the idea of FGD (Weng et al., ATC'23): a card's *fragmentation*
for a typical request mix is the free compute that a request drawn from the mix could not
use on it. A new request goes where fragmentation grows the least; ties go to the card
left fullest (best fit), then to the lowest id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["fragmentation", "best-fit", "spread"]
POLICIES: tuple[Policy, ...] = ("fragmentation", "best-fit", "spread")


@dataclass(frozen=True, slots=True)
class CardState:
    """Free capacity of one card as placement sees it."""

    id: str
    memory_total_mib: int
    memory_free_mib: int
    compute_free_pct: int
    slices: int
    max_slices: int
    model: str = ""
    node: str = ""
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class Demand:
    memory_mib: int
    compute_pct: int


@dataclass(frozen=True, slots=True)
class Candidate:
    node: str
    device: str
    score: float
    memory_free_after_mib: int
    compute_free_after_pct: int


#: Prior request mix used before a node has seen requests of its own: fractions of a card,
#: (compute share, memory share, weight). Shaped after public GPU-sharing traces, where
#: most shared requests ask for a quarter to a half of a card and whole cards are common.
DEFAULT_MIX: tuple[tuple[float, float, float], ...] = (
    (0.1, 0.1, 0.10),
    (0.2, 0.2, 0.10),
    (0.25, 0.25, 0.15),
    (0.3, 0.3, 0.10),
    (0.5, 0.5, 0.25),
    (0.7, 0.7, 0.05),
    (1.0, 1.0, 0.25),
)


def fits(card: CardState, demand: Demand) -> bool:
    return (
        card.healthy
        and card.slices < card.max_slices
        and demand.memory_mib <= card.memory_free_mib
        and demand.compute_pct <= card.compute_free_pct
    )


def fragmentation(
    memory_total_mib: int,
    memory_free_mib: int,
    compute_free_pct: int,
    slots_free: int,
    mix: Iterable[tuple[float, float, float]],
) -> float:
    """Expected free compute (in %) that a request drawn from ``mix`` could not use."""
    if compute_free_pct <= 0:
        return 0.0
    total_weight = 0.0
    unusable = 0.0
    for compute_share, memory_share, weight in mix:
        total_weight += weight
        need_compute = compute_share * 100.0
        need_memory = memory_share * memory_total_mib
        if slots_free <= 0 or need_compute > compute_free_pct or need_memory > memory_free_mib:
            unusable += weight * compute_free_pct
    return unusable / total_weight if total_weight else 0.0


def _after(card: CardState, demand: Demand) -> tuple[int, int]:
    return card.memory_free_mib - demand.memory_mib, card.compute_free_pct - demand.compute_pct


def score(
    card: CardState,
    demand: Demand,
    policy: Policy,
    mix: Sequence[tuple[float, float, float]] = DEFAULT_MIX,
) -> float:
    """Lower is better."""
    memory_after, compute_after = _after(card, demand)
    leftover = compute_after / 100.0 + memory_after / max(card.memory_total_mib, 1)
    if policy == "best-fit":
        return leftover
    if policy == "spread":
        return -leftover
    before = fragmentation(
        card.memory_total_mib,
        card.memory_free_mib,
        card.compute_free_pct,
        card.max_slices - card.slices,
        mix,
    )
    after = fragmentation(
        card.memory_total_mib, memory_after, compute_after, card.max_slices - card.slices - 1, mix
    )
    # Fragmentation growth dominates; best fit breaks ties (scaled well below one point).
    return (after - before) + leftover * 1e-3


def rank(
    cards: Iterable[CardState],
    demand: Demand,
    policy: Policy = "fragmentation",
    mix: Sequence[tuple[float, float, float]] = DEFAULT_MIX,
) -> list[Candidate]:
    """Every card the demand fits on, best first."""
    candidates = []
    for card in cards:
        if not fits(card, demand):
            continue
        memory_after, compute_after = _after(card, demand)
        candidates.append(
            Candidate(
                node=card.node,
                device=card.id,
                score=score(card, demand, policy, mix),
                memory_free_after_mib=memory_after,
                compute_free_after_pct=compute_after,
            )
        )
    candidates.sort(key=lambda c: (round(c.score, 9), c.node, c.device))
    return candidates


def round_up_compute(compute_pct: int, step_pct: int) -> int:
    """Requests are granted in steps of ``step_pct``; round up so a job gets what it asked."""
    steps = -(-compute_pct // step_pct)
    return min(100, steps * step_pct)
