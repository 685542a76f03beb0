"""The enforcer: policy decisions applied to real processes, and the duty-cycle actuator.

``step()`` runs after every sample (the daemon's sampler): memory, unsliced processes and
compute targets are decided by :mod:`agent.enforce.policy` and applied here. The compute
actuator, ``run_duty()``, is its own task: every ``period_s`` (100 ms, five times per
500 ms sample) it stops and resumes each throttled slice's processes at the edges of the
slice's run window. Both run on the event loop; signals are single syscalls, so no thread
is needed, and the two never interleave inside a method except at an ``await``, after
which every method re-checks what it holds.

Safety (DESIGN.md §5): a process is written to the stopped-process record
(:mod:`agent.core.stopped`, in the runtime directory, never blocked by the ledger's disk)
*before* it can first be stopped, and removed only after it has been resumed for good.
So whatever
ends the agent, the next start finds every process that may be stopped and resumes it
(``recover()``). Releasing a slice, unbinding a process and a clean stop resume at once.

A lent slice's job ends with its lease (``reconcile()``): when the slice ends — returned,
expired, reclaimed for local demand, freed by an operator — its processes (and the groups
they lead) get SIGTERM at once and SIGKILL after ``enforcement.grace_s``.

Size: each enforcement (memory, compute duty cycle, unsliced, host limits, lease ends,
driver limits) is a short method; together they share the held processes' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from agent.core import ladder
from agent.core.service import EnforcementNote, NodeService
from agent.enforce import actions, policy
from agent.enforce.actions import Target
from agent.errors import XpuError
from agent.model import DeviceSample, ProcessRef, SliceState

log = structlog.get_logger(__name__)

#: Duty-cycle period: much shorter than the sampling interval so a throttled process sees
#: a steady fraction within every sample, long enough that signalling stays cheap.
DUTY_PERIOD_S = 0.1


@dataclass(slots=True)
class _Held:
    """A throttled slice as the actuator sees it."""

    duty: policy.Duty
    members: dict[ProcessRef, Target] = field(default_factory=dict)
    #: Members (with their groups) moved into the slice's cgroup: frozen, not signalled.
    frozen: set[ProcessRef] = field(default_factory=set)
    stopped: bool = False


class Enforcer:
    def __init__(
        self,
        service: NodeService,
        period_s: float = DUTY_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.period_s = period_s
        self._clock = clock
        self._controllers: dict[str, policy.Controller] = {}
        self._memory = policy.MemoryState()
        self._unsliced_seen: frozenset[ProcessRef] = frozenset()
        self._unsliced_reported: frozenset[ProcessRef] = frozenset()
        self._held: dict[str, _Held] = {}
        self._unmark: set[ProcessRef] = set()
        self._wake = asyncio.Event()
        self.signals_sent = 0
        self._cgroups = actions.CgroupTree.open(service.config.enforcement.cgroup_root)
        #: Slices whose cgroup carries host limits, and the processes moved into it.
        self._limited: dict[str, set[ProcessRef]] = {}
        #: Live lent slices and their processes as last seen: their job ends with them.
        self._lent: dict[str, tuple[ProcessRef, ...]] = {
            s.id: s.processes for s in service.live.values() if s.borrower is not None
        }
        #: Processes of ended leases, sent SIGTERM: (slice, when SIGKILL follows).
        self._ending: dict[ProcessRef, tuple[str, float]] = {}
        #: Ended leases whose job was signalled, not yet recorded as an event.
        self._ended: list[tuple[str, list[int]]] = []
        #: Slices whose memory the driver limits (rung nvml-limits): (device, cgroup path)
        #: and the processes moved there; slices whose limit could not be set or read back.
        self._driver_limited: dict[str, tuple[str, str, set[ProcessRef]]] = {}
        self._driver_failed: set[str] = set()
        #: Driver limits of ended slices still to clear: (slice, device, cgroup path).
        self._driver_clear: list[tuple[str, str, str]] = []
        #: What it last did per slice: its own record, which the service shows.
        self.notes: dict[str, EnforcementNote] = {}
        service.notes = self.notes
        service.on_change(self.reconcile)

    # -- lifecycle ------------------------------------------------------------------------

    async def recover(self) -> int:
        """At start: resume every process a previous run may have left stopped."""
        resumed = []
        for ref, slice_id in await self.service.stopped_processes():
            if actions.resume_once(ref):
                resumed.append(ref.pid)
                log.warning("resumed a process left stopped", pid=ref.pid, slice=slice_id)
            await self.service.mark_stopped(ref, slice_id, False)
        thawed = self._cgroups.thaw_all() if self._cgroups is not None else []
        if thawed:
            log.warning("thawed slice cgroups left frozen", slices=thawed)
        if resumed or thawed:
            await self.service.record("enforce.recovered", {"pids": resumed, "cgroups": thawed})
        return len(resumed) + len(thawed)

    async def shutdown(self) -> None:
        """On stop: resume everything held, then clear their records."""
        for slice_id in list(self._held):
            self._drop(slice_id)
        await self._flush_unmarks()

    async def release(self, slice_id: str) -> None:
        """Resume a slice's processes now (its slice ended or it must not be enforced)."""
        self._drop(slice_id)
        await self._flush_unmarks()

    def reconcile(self) -> None:
        """``NodeService.on_change``: a slice that ended (released, expired, lost) or a
        process that was unbound is resumed at once, before the API call returns."""
        live = self.service.live
        for slice_id in [s for s in self.notes if s not in live]:
            del self.notes[slice_id]
        for slice_id in [s for s in self._driver_limited if s not in live]:
            device, where, _ = self._driver_limited.pop(slice_id)
            self._driver_clear.append((slice_id, device, where))
        self._driver_failed &= set(live)
        for slice_id in [s for s in self._limited if s not in live]:
            del self._limited[slice_id]
            if self._cgroups is not None and slice_id not in self._held:
                self._cgroups.dissolve(slice_id)
        for slice_id, held in list(self._held.items()):
            slice_ = live.get(slice_id)
            if slice_ is None or slice_.state is not SliceState.ACTIVE:
                self._drop(slice_id)
                continue
            bound = set(slice_.processes)
            for ref in [r for r in held.members if r not in bound]:
                self._let_go(slice_id, held, ref)
        self._end_leased_jobs()

    def _end_leased_jobs(self) -> None:
        """A lent slice that left the live set ended: SIGTERM its processes now."""
        live = self.service.live
        lent = {s.id: s.processes for s in live.values() if s.borrower is not None}
        deadline = self._clock() + self.service.config.enforcement.grace_s
        for slice_id, refs in self._lent.items():
            if slice_id in lent or not refs:
                continue
            signalled = [r for r in refs if actions.terminate(r, signal.SIGTERM)]
            for ref in signalled:
                self._ending[ref] = (slice_id, deadline)
            if signalled:
                self.signals_sent += len(signalled)
                self._ended.append((slice_id, [r.pid for r in signalled]))
                log.info("lease ended: its job too", slice=slice_id, pids=self._ended[-1][1])
        self._lent = lent

    async def _finish_leased_jobs(self) -> None:
        """SIGKILL what is left of an ended lease's job after the grace; record each end."""
        now = self._clock()
        for ref, (slice_id, deadline) in list(self._ending.items()):
            if not actions.matches(ref):
                del self._ending[ref]
            elif now >= deadline:
                del self._ending[ref]
                if actions.terminate(ref, signal.SIGKILL):
                    self.signals_sent += 1
                    log.warning(
                        "lease's job outlived the grace: killed", slice=slice_id, pid=ref.pid
                    )
        while self._ended:
            slice_id, pids = self._ended.pop(0)
            reason = None
            with contextlib.suppress(XpuError):
                reason = (await self.service.get(slice_id)).end_reason
            await self.service.record(
                "enforce.lease_ended", {"pids": pids, "reason": reason, "signal": "TERM"}, slice_id
            )

    # -- the sample step ------------------------------------------------------------------

    async def step(self, samples: Mapping[str, DeviceSample]) -> None:
        """After each sample: memory first (a hog must go before anything else), then
        unsliced processes, then compute targets for the actuator. The configuration is
        read here each time, so a reload (SIGHUP) applies at the next sample."""
        config = self.service.config.enforcement
        now = self._clock()
        cards = policy.gather(self.service.live.values(), self.service.matched(samples))

        verdicts, self._memory = policy.decide_memory(
            cards, config.memory_action, config.grace_s, self._memory, now
        )
        for verdict in verdicts:
            await self._act_memory(verdict)
        self._limit_host()
        await self._limit_device_memory()

        before = self._unsliced_seen
        doomed, self._unsliced_seen = policy.decide_unsliced(cards, config.unsliced, before)
        for unsliced in doomed:
            await self._kill_unsliced(unsliced)
        fresh = (
            policy.newly_unsliced(cards, before, self._unsliced_reported)
            if config.unsliced == "report"
            else []
        )
        for report in fresh:
            data = {
                "pid": report.ref.pid,
                "device": report.device,
                "action": "report",
                "memory_mib": _round(report.memory_mib),
            }
            await self.service.record("enforce.unsliced", data)
        # Remember reports only while their process is still seen: one per process life.
        reported = self._unsliced_reported | {r.ref for r in fresh}
        self._unsliced_reported = reported & self._unsliced_seen

        plan = policy.plan_compute(cards, config.compute_policy, self._controllers)
        self._controllers = dict(plan.controllers)
        await self._apply(plan)
        await self._flush_unmarks()
        await self._finish_leased_jobs()

    async def _act_memory(self, verdict: policy.MemoryVerdict) -> None:
        action = verdict.action
        if action is policy.MemoryAction.TERM:
            sent = actions.signal_once(verdict.ref, signal.SIGTERM, then_continue=True)
        elif action is policy.MemoryAction.KILL:
            sent = actions.signal_once(verdict.ref, signal.SIGKILL)
        else:
            sent = True
        if not sent:
            return
        self.signals_sent += action is not policy.MemoryAction.REPORT
        data = {
            "action": action.value,
            "pid": verdict.ref.pid,
            "used_mib": _round(verdict.used_mib),
            "limit_mib": verdict.limit_mib,
            "process_mib": _round(verdict.process_mib),
            "escalated": verdict.escalated,
        }
        log.warning("slice over its memory", slice=verdict.slice_id, **data)
        self._note(verdict.slice_id, last_action=f"memory {action.value} pid {verdict.ref.pid}")
        await self.service.record("enforce.memory", data, verdict.slice_id)

    async def _kill_unsliced(self, verdict: policy.UnslicedVerdict) -> None:
        if not actions.signal_once(verdict.ref, signal.SIGKILL):
            return
        self.signals_sent += 1
        data = {
            "pid": verdict.ref.pid,
            "device": verdict.device,
            "action": "kill",
            "memory_mib": _round(verdict.memory_mib),
        }
        log.warning("killed an unsliced process", **data)
        await self.service.record("enforce.unsliced", data)

    async def _apply(self, plan: policy.ComputePlan) -> None:
        for slice_id in [s for s in self._held if s not in plan.duties]:
            last = self._held[slice_id].duty
            ctl = plan.controllers.get(slice_id)
            if ctl is not None:
                last = dataclasses.replace(last, demand_pct=ctl.demand_pct, run_fraction=1.0)
            self._drop(slice_id)
            await self._compute_event(last, "release")
        for slice_id, duty in plan.duties.items():
            existing = self._held.get(slice_id)
            if existing is None:
                self._held[slice_id] = _Held(duty)
                await self._compute_event(duty, "throttle")
            else:
                existing.duty = duty
            await self._enrol(slice_id)
        if self._held:
            self._wake.set()

    async def _enrol(self, slice_id: str) -> None:
        """Bring the slice's bound processes under the actuator, each recorded in the
        stopped-process record before it can be stopped; let go of those no longer bound."""
        slice_ = self.service.live.get(slice_id)
        held = self._held.get(slice_id)
        if slice_ is None or held is None:
            return
        for ref in [r for r in held.members if r not in slice_.processes]:
            self._let_go(slice_id, held, ref)
        for ref in slice_.processes:
            if ref in held.members:
                continue
            target = Target.open(ref)
            if target is None:
                continue
            await self.service.mark_stopped(ref, slice_id, True)
            # Re-check after the await: the slice may have been released meanwhile.
            held = self._held.get(slice_id)
            current = self.service.live.get(slice_id)
            if held is None or current is None or ref not in current.processes:
                target.close()
                self._unmark.add(ref)
                return
            held.members[ref] = target
            if self._cgroups is not None and target.group:
                moved = self._cgroups.place(slice_id, actions.group_members(ref.pid))
                if ref.pid in moved:
                    held.frozen.add(ref)

    def _let_go(self, slice_id: str, held: _Held, ref: ProcessRef) -> None:
        """One member leaves a slice that stays throttled (unbound, or exited)."""
        if ref in held.frozen and self._cgroups is not None:
            # Its group shares the slice's cgroup: dissolve it (thaws everyone, moves them
            # back) and let the remaining members fall back to signals.
            self._cgroups.dissolve(slice_id)
            held.frozen.clear()
            self._limited.pop(slice_id, None)  # limits and members are set again next sample
            self._driver_limited.pop(slice_id, None)
        self._resume(held.members.pop(ref))

    def _resume(self, target: Target) -> None:
        if target.resume():
            self.signals_sent += 1
        target.close()
        self._unmark.add(target.ref)

    def _limit_host(self) -> None:
        """Slices that hold host CPU or memory run in their own cgroup with ``cpu.max`` and
        ``memory.max`` (where the agent owns a tree with those controllers:
        :mod:`agent.core.host`); elsewhere they are accounted only."""
        if self._cgroups is None or not self.service.host_limits.enforced:
            return
        for slice_ in self.service.live.values():
            if not (slice_.cpu_milli or slice_.host_memory_mib) or not slice_.processes:
                continue
            if slice_.state is not SliceState.ACTIVE:
                continue
            adopted = self._limited.get(slice_.id)
            if adopted is None:
                if not self._cgroups.limit(slice_.id, slice_.cpu_milli, slice_.host_memory_mib):
                    continue
                adopted = self._limited[slice_.id] = set()
            for ref in slice_.processes:
                if ref not in adopted:
                    self._cgroups.place(slice_.id, actions.group_members(ref.pid))
                    adopted.add(ref)

    async def _limit_device_memory(self) -> None:
        """On cards whose rung is ``nvml-limits`` (agent.core.ladder), a slice with
        processes runs in its own cgroup, and the driver fails its allocations beyond the
        slice (``nvmlDeviceSetMemoryLimits_v1``); the limit is read back and compared. The
        sampling enforcement stays on underneath. Ended slices' limits are cleared (and
        their cgroup removed, which clears them too)."""
        service = self.service
        while self._driver_clear:
            slice_id, device, where = self._driver_clear.pop()
            backend = service.inventory.backend_of(device)
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.set_memory_limit(device, where, None)
            if self._cgroups is not None and slice_id not in self._held:
                self._cgroups.dissolve(slice_id)
        if self._cgroups is None or not any(
            r.name == ladder.NVML_LIMITS for r in service.rungs.values()
        ):
            return
        for slice_ in list(service.live.values()):
            rung = service.rungs.get(slice_.device)
            if (
                rung is None
                or rung.name != ladder.NVML_LIMITS
                or not slice_.processes
                or slice_.state is not SliceState.ACTIVE
                or slice_.id in self._driver_failed
            ):
                continue
            held = self._driver_limited.get(slice_.id)
            if held is None:
                await self._set_driver_limit(slice_.id, slice_.device, slice_.memory_mib)
                held = self._driver_limited.get(slice_.id)
                if held is None:
                    continue
            for ref in slice_.processes:
                if ref not in held[2]:
                    self._cgroups.place(slice_.id, actions.group_members(ref.pid))
                    held[2].add(ref)

    async def _set_driver_limit(self, slice_id: str, device: str, mib: int) -> None:
        assert self._cgroups is not None
        backend = self.service.inventory.backend_of(device)
        where = self._cgroups.device_memory_cgroup(slice_id)
        data: dict[str, object] = {"rung": ladder.NVML_LIMITS, "device": device, "limit_mib": mib}
        if backend is None or where is None:
            self._driver_failed.add(slice_id)
            await self.service.record("enforce.driver_limit", data | {"ok": False}, slice_id)
            return
        try:
            read = await backend.set_memory_limit(device, str(where), mib)
        except Exception as exc:  # the driver refused: the sampling backstop holds it
            self._driver_failed.add(slice_id)
            log.warning("driver memory limit not set", slice=slice_id, error=str(exc))
            data |= {"ok": False, "error": str(exc)[:300]}
            await self.service.record("enforce.driver_limit", data, slice_id)
            return
        ok = read.hard_mib == mib
        self._driver_limited[slice_id] = (device, str(where), set())
        if not ok:
            self._driver_failed.add(slice_id)
            log.warning("driver memory limit reads back wrong", slice=slice_id, read=read.hard_mib)
        await self.service.record(
            "enforce.driver_limit", data | {"ok": ok, "read_back_mib": read.hard_mib}, slice_id
        )

    def _drop(self, slice_id: str) -> None:
        held = self._held.pop(slice_id, None)
        if held is None:
            return
        if held.frozen and self._cgroups is not None:
            self._cgroups.dissolve(slice_id)
            self._limited.pop(slice_id, None)  # limits and members are set again next sample
            self._driver_limited.pop(slice_id, None)
        for target in held.members.values():
            self._resume(target)
        self._controllers.pop(slice_id, None)
        self._note(slice_id, throttled=False)

    async def _flush_unmarks(self) -> None:
        while self._unmark:
            ref = self._unmark.pop()
            await self.service.mark_stopped(ref, None, False)

    async def _compute_event(self, duty: policy.Duty, what: str) -> None:
        data = {
            "action": what,
            "quota_pct": duty.quota_pct,
            "target_pct": _round(duty.target_pct),
            "demand_pct": _round(duty.demand_pct),
            "used_pct": _round(duty.used_pct),
            "run_fraction": round(duty.run_fraction, 3),
            "policy": self.service.config.enforcement.compute_policy,
        }
        log.info("compute " + what, slice=duty.slice_id, **data)
        self._note(duty.slice_id, throttled=what == "throttle", last_action=f"compute {what}")
        await self.service.record("enforce.compute", data, duty.slice_id)

    def _note(
        self, slice_id: str, *, throttled: bool | None = None, last_action: str | None = None
    ) -> None:
        """Telemetry: ``throttled`` and ``last_action`` of the slice (``notes``)."""
        if slice_id not in self.service.live:
            return
        note = self.notes.get(slice_id, EnforcementNote())
        if throttled is not None:
            note = dataclasses.replace(note, throttled=throttled)
        if last_action is not None:
            note = dataclasses.replace(note, last_action=last_action)
        self.notes[slice_id] = note

    # -- the actuator ---------------------------------------------------------------------

    async def run_duty(self) -> None:
        """Stop and resume throttled slices at their edges, period after period. Idle (no
        throttled slice) it sleeps on an event instead of ticking."""
        loop = asyncio.get_running_loop()
        period_start = loop.time()
        while True:
            if not self._held:
                self._wake.clear()
                await self._wake.wait()
                period_start = loop.time()
            plan = sorted(
                (at, edge.value, slice_id)
                for slice_id, held in self._held.items()
                for at, edge in policy.edges(held.duty)
            )
            for at, what, slice_id in plan:
                delay = period_start + at * self.period_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                held = self._held.get(slice_id)
                if held is not None:
                    self._actuate(held, stop=what == policy.Edge.STOP.value)
            period_start += self.period_s
            now = loop.time()
            period_start = max(period_start, now)  # fell behind (a busy loop): skip, never burst
            await asyncio.sleep(period_start - now)

    def _actuate(self, held: _Held, *, stop: bool) -> None:
        if held.frozen and self._cgroups is not None:
            self._cgroups.freeze(held.duty.slice_id, stop)
        for ref, target in held.members.items():
            if ref in held.frozen:
                continue
            done = target.stop() if stop else target.resume()
            self.signals_sent += done
        held.stopped = stop

    # -- introspection (tests, benchmarks) ------------------------------------------------

    def held(self) -> dict[str, float]:
        """Throttled slices and their run fractions."""
        return {s: h.duty.run_fraction for s, h in self._held.items()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
