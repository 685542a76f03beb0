"""Enforcement policy (pure): every rule of DESIGN.md §5 with plain numbers."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import matching
from agent.enforce import policy
from agent.enforce.policy import (
    CardSample,
    Controller,
    Duty,
    Edge,
    MemoryAction,
    MemoryState,
    ProcSample,
    SliceSample,
)
from agent.model import DeviceSample, ProcessRef, ProcessUsage, Slice, SliceState


def proc(pid: int, memory: float | None = 10.0, cpu: float | None = 0.0) -> ProcSample:
    return ProcSample(pid, float(pid), memory, cpu)


def ref(pid: int) -> ProcessRef:
    return ProcessRef(pid, float(pid))


def card(
    *slices: SliceSample, unsliced: tuple[ProcSample, ...] = (), device: str = "d0"
) -> CardSample:
    return CardSample(device, tuple(slices), unsliced)


def sl(sid: str, *procs: ProcSample, memory: int = 512, quota: int = 30) -> SliceSample:
    return SliceSample(sid, memory, quota, tuple(procs))


# -- gather ---------------------------------------------------------------------------------


def _slice(
    sid: str, device: str, *refs: ProcessRef, state: SliceState = SliceState.ACTIVE
) -> Slice:
    return Slice(
        id=sid,
        device=device,
        memory_mib=512,
        compute_pct=30,
        owner_uid=0,
        state=state,
        created_at=0.0,
        token="t",
        processes=refs,
    )


def test_gather_maps_bound_processes_and_leaves_the_rest_unsliced() -> None:
    slices = [
        _slice("a", "d0", ref(10)),
        _slice("b", "d1", ref(20)),
        _slice("lost", "d0", ref(30), state=SliceState.LOST),
    ]
    samples = {
        "d0": DeviceSample(
            "d0",
            0.0,
            0.0,
            processes=(
                ProcessUsage(10, 100.0, 50.0, 10.0),
                ProcessUsage(11, 5.0, 1.0, 11.0),
                ProcessUsage(30, 1.0, 1.0, 30.0),
            ),
        ),
        "d1": DeviceSample("d1", 0.0, 0.0, processes=(ProcessUsage(20, 7.0, None, 99.0),)),
    }
    cards = {c.device: c for c in policy.gather(slices, matching.match(slices, samples))}
    assert [s.slice_id for s in cards["d0"].slices] == ["a"]
    assert cards["d0"].slices[0].processes == (ProcSample(10, 10.0, 100.0, 50.0),)
    # A lost slice is not enforced; its process is just another process on the card.
    assert {p.pid for p in cards["d0"].unsliced} == {11, 30}
    # pid 20 was recycled (another start time): not the bound process.
    assert cards["d1"].slices[0].processes == ()
    assert [p.pid for p in cards["d1"].unsliced] == [20]


def test_gather_unknown_start_time_trusts_the_binding() -> None:
    samples = {"d0": DeviceSample("d0", 0.0, 0.0, processes=(ProcessUsage(10, 1.0, 2.0, None),))}
    slices = [_slice("a", "d0", ref(10))]
    (only,) = policy.gather(slices, matching.match(slices, samples))
    assert only.slices[0].processes[0].ref == ref(10)


def test_slice_share_is_unknown_only_when_no_process_reports_one() -> None:
    assert sl("a").cpu_pct == 0.0
    assert sl("a", proc(1, cpu=None)).cpu_pct is None
    assert sl("a", proc(1, cpu=None), proc(2, cpu=20.0)).cpu_pct == 20.0
    assert sl("a", proc(1, memory=None), proc(2, memory=30.0)).memory_used_mib == 30.0


# -- memory ---------------------------------------------------------------------------------


def test_memory_within_limit_is_left_alone() -> None:
    verdicts, state = policy.decide_memory(
        [card(sl("a", proc(1, 500.0)))], "term", 5.0, MemoryState(), 0.0
    )
    assert verdicts == [] and state == MemoryState()


def test_memory_over_limit_terms_the_largest_then_kills_after_grace() -> None:
    cards = [card(sl("a", proc(1, 100.0), proc(2, 450.0)))]
    verdicts, state = policy.decide_memory(cards, "term", 5.0, MemoryState(), 100.0)
    assert verdicts == [policy.MemoryVerdict("a", ref(2), MemoryAction.TERM, 550.0, 512, 450.0)]
    # Within the grace nothing more happens, even though the slice is still over.
    verdicts, state = policy.decide_memory(cards, "term", 5.0, state, 104.0)
    assert verdicts == []
    # After the grace the process is still there: SIGKILL, marked as an escalation.
    verdicts, state = policy.decide_memory(cards, "term", 5.0, state, 105.0)
    assert [(v.ref, v.action, v.escalated) for v in verdicts] == [(ref(2), MemoryAction.KILL, True)]


def test_memory_term_that_worked_needs_no_kill() -> None:
    over = [card(sl("a", proc(1, 100.0), proc(2, 450.0)))]
    _, state = policy.decide_memory(over, "term", 5.0, MemoryState(), 0.0)
    after = [card(sl("a", proc(1, 100.0)))]
    verdicts, state = policy.decide_memory(after, "term", 5.0, state, 6.0)
    assert verdicts == [] and state.pending == {}


def test_memory_next_offender_after_the_first_one_is_gone() -> None:
    both = [card(sl("a", proc(1, 300.0), proc(2, 400.0)))]
    _, state = policy.decide_memory(both, "term", 5.0, MemoryState(), 0.0)
    # pid 2 exited but pid 1 alone still exceeds a smaller limit.
    left = [card(sl("a", proc(1, 600.0)))]
    verdicts, _ = policy.decide_memory(left, "term", 5.0, state, 1.0)
    assert verdicts == []  # the slice is still "busy" until pid 2's grace lapses
    verdicts, _ = policy.decide_memory(left, "term", 5.0, state, 5.0)
    assert [(v.ref, v.action) for v in verdicts] == [(ref(1), MemoryAction.TERM)]


def test_memory_kill_mode_kills_once_and_waits_for_the_process_to_vanish() -> None:
    cards = [card(sl("a", proc(1, 600.0)))]
    verdicts, state = policy.decide_memory(cards, "kill", 5.0, MemoryState(), 0.0)
    assert [(v.ref, v.action, v.escalated) for v in verdicts] == [
        (ref(1), MemoryAction.KILL, False)
    ]
    verdicts, state = policy.decide_memory(cards, "kill", 5.0, state, 0.5)
    assert verdicts == []
    verdicts, _ = policy.decide_memory(cards, "kill", 5.0, state, policy.KILL_SETTLE_S)
    assert [(v.action, v.escalated) for v in verdicts] == [(MemoryAction.KILL, True)]


def test_memory_report_once_per_excursion() -> None:
    over = [card(sl("a", proc(1, 600.0)))]
    under = [card(sl("a", proc(1, 100.0)))]
    v1, state = policy.decide_memory(over, "report", 5.0, MemoryState(), 0.0)
    v2, state = policy.decide_memory(over, "report", 5.0, state, 1.0)
    v3, state = policy.decide_memory(under, "report", 5.0, state, 2.0)
    v4, state = policy.decide_memory(over, "report", 5.0, state, 3.0)
    assert [len(v) for v in (v1, v2, v3, v4)] == [1, 0, 0, 1]
    assert v1[0].action is MemoryAction.REPORT and state.pending == {}


def test_memory_never_acts_on_unknown_identity_or_unknown_size() -> None:
    nameless = ProcSample(7, None, 900.0, 0.0)
    cards = [card(sl("a", nameless, proc(2, None)))]
    verdicts, _ = policy.decide_memory(cards, "kill", 5.0, MemoryState(), 0.0)
    assert verdicts == []


def test_memory_slices_are_independent() -> None:
    cards = [
        card(sl("a", proc(1, 600.0)), sl("b", proc(2, 100.0))),
        card(sl("c", proc(3, 513.0)), device="d1"),
    ]
    verdicts, state = policy.decide_memory(cards, "term", 5.0, MemoryState(), 0.0)
    assert {(v.slice_id, v.ref.pid) for v in verdicts} == {("a", 1), ("c", 3)}
    assert state.over == {"a", "c"}


# -- unsliced -------------------------------------------------------------------------------


def test_unsliced_are_never_killed_by_default() -> None:
    cards = [card(unsliced=(proc(5),))]
    seen: frozenset[ProcessRef] = frozenset()
    for _ in range(3):
        verdicts, seen = policy.decide_unsliced(cards, "report", seen)
        assert verdicts == []
    assert seen == {ref(5)}


def test_unsliced_kill_needs_two_sightings_and_a_known_identity() -> None:
    cards = [card(unsliced=(proc(5), ProcSample(6, None, 1.0, 1.0)))]
    verdicts, seen = policy.decide_unsliced(cards, "kill", frozenset())
    assert verdicts == []
    verdicts, seen = policy.decide_unsliced(cards, "kill", seen)
    assert [(v.ref, v.action) for v in verdicts] == [(ref(5), "kill")]


def test_unsliced_report_once_per_process() -> None:
    cards = [card(unsliced=(proc(5),))]
    assert policy.newly_unsliced(cards, frozenset(), frozenset()) == []
    fresh = policy.newly_unsliced(cards, frozenset({ref(5)}), frozenset())
    assert [v.ref for v in fresh] == [ref(5)]
    assert policy.newly_unsliced(cards, frozenset({ref(5)}), frozenset({ref(5)})) == []


# -- allocation -----------------------------------------------------------------------------


def test_allocate_hard_and_off() -> None:
    quotas = {"a": 30, "b": 70}
    demands = {"a": 100.0, "b": 10.0}
    assert policy.allocate(quotas, demands, 100.0, "hard") == {"a": 30.0, "b": 70.0}
    assert policy.allocate(quotas, demands, 100.0, "off") == {"a": math.inf, "b": math.inf}


def test_work_conserving_without_contention_gives_everyone_its_demand() -> None:
    # Alone on the card, even a multi-threaded slice measuring 180 % is not held.
    allowance = policy.allocate(
        {"a": 30, "b": 30}, {"a": 180.0, "b": 1.0}, 100.0, "work-conserving"
    )
    assert allowance["a"] == math.inf
    allowance = policy.allocate(
        {"a": 30, "b": 30}, {"a": 60.0, "b": 40.0}, 100.0, "work-conserving"
    )
    assert allowance["a"] >= 60.0 and allowance["b"] >= 40.0


def test_work_conserving_under_contention_holds_to_quotas() -> None:
    allowance = policy.allocate(
        {"a": 30, "b": 70}, {"a": 100.0, "b": 100.0}, 100.0, "work-conserving"
    )
    assert allowance == pytest.approx({"a": 30.0, "b": 70.0})


def test_work_conserving_shares_what_others_leave_by_quota() -> None:
    # b wants 50 of its 70: a (30) may have the 20 left; c and a share by quota.
    allowance = policy.allocate(
        {"a": 30, "b": 70}, {"a": 100.0, "b": 50.0}, 100.0, "work-conserving"
    )
    assert allowance["a"] == pytest.approx(50.0)
    allowance = policy.allocate(
        {"a": 20, "b": 40, "c": 40}, {"a": 100.0, "b": 100.0, "c": 10.0}, 100.0, "work-conserving"
    )
    assert allowance["a"] == pytest.approx(30.0) and allowance["b"] == pytest.approx(60.0)


def test_unsliced_use_shrinks_what_can_be_shared_but_never_a_quota() -> None:
    # Unsliced processes using half the card are the other party: a gets the other half.
    allowance = policy.allocate({"a": 30}, {"a": 100.0}, 50.0, "work-conserving")
    assert allowance == {"a": 50.0}
    allowance = policy.allocate(
        {"a": 30, "b": 70}, {"a": 100.0, "b": 100.0}, 20.0, "work-conserving"
    )
    assert allowance == {"a": 30.0, "b": 70.0}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 10), st.floats(0.0, 300.0)), min_size=1, max_size=10),
    st.floats(0.0, 100.0),
)
def test_work_conserving_allocation_properties(
    slices: list[tuple[int, float]], capacity: float
) -> None:
    quotas = {f"s{i}": 10 * q for i, (q, _) in enumerate(slices)}
    demands = {f"s{i}": d for i, (_, d) in enumerate(slices)}
    allowance = policy.allocate(quotas, demands, capacity, "work-conserving")
    wanting = [s for s in quotas if demands[s] > policy.DEADBAND_PCT]
    if len(wanting) <= 1 and capacity >= policy.CARD_PCT:
        assert all(a == math.inf for a in allowance.values())  # nobody to contend with
        return
    for sid, quota in quotas.items():
        # Never below the quota: a slice is held to its quota at most.
        assert allowance[sid] >= quota - 1e-9
    beyond = sum(max(0.0, allowance[s] - quotas[s]) for s in quotas)
    base = sum(min(demands[s], quotas[s]) for s in quotas)
    # What is given beyond quotas is at most what the card has left.
    assert beyond <= max(0.0, capacity - base) + 1e-6
    # Work conserving: when the card has room left, every slice gets its full demand.
    if sum(demands.values()) <= capacity:
        assert all(allowance[s] >= demands[s] - 1e-6 for s in quotas)


# -- the controller -------------------------------------------------------------------------


def simulate(
    gain_pct: float, target: float, steps: int, start: Controller | None = None
) -> list[float]:
    """A slice whose process uses ``gain_pct`` while running: achieved = gain * f."""
    ctl = start or Controller()
    shares = []
    for _ in range(steps):
        used = gain_pct * ctl.run_fraction
        shares.append(used)
        demand = policy.estimate_demand(ctl, used, int(target), True, 100.0)
        ctl = policy.next_controller(ctl, used, demand, target)
    return shares


@settings(max_examples=200, deadline=None)
@given(st.floats(40.0, 400.0), st.sampled_from([10.0, 20.0, 30.0, 50.0, 70.0]))
def test_controller_converges_without_overshoot(gain: float, target: float) -> None:
    if gain <= target + policy.DEADBAND_PCT:
        return
    shares = simulate(gain, target, 12)
    # Monotone approach: once throttled, the error never changes sign (no oscillation)...
    errors = [s - target for s in shares[1:]]
    assert all(e * errors[0] >= -1e-6 for e in errors) or abs(errors[0]) < 1e-6
    assert all(abs(b) <= abs(a) + 1e-6 for a, b in itertools.pairwise(errors))
    # ... and within a percentage point after a few samples.
    assert abs(shares[-1] - target) < 1.0


def test_controller_corrects_a_wrong_demand_estimate() -> None:
    # Entered with a demand estimate of 100 % but the process runs at 60 % when running
    # (a busy host): the first step undershoots, feedback then closes the gap.
    ctl = policy.next_controller(Controller(), 100.0, 100.0, 30.0)
    assert ctl.run_fraction == pytest.approx(0.3)
    shares = simulate(60.0, 30.0, 10, start=ctl)
    assert shares[0] == pytest.approx(18.0)
    assert abs(shares[-1] - 30.0) < 0.5


def test_controller_releases_after_calm_samples_only() -> None:
    held = Controller(0.3, 100.0)
    once = policy.next_controller(held, 5.0, 20.0, 30.0)
    assert once.throttled and once.calm == 1
    twice = policy.next_controller(once, 5.0, 20.0, 30.0)
    assert not twice.throttled
    # A single calm sample followed by demand resets the count.
    back = policy.next_controller(once, 30.0, 100.0, 30.0)
    assert back.throttled and back.calm == 0


def test_controller_stays_free_within_the_deadband() -> None:
    assert not policy.next_controller(Controller(), 31.0, 31.0, 30.0).throttled
    assert policy.next_controller(Controller(), 40.0, 40.0, 30.0).run_fraction == 0.75


def test_controller_bounds_and_an_idle_process() -> None:
    tiny = policy.next_controller(Controller(), 400.0, 400.0, 1.0)
    assert tiny.run_fraction == policy.MIN_RUN
    idle = policy.next_controller(Controller(0.1, 300.0), 0.0, 300.0, 30.0)
    assert idle.run_fraction > 0.1


# -- the compute plan -----------------------------------------------------------------------


def busy(sid: str, quota: int, used: float) -> SliceSample:
    return SliceSample(sid, 512, quota, (ProcSample(hash(sid) % 1000 + 2, 1.0, 10.0, used),))


def test_plan_alone_work_conserving_runs_free() -> None:
    for measured in (100.0, 106.0, 250.0):
        plan = policy.plan_compute([card(busy("a", 30, measured))], "work-conserving", {})
        assert plan.duties == {} and not plan.controllers["a"].throttled


def test_plan_alone_hard_is_capped_at_its_quota() -> None:
    plan = policy.plan_compute([card(busy("a", 30, 100.0))], "hard", {})
    assert plan.duties["a"].run_fraction == pytest.approx(0.3)
    assert plan.duties["a"].target_pct == 30.0


def test_plan_two_busy_slices_are_held_to_their_quotas_and_take_turns() -> None:
    plan = policy.plan_compute(
        [card(busy("a", 30, 100.0), busy("b", 70, 100.0))], "work-conserving", {}
    )
    a, b = plan.duties["a"], plan.duties["b"]
    assert (a.run_fraction, b.run_fraction) == pytest.approx((0.3, 0.7))
    assert (a.offset, b.offset) == pytest.approx((0.0, 0.3))


def test_plan_off_and_unknown_use_never_throttle() -> None:
    plan = policy.plan_compute([card(busy("a", 30, 100.0))], "off", {})
    assert plan.duties == {}
    unknown = SliceSample("a", 512, 30, (ProcSample(2, 1.0, 10.0, None),))
    plan = policy.plan_compute([card(unknown)], "hard", {})
    assert plan.duties == {} and "a" not in plan.controllers


def test_plan_unsliced_load_counts_as_contention() -> None:
    cards = [card(busy("a", 30, 60.0), unsliced=(proc(9, cpu=60.0),))]
    plan = policy.plan_compute(cards, "work-conserving", {})
    # 40 % are left for a; it wants the card (saturated): held to 40 %.
    assert plan.duties["a"].target_pct == pytest.approx(40.0)


def test_closed_loop_two_slices_reach_30_70() -> None:
    controllers: dict[str, Controller] = {}
    achieved = {"a": 100.0, "b": 100.0}
    for _ in range(10):
        cards = [card(busy("a", 30, achieved["a"]), busy("b", 70, achieved["b"]))]
        plan = policy.plan_compute(cards, "work-conserving", controllers)
        controllers = dict(plan.controllers)
        achieved = {s: 100.0 * controllers[s].run_fraction for s in achieved}
    assert achieved == pytest.approx({"a": 30.0, "b": 70.0}, abs=0.5)


def test_closed_loop_releases_when_the_neighbour_goes_idle() -> None:
    controllers: dict[str, Controller] = {}
    wants = {"a": 100.0, "b": 100.0}
    achieved = dict(wants)
    for step in range(12):
        if step == 6:
            wants["b"] = 0.0
        cards = [card(busy("a", 30, achieved["a"]), busy("b", 70, achieved["b"]))]
        plan = policy.plan_compute(cards, "work-conserving", controllers)
        controllers = dict(plan.controllers)
        achieved = {s: wants[s] * controllers[s].run_fraction for s in wants}
    assert not controllers["a"].throttled and achieved["a"] == 100.0


# -- actuator edges -------------------------------------------------------------------------


def _duty(fraction: float, offset: float) -> Duty:
    return Duty("a", "d0", 30, 30.0, 100.0, 30.0, fraction, offset)


def test_edges_without_wrap() -> None:
    assert policy.edges(_duty(0.3, 0.2)) == ((0.2, Edge.RESUME), (pytest.approx(0.5), Edge.STOP))


def test_edges_when_the_run_window_wraps() -> None:
    first, second = policy.edges(_duty(0.5, 0.8))
    assert first == (pytest.approx(0.3), Edge.STOP) and second == (0.8, Edge.RESUME)


@given(st.lists(st.floats(policy.MIN_RUN, policy.MAX_RUN), min_size=1, max_size=10))
def test_staggered_windows_tile_the_period(fractions: list[float]) -> None:
    duties = [Duty(f"s{i:02d}", "d0", 10, 10.0, 100.0, 10.0, f) for i, f in enumerate(fractions)]
    laid = policy.stagger(duties)
    expected = 0.0
    for duty in laid:
        assert duty.offset == pytest.approx(expected % 1.0)
        expected += duty.run_fraction
        (t1, _), (t2, _) = policy.edges(duty)
        assert 0.0 <= t1 <= t2 <= 1.0 + 1e-9
