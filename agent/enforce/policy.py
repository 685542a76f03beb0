"""Enforcement decisions as pure functions: slices and samples in, actions and duty out.

Nothing here reads the clock, touches a process or the ledger: the caller passes ``now`` and
the previous state, and gets back what to do plus the next state. That keeps every rule of
DESIGN.md §5 testable with plain numbers (``tests/test_enforce_policy.py``), and keeps the
impure side (``actions.py``, ``loop.py``) thin.

Compute control in one paragraph (details and measurements in ``docs/enforcement.md``):
a throttled slice alternates between running and stopped inside a short period; its *run
fraction* ``f`` is the share of each period it runs. Each sample measures the share ``y``
the slice achieved over the last interval. ``y / f`` estimates what the slice would use
unthrottled (its demand ``D``); the allocator turns demands and quotas into a target ``t``
per slice; the controller moves ``f`` a fixed fraction ``GAIN`` of the way to ``t / (y/f)``,
the run fraction that would have hit the target. That is an integral controller whose gain
is normalised by the plant gain measured online, so the error shrinks by ``1 - GAIN`` per
sample: monotonic, without overshoot, whatever the process's speed when running.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.core.matching import Matched
from agent.model import ProcessRef, Slice, SliceState

ComputePolicy = Literal["work-conserving", "hard", "off"]
UnslicedMode = Literal["report", "kill"]

#: Share of the remaining error the controller removes per sample (0 < GAIN < 1: no overshoot).
GAIN = 0.5
#: Weight of a new demand estimate while throttled (the raw estimate ``y / f`` is noisy).
DEMAND_SMOOTHING = 0.5
#: A slice must exceed its target by this much (percentage points) before it is throttled:
#: sampling noise alone must never start duty-cycling a slice that is within its share.
DEADBAND_PCT = 2.0
#: A throttled slice always runs at least this fraction of each period (it must make some
#: progress and react to signals) and is never stopped for less than ``1 - MAX_RUN``.
MIN_RUN = 0.02
MAX_RUN = 0.98
#: Upper bound of a demand estimate: a multi-threaded process may exceed one card's 100 %.
DEMAND_CAP_PCT = 400.0
#: A throttled slice is released after this many consecutive samples that say it no
#: longer needs throttling: one noisy sample must not flip it (each flip is an event).
RELEASE_AFTER = 2
#: Card capacity in percent.
CARD_PCT = 100.0


# -- what the policy sees ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One process on a card in the last sample. ``start_time`` None: identity unknown."""

    pid: int
    start_time: float | None
    memory_mib: float | None
    cpu_pct: float | None

    @property
    def ref(self) -> ProcessRef | None:
        return None if self.start_time is None else ProcessRef(self.pid, self.start_time)


@dataclass(frozen=True, slots=True)
class SliceSample:
    slice_id: str
    memory_limit_mib: int
    quota_pct: int
    processes: tuple[ProcSample, ...] = ()

    @property
    def memory_used_mib(self) -> float:
        return sum(p.memory_mib or 0.0 for p in self.processes)

    @property
    def cpu_pct(self) -> float | None:
        """Achieved compute share; None when no process's share is known (no reading yet,
        or a backend that cannot split utilisation by process, like npu-smi)."""
        known = [p.cpu_pct for p in self.processes if p.cpu_pct is not None]
        if self.processes and not known:
            return None
        return sum(known)


@dataclass(frozen=True, slots=True)
class CardSample:
    device: str
    slices: tuple[SliceSample, ...] = ()
    unsliced: tuple[ProcSample, ...] = ()

    @property
    def unsliced_cpu_pct(self) -> float:
        return sum(p.cpu_pct or 0.0 for p in self.unsliced)


def gather(slices: Iterable[Slice], matched: Mapping[str, Sequence[Matched]]) -> list[CardSample]:
    """Sampled processes by slice or unsliced, from the core's matching (by bound pid and
    start time: :mod:`agent.core.matching`). Only active slices on a sampled card are
    enforced; a process of a slice that is not active counts as unsliced."""
    active = {s.id: s for s in slices if s.state is SliceState.ACTIVE}
    per_slice: dict[str, list[ProcSample]] = {s: [] for s in active}
    unsliced: dict[str, list[ProcSample]] = {d: [] for d in matched}
    for device_id, found in matched.items():
        for m in found:
            proc = m.process
            if m.slice is not None and m.ref is not None and m.slice.id in active:
                per_slice[m.slice.id].append(
                    ProcSample(proc.pid, m.ref.start_time, proc.memory_mib, proc.utilisation_pct)
                )
            else:
                unsliced[device_id].append(
                    ProcSample(proc.pid, proc.start_time, proc.memory_mib, proc.utilisation_pct)
                )
    cards = []
    for device_id in matched:
        on = tuple(
            SliceSample(s.id, s.memory_mib, s.compute_pct, tuple(per_slice[s.id]))
            for s in sorted(active.values(), key=lambda s: s.id)
            if s.device == device_id
        )
        cards.append(CardSample(device_id, on, tuple(unsliced[device_id])))
    return cards


# -- memory ---------------------------------------------------------------------------------


class MemoryAction(enum.StrEnum):
    REPORT = "report"
    TERM = "term"
    KILL = "kill"


@dataclass(frozen=True, slots=True)
class MemoryVerdict:
    """Act on ``ref`` because its slice uses ``used_mib`` of ``limit_mib``."""

    slice_id: str
    ref: ProcessRef
    action: MemoryAction
    used_mib: float
    limit_mib: int
    process_mib: float
    #: A KILL because a TERM (or an earlier KILL) did not end the process in time.
    escalated: bool = False


@dataclass(frozen=True, slots=True)
class Pending:
    """A process already signalled: no new action on its slice until ``deadline``."""

    slice_id: str
    deadline: float


@dataclass(frozen=True, slots=True)
class MemoryState:
    #: Slices over their limit at the last sample (``report`` fires once per excursion).
    over: frozenset[str] = frozenset()
    pending: Mapping[ProcessRef, Pending] = field(default_factory=dict)


#: After a SIGKILL, how long to wait for the process to vanish before killing it again.
KILL_SETTLE_S = 2.0


def decide_memory(
    cards: Sequence[CardSample],
    mode: str,
    grace_s: float,
    state: MemoryState,
    now: float,
) -> tuple[list[MemoryVerdict], MemoryState]:
    """Memory is hard: a slice over its limit loses its largest process (DESIGN.md §5).

    One process per slice at a time: while a signalled process is within its grace, the
    slice is left alone (its memory is about to be freed); after the grace, a process still
    present is killed. ``report`` only records the excursion, once until the slice is back
    under its limit.
    """
    action = MemoryAction(mode)
    present: dict[ProcessRef, tuple[SliceSample, ProcSample]] = {}
    for card in cards:
        for s in card.slices:
            for p in s.processes:
                if p.ref is not None:
                    present[p.ref] = (s, p)
    verdicts: list[MemoryVerdict] = []
    pending: dict[ProcessRef, Pending] = {}
    for ref, wait in state.pending.items():
        if now < wait.deadline:
            pending[ref] = wait
        elif ref in present:
            s, p = present[ref]
            verdicts.append(
                MemoryVerdict(
                    s.slice_id,
                    ref,
                    MemoryAction.KILL,
                    s.memory_used_mib,
                    s.memory_limit_mib,
                    p.memory_mib or 0.0,
                    escalated=True,
                )
            )
            pending[ref] = Pending(s.slice_id, now + KILL_SETTLE_S)
    busy = {w.slice_id for w in pending.values()}
    over: set[str] = set()
    for card in cards:
        for s in card.slices:
            used = s.memory_used_mib
            if used <= s.memory_limit_mib:
                continue
            over.add(s.slice_id)
            if s.slice_id in busy:
                continue
            candidates = [p for p in s.processes if p.ref is not None and p.memory_mib is not None]
            if not candidates:
                continue
            offender = max(candidates, key=lambda p: (p.memory_mib or 0.0, p.pid))
            assert offender.ref is not None
            if action is MemoryAction.REPORT and s.slice_id in state.over:
                continue
            verdicts.append(
                MemoryVerdict(
                    s.slice_id,
                    offender.ref,
                    action,
                    used,
                    s.memory_limit_mib,
                    offender.memory_mib or 0.0,
                )
            )
            if action is MemoryAction.TERM:
                pending[offender.ref] = Pending(s.slice_id, now + grace_s)
            elif action is MemoryAction.KILL:
                pending[offender.ref] = Pending(s.slice_id, now + KILL_SETTLE_S)
    return verdicts, MemoryState(frozenset(over), pending)


# -- unsliced processes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnslicedVerdict:
    device: str
    ref: ProcessRef
    action: Literal["report", "kill"]
    memory_mib: float | None


def decide_unsliced(
    cards: Sequence[CardSample], mode: str, seen: frozenset[ProcessRef]
) -> tuple[list[UnslicedVerdict], frozenset[ProcessRef]]:
    """Processes on a card outside every slice: reported once, killed only when configured.

    A process must be unsliced in two consecutive samples: a workload started by
    ``xpuctl run`` is on its card a moment before it is bound, and must never be killed for
    that. Processes of unknown identity (no start time) are never acted on.
    """
    now_seen: set[ProcessRef] = set()
    verdicts: list[UnslicedVerdict] = []
    for card in cards:
        for p in card.unsliced:
            ref = p.ref
            if ref is None:
                continue
            now_seen.add(ref)
            if ref not in seen:
                continue
            if mode == "kill":
                verdicts.append(UnslicedVerdict(card.device, ref, "kill", p.memory_mib))
    return verdicts, frozenset(now_seen)


def newly_unsliced(
    cards: Sequence[CardSample], seen: frozenset[ProcessRef], reported: frozenset[ProcessRef]
) -> list[UnslicedVerdict]:
    """Unsliced processes seen twice and not reported yet (one report per process life)."""
    return [
        UnslicedVerdict(card.device, p.ref, "report", p.memory_mib)
        for card in cards
        for p in card.unsliced
        if p.ref is not None and p.ref in seen and p.ref not in reported
    ]


# -- compute --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Controller:
    """Per-slice control state. ``run_fraction`` 1.0 means not throttled."""

    run_fraction: float = 1.0
    demand_pct: float = 0.0
    #: Consecutive samples in which a throttled slice looked free to go (see RELEASE_AFTER).
    calm: int = 0

    @property
    def throttled(self) -> bool:
        return self.run_fraction < 1.0


@dataclass(frozen=True, slots=True)
class Duty:
    """A throttled slice: run ``run_fraction`` of each period from ``offset`` on (both as
    fractions of the period; the run window may wrap around the period's end)."""

    slice_id: str
    device: str
    quota_pct: int
    target_pct: float
    demand_pct: float
    used_pct: float
    run_fraction: float
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class ComputePlan:
    controllers: Mapping[str, Controller]
    duties: Mapping[str, Duty]


def estimate_demand(
    prev: Controller, used_pct: float, quota_pct: int, saturated: bool, capacity_pct: float
) -> float:
    """What the slice would use if it were not throttled.

    Throttled: the achieved share divided by the run fraction, smoothed. Not throttled: its
    use, which is only a lower bound when the card is saturated (on a shared card a slice
    takes what the others leave): a slice at or above its quota on a saturated card is
    assumed to want the whole card, so the allocator holds it to its share.
    """
    if prev.throttled:
        raw = min(DEMAND_CAP_PCT, used_pct / prev.run_fraction)
        return prev.demand_pct + DEMAND_SMOOTHING * (raw - prev.demand_pct)
    if saturated and used_pct >= quota_pct - DEADBAND_PCT:
        return max(used_pct, capacity_pct)
    return used_pct


def allocate(
    quotas: Mapping[str, int],
    demands: Mapping[str, float],
    capacity_pct: float,
    policy: ComputePolicy,
) -> dict[str, float]:
    """Each slice's allowance on one card, in percent.

    ``hard``: its quota. ``off``: unlimited. ``work-conserving``: every slice first gets
    what it wants up to its quota; what is left of the card is shared among the slices that
    want more, in proportion to their quotas, none getting more than it wants (water
    filling). With no contention every slice gets its whole demand; under contention each
    is held to its quota plus its fair part of whatever the others leave idle.
    """
    if policy == "off":
        return dict.fromkeys(quotas, math.inf)
    if policy == "hard":
        return {s: float(q) for s, q in quotas.items()}
    wanting = [s for s in quotas if demands.get(s, 0.0) > DEADBAND_PCT]
    if len(wanting) <= 1 and capacity_pct >= CARD_PCT:
        # Contention needs a second party: one slice alone (no other slice, no unsliced
        # use) is never held, even when it measures above 100 % (several threads, or
        # the jitter of a sample that came late).
        return dict.fromkeys(quotas, math.inf)
    allowance = {s: min(demands.get(s, 0.0), float(q)) for s, q in quotas.items()}
    slack = max(0.0, capacity_pct - sum(allowance.values()))
    hungry = {s for s in quotas if demands.get(s, 0.0) > allowance[s] + 1e-9}
    while slack > 1e-6 and hungry:
        weight = sum(quotas[s] for s in hungry)
        given = 0.0
        for s in sorted(hungry):
            want = demands[s] - allowance[s]
            grant = min(want, slack * quotas[s] / weight)
            allowance[s] += grant
            given += grant
        slack -= given
        hungry = {s for s in hungry if demands[s] > allowance[s] + 1e-9}
    for s, q in quotas.items():
        allowance[s] = max(allowance[s], float(q))
    return allowance


def next_controller(
    prev: Controller, used_pct: float, demand_pct: float, target_pct: float
) -> Controller:
    """One control step for one slice (see the module docstring)."""
    if not prev.throttled:
        if demand_pct <= target_pct + DEADBAND_PCT:
            return Controller(1.0, demand_pct)
        # Feed-forward on entry: the run fraction that would give the target if the demand
        # estimate is right; feedback corrects it from the next sample on.
        fraction = target_pct / demand_pct
        return Controller(min(MAX_RUN, max(MIN_RUN, fraction)), demand_pct)
    saturated_high = prev.run_fraction >= MAX_RUN and used_pct < target_pct
    calm = prev.calm + 1 if demand_pct <= target_pct or saturated_high else 0
    if calm >= RELEASE_AFTER:
        return Controller(1.0, demand_pct)
    if used_pct <= 0.0:
        # No progress measured (blocked on I/O, or stopped throughout): open up.
        fraction = prev.run_fraction + GAIN * (MAX_RUN - prev.run_fraction)
    else:
        wanted = target_pct * prev.run_fraction / used_pct
        fraction = prev.run_fraction + GAIN * (wanted - prev.run_fraction)
    return Controller(min(MAX_RUN, max(MIN_RUN, fraction)), demand_pct, calm)


def stagger(duties: Sequence[Duty]) -> list[Duty]:
    """Lay one card's run windows end to end (sorted by slice id) so that throttled slices
    take turns instead of all running at the start of each period: on a real card that is
    time-slicing, on the mock it is harmless."""
    out = []
    offset = 0.0
    for duty in sorted(duties, key=lambda d: d.slice_id):
        out.append(
            Duty(
                duty.slice_id,
                duty.device,
                duty.quota_pct,
                duty.target_pct,
                duty.demand_pct,
                duty.used_pct,
                duty.run_fraction,
                offset,
            )
        )
        offset = (offset + duty.run_fraction) % 1.0
    return out


def plan_compute(
    cards: Sequence[CardSample],
    policy: ComputePolicy,
    controllers: Mapping[str, Controller],
) -> ComputePlan:
    """Targets and run fractions for every slice on every sampled card.

    A slice whose use is unknown (no reading yet, or a backend without per-process
    utilisation) keeps no throttle: the agent never stops what it cannot measure.
    """
    out_controllers: dict[str, Controller] = {}
    duties: dict[str, Duty] = {}
    for card in cards:
        capacity = max(0.0, CARD_PCT - card.unsliced_cpu_pct)
        used = {s.slice_id: s.cpu_pct for s in card.slices}
        known = {sid: u for sid, u in used.items() if u is not None}
        total = sum(known.values()) + card.unsliced_cpu_pct
        saturated = total >= CARD_PCT - DEADBAND_PCT
        quotas = {s.slice_id: s.quota_pct for s in card.slices if s.slice_id in known}
        demands = {
            s.slice_id: estimate_demand(
                controllers.get(s.slice_id, Controller()),
                known[s.slice_id],
                s.quota_pct,
                saturated,
                capacity,
            )
            for s in card.slices
            if s.slice_id in known
        }
        if policy == "off":
            out_controllers.update({sid: Controller(1.0, d) for sid, d in demands.items()})
            continue
        allowance = allocate(quotas, demands, capacity, policy)
        card_duties = []
        for sid, demand in demands.items():
            prev = controllers.get(sid, Controller())
            ctl = next_controller(prev, known[sid], demand, allowance[sid])
            out_controllers[sid] = ctl
            if ctl.throttled:
                card_duties.append(
                    Duty(
                        sid,
                        card.device,
                        quotas[sid],
                        allowance[sid],
                        demand,
                        known[sid],
                        ctl.run_fraction,
                    )
                )
        duties.update((d.slice_id, d) for d in stagger(card_duties))
    return ComputePlan(out_controllers, duties)


class Edge(enum.Enum):
    STOP = "stop"
    RESUME = "resume"


def edges(duty: Duty) -> tuple[tuple[float, Edge], tuple[float, Edge]]:
    """The two actuator edges of one period, as (fraction of the period, what), in order.

    The run window ``[offset, offset + f)`` and the stop window are complementary arcs of
    the period; at most one of them wraps around its end, so the other gives two edges
    inside ``[0, 1]``. When the run window wraps, the process is running at the period's
    start and stops first; otherwise it is stopped (or just resumed) at the start.
    """
    start = duty.offset % 1.0
    end = start + duty.run_fraction
    if end <= 1.0:
        return (start, Edge.RESUME), (end, Edge.STOP)
    return (end - 1.0, Edge.STOP), (start, Edge.RESUME)
