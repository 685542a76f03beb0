"""Local requests come first: which lent slices to reclaim so that a local one fits.

Pure: cards and slices in, slice ids out. Lent slices (``borrower`` set) are preemptible;
on each card they are taken lowest priority first (newest first among equals) until the
request fits; the card needing the fewest reclaims wins, ties broken by the placer's score
of placing the request on what is left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from agent import placement
from agent.model import Slice, SliceState


def plan(
    node: placement.NodeState,
    live: Iterable[Slice],
    request: placement.Request,
    placer: placement.Placer,
    device: str | None = None,
) -> list[str]:
    """Ids of the lent slices to reclaim, in order; empty when reclaiming cannot help."""
    lent: dict[str, list[Slice]] = {}
    for s in live:
        if s.borrower is not None and s.state is SliceState.ACTIVE:
            lent.setdefault(s.device, []).append(s)
    best: tuple[int, float, list[str]] | None = None
    for card in node.cards:
        if (
            not card.healthy
            or device not in (None, card.id)
            or card.id not in lent
            or not placement.model_matches(card.model, request.models)
        ):
            continue
        victims = sorted(lent[card.id], key=lambda s: (s.priority, -s.created_at, s.id))
        freed = card
        taken: list[str] = []
        for victim in victims:
            freed = dataclasses.replace(
                freed,
                memory_free_mib=freed.memory_free_mib + victim.memory_mib,
                compute_free_pct=freed.compute_free_pct + victim.compute_pct,
                slices=freed.slices - 1,
            )
            taken.append(victim.id)
            if placement.fits(freed, request.per_card):
                placed = placer.place(placement.NodeState(node.id, (freed,)), request)
                score = placed.score if placed is not None else 0.0
                if best is None or (len(taken), score) < (best[0], best[1]):
                    best = (len(taken), score, list(taken))
                break
    return best[2] if best else []
