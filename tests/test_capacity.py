"""What an idle ``lend=true`` slice can still lend (agent/core/capacity.idle_lendable)."""

from __future__ import annotations

from agent.core.capacity import idle_lendable
from agent.model import ProcessRef, Slice, SliceState


def _slice(sid: str, **kw: object) -> Slice:
    fields: dict[str, object] = {
        "id": sid,
        "device": "mock-0",
        "memory_mib": 8192,
        "compute_pct": 40,
        "owner_uid": 1000,
        "state": SliceState.ACTIVE,
        "created_at": 0.0,
        "token": "t",
        "labels": {"lend": "true"},
    }
    return Slice(**(fields | kw))  # type: ignore[arg-type]


def test_only_idle_lendable_shares_count_less_what_is_lent_out_of_them() -> None:
    idle = _slice("s-idle")
    busy = _slice("s-busy")  # active since the horizon
    bound = _slice("s-bound", processes=(ProcessRef(42, 1.0),))
    private = _slice("s-private", labels={})
    lent = _slice("s-lent", memory_mib=2048, compute_pct=10, borrower="b", lent_from="s-idle")
    full = _slice("s-full", memory_mib=1024, compute_pct=10)
    fills = _slice("s-fills", memory_mib=1024, compute_pct=10, borrower="b", lent_from="s-full")
    live = [idle, busy, bound, private, lent, full, fills]
    found = idle_lendable(live, {"s-busy": 100.0, "s-idle": 10.0}, horizon=50.0)
    # s-idle: 8 GiB / 40 % less what is lent out of it; s-full: nothing left; the others
    # are busy, bound, not lend=true, or lent slices themselves.
    assert [(s.id, memory, compute) for s, memory, compute in found] == [("s-idle", 6144, 30)]
    # Never sampled: idle since its creation.
    young = _slice("s-young", created_at=60.0)
    assert idle_lendable([young], {}, horizon=50.0) == []
    assert [s.id for s, _, _ in idle_lendable([young], {}, horizon=70.0)] == ["s-young"]
