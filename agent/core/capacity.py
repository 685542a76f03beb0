"""Capacity counted once: what each card has allocated and free, and the node's totals.

The service (placement), the bus (the capacity message), the API (devices and status) and
the metrics all read these figures from here, so that they can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.model import Device, Health, Slice, SliceState


@dataclass(frozen=True, slots=True)
class CardUse:
    """One card and the live slices on it."""

    device: Device
    slices: tuple[Slice, ...]
    max_slices: int

    @property
    def memory_allocated_mib(self) -> int:
        # A slice lent out of an idle slice's share holds none of the card's.
        return sum(s.memory_mib for s in self.slices if s.lent_from is None)

    @property
    def compute_allocated_pct(self) -> int:
        return sum(s.compute_pct for s in self.slices if s.lent_from is None)

    @property
    def memory_free_mib(self) -> int:
        return self.device.memory_total_mib - self.memory_allocated_mib

    @property
    def compute_free_pct(self) -> int:
        return 100 - self.compute_allocated_pct

    @property
    def usable(self) -> bool:
        """Counted in the node's capacity (healthy)."""
        return self.device.health is Health.OK


@dataclass(frozen=True, slots=True)
class Totals:
    memory_mib: int
    compute_pct: int
    slices: int


def card_uses(
    devices: Iterable[Device], live: Iterable[Slice], max_slices: int
) -> dict[str, CardUse]:
    """Every card with its live slices (in creation order), by device id."""
    on: dict[str, list[Slice]] = {}
    for s in sorted(live, key=lambda s: (s.created_at, s.id)):
        on.setdefault(s.device, []).append(s)
    return {d.id: CardUse(d, tuple(on.get(d.id, ())), max_slices) for d in devices}


def totals(uses: Mapping[str, CardUse]) -> tuple[Totals, Totals]:
    """(capacity, allocated) over the usable cards."""
    usable = [u for u in uses.values() if u.usable]
    capacity = Totals(
        sum(u.device.memory_total_mib for u in usable),
        100 * len(usable),
        sum(u.max_slices for u in usable),
    )
    allocated = Totals(
        sum(u.memory_allocated_mib for u in usable),
        sum(u.compute_allocated_pct for u in usable),
        sum(len(u.slices) for u in usable),
    )
    return capacity, allocated


def idle_lendable(
    live: Iterable[Slice], last_active: Mapping[str, float | None], horizon: float
) -> list[tuple[Slice, int, int]]:
    """Slices whose owner allows lending (label ``lend=true``) that are idle — no bound
    process, and no activity sampled since ``horizon`` (their creation when never sampled)
    — with the memory and compute of their share not yet lent out of them, most room first.
    A borrow may take that share (``lent_from``) until the owner binds a process again."""
    slices = list(live)
    taken: dict[str, list[int]] = {}
    for s in slices:
        if s.lent_from is not None:
            acc = taken.setdefault(s.lent_from, [0, 0])
            acc[0] += s.memory_mib
            acc[1] += s.compute_pct
    found = []
    for s in slices:
        if s.labels.get("lend") != "true" or s.borrower is not None or s.lent_from:
            continue
        if s.state is not SliceState.ACTIVE or s.processes:
            continue
        if (last_active.get(s.id) or s.created_at) >= horizon:
            continue
        memory, compute = taken.get(s.id, [0, 0])
        if memory < s.memory_mib and compute < s.compute_pct:
            found.append((s, s.memory_mib - memory, s.compute_pct - compute))
    return sorted(found, key=lambda f: (-f[1], -f[2], f[0].id))
