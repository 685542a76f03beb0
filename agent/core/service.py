"""The node service: the one core that the API, the bus and the CLI are interfaces over.

It owns the ledger through a single worker thread (SQLite commits fsync and must not run
on the event loop; one thread also serialises writers, so placement and insert are atomic)
and keeps an in-memory copy of the live slices for fast reads.

Size: the one way in — every operation the interfaces offer is a method here; the
logic lives in the small modules it calls (capacity, matching, preempt, ladder, host,
placement), so the methods stay short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from agent import placement
from agent.config import DEFAULT_MPS_PIPES, Config
from agent.core import ladder, matching, preempt, procs
from agent.core.caller import Caller, require_owner, require_process_owner
from agent.core.capacity import CardUse, Totals, card_uses, idle_lendable, totals
from agent.core.events import EventHub
from agent.core.host import HostLimits, host_capacity, host_limits
from agent.core.inventory import Inventory, InventoryChange
from agent.core.matching import Matched
from agent.core.pool import PeerCards, PeerStates, PlacedCandidate, place_across
from agent.core.slice_env import slice_environment
from agent.core.stopped import StoppedRecord
from agent.errors import (
    BadRequest,
    Conflict,
    DoesNotFit,
    LedgerUnavailable,
    NotFound,
    StorageFull,
    XpuError,
)
from agent.ledger.store import LIVE_STATES, DeviceCapacity, Ledger
from agent.ledger.worker import LedgerWorker
from agent.model import (
    Device,
    DeviceSample,
    Event,
    Health,
    Lease,
    LeaseState,
    ProcessRef,
    Slice,
    SliceRequest,
    SliceState,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SliceUsage:
    """What a slice's processes used in the last sample (the service is its one writer)."""

    memory_used_mib: float = 0.0
    compute_used_pct: float = 0.0
    last_active_at: float | None = None


@dataclass(frozen=True, slots=True)
class EnforcementNote:
    """What the enforcer last did to a slice (the enforcer is its one writer)."""

    throttled: bool = False
    last_action: str | None = None


class NodeService:
    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        ledger: Ledger,
        hub: EventHub,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.hub = hub
        self.clock = clock
        self.started_at = clock()
        self._ledger = ledger
        self._worker = LedgerWorker(ledger)
        self._stopped = StoppedRecord(Path(config.paths.runtime_dir))
        self._live: dict[str, Slice] = {}
        self.usage: dict[str, SliceUsage] = {}
        #: The enforcer's record of what it did per slice, read here by the interfaces; the
        #: enforcer hands its own mapping over (:class:`agent.enforce.loop.Enforcer`).
        self.notes: Mapping[str, EnforcementNote] = {}
        self.unsliced: dict[str, tuple[int, ...]] = {}
        self._on_change: list[Callable[[], None]] = []
        #: Bumped on every change of the live slices (keys the matching cache).
        self._generation = 0
        self._matched: (
            tuple[tuple[DeviceSample, ...], int, dict[str, tuple[Matched, ...]]] | None
        ) = None
        #: The one scorer behind every placement decision of this node (see agent.placement).
        self.placer = placement.Placer(config.slicing.placement)
        #: Host CPU and memory slices may hold (the node's less the system reserve).
        self.host = host_capacity(config)
        #: Whether the host limits are enforced (a delegated cgroup tree) or only accounted.
        self.host_limits: HostLimits = host_limits(config.enforcement.cgroup_root)
        #: The enforcement rung holding each card (agent.core.ladder), probed on discovery.
        self.rungs: dict[str, ladder.Rung] = {}
        self._peer_states = PeerStates()

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the ledger thread (group-committed with whatever else is queued).
        Shielded: once queued, a write completes even if the request that asked for it is
        cancelled, so the cache stays true."""
        return await asyncio.shield(self._worker.submit(fn))

    def _refresh(self) -> list[Slice]:
        """Ledger thread: reload the live slices after a mutation."""
        return self._ledger.live()

    def _apply(self, live: list[Slice], events: Iterable[Event | None]) -> None:
        self._live = {s.id: s for s in live}
        self._publish(events)

    def _apply_delta(
        self,
        upsert: Iterable[Slice] = (),
        remove: Iterable[str] = (),
        events: Iterable[Event | None] = (),
    ) -> None:
        """The hot paths (allocate, release) change one slice: update the cache in place
        instead of reloading every live slice. Ledger results settle on the loop in the
        order the ledger ran them, so deltas and full reloads apply in that order."""
        for slice_ in upsert:
            self._live[slice_.id] = slice_
        for slice_id in remove:
            self._live.pop(slice_id, None)
        self._publish(events)

    def _publish(self, events: Iterable[Event | None]) -> None:
        self._generation += 1
        real = [e for e in events if e is not None]
        if real:
            self.hub.publish(real)
        for callback in self._on_change:
            callback()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Called (on the loop) after any change of slices or devices: the bus debounces."""
        self._on_change.append(callback)

    async def open(self) -> None:
        live = await self._run(self._refresh)
        self._apply(live, ())

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.close)

    async def record(
        self, kind: str, data: Mapping[str, object], slice_id: str | None = None
    ) -> Event | None:
        """Record an event. Best effort while the ledger cannot commit: what is being done
        (enforcement above all) goes on without its record, and the log says so."""
        try:
            event = await self._run(lambda: self._ledger.record_event(kind, data, slice_id))
        except (StorageFull, LedgerUnavailable) as exc:
            log.warning("event not recorded", kind=kind, slice=slice_id, error=exc.detail)
            return None
        self.hub.publish([event])
        return event

    # -- reads ----------------------------------------------------------------------------

    @property
    def live(self) -> Mapping[str, Slice]:
        return self._live

    def device(self, device_id: str) -> Device:
        device = self.inventory.devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def bound_pids(self) -> dict[str, frozenset[int]]:
        bound: dict[str, set[int]] = {}
        for s in self._live.values():
            bound.setdefault(s.device, set()).update(p.pid for p in s.processes)
        return {d: frozenset(p) for d, p in bound.items()}

    def env(self, slice_: Slice) -> dict[str, str]:
        nvidia = self.config.enforcement.nvidia
        pipes = nvidia.mps_pipe_directory if nvidia.mps == "external" else DEFAULT_MPS_PIPES
        if nvidia.mps == "managed":
            pipes = str(ladder.mps_pipe_dir(self.config.paths.runtime_dir, slice_.device))
        return slice_environment(
            slice_,
            self.inventory.devices.get(slice_.device),
            nvidia.hami_core,
            "" if pipes == DEFAULT_MPS_PIPES else pipes,
        )

    async def get(self, slice_id: str) -> Slice:
        found = self._live.get(slice_id)
        if found is not None:
            return found
        return await self._run(lambda: self._ledger.get(slice_id))

    async def slices(self, history: bool = False) -> list[Slice]:
        live = sorted(self._live.values(), key=lambda s: (s.created_at, s.id))
        if not history:
            return live
        since = self.clock() - self.config.slicing.history_s
        old = await self._run(lambda: self._ledger.history(since))
        return live + old

    async def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        return await self._run(lambda: self._ledger.events(after, limit))

    def card_uses(self) -> dict[str, CardUse]:
        """Every card with its live slices: the one count of allocated and free capacity
        (placement, the capacity message, the API and the metrics all read it)."""
        return card_uses(
            self.inventory.devices.values(),
            self._live.values(),
            self.config.slicing.max_slices_per_device,
        )

    def card_states(self) -> list[placement.CardState]:
        """Free capacity per device as placement sees it."""
        return [
            placement.CardState(
                id=use.device.id,
                memory_total_mib=use.device.memory_total_mib,
                memory_free_mib=use.memory_free_mib,
                compute_free_pct=use.compute_free_pct,
                slices=len(use.slices),
                max_slices=use.max_slices,
                model=use.device.model,
                node=self.config.node_name,
                healthy=use.usable and not use.device.hardware_partitions,
            )
            for use in self.card_uses().values()
        ]

    def host_free(self) -> tuple[int, int]:
        """Host CPU (milli) and memory (MiB) not held by live slices."""
        cpu = sum(s.cpu_milli for s in self._live.values())
        memory = sum(s.host_memory_mib for s in self._live.values())
        return self.host.cpu_milli - cpu, self.host.memory_mib - memory

    def node_state(self, cards: Sequence[placement.CardState] | None = None) -> placement.NodeState:
        """This node as placement sees it (``cards``: these instead of the current ones)."""
        cpu, memory = self.host_free()
        return placement.NodeState(
            self.config.node_name,
            tuple(self.card_states() if cards is None else cards),
            cpu_free_milli=cpu,
            memory_free_mib=memory,
        )

    def placement_request(self, request: SliceRequest) -> placement.Request:
        """A (normalised) slice request as placement sees it."""
        return placement.Request(
            placement.Demand(request.memory_mib, request.compute_pct),
            models=request.models,
            cpu_milli=request.cpu_milli,
            memory_mib=request.host_memory_mib,
        )

    def place(
        self,
        request: SliceRequest,
        peers: Sequence[PeerCards] = (),
        limit: int = 10,
        local: bool = True,
        among: Collection[str] | None = None,
    ) -> list[PlacedCandidate]:
        """Where ``request`` would go, best first: cards of this node (``local``) and of the
        placeable ``peers`` (the whole placeable pool, or nothing; ``among``: rank only
        these of them), scored by the same placer as a local allocation. Asking is not
        requesting: the placer's history is not changed."""
        wanted = self.placement_request(self.normalise(request))
        states = self._peer_states.states(peers) if peers else []
        supply = self._peer_states.supply if peers else placement.Supply()
        if among is not None:
            states = [s for s in states if s.id in among]
        here = self.node_state() if local else None
        if here is not None:
            supply = supply + placement.supply_of([here])
        self.placer.set_supply(supply)
        return place_across(self.placer, wanted, here, states, limit)

    def unprepared_peers(self, peers: Sequence[PeerCards]) -> list[PeerCards]:
        """Those of ``peers`` that :meth:`place` would have to convert first."""
        return self._peer_states.unprepared(peers)

    def prepare_peers(self, peers: Sequence[PeerCards]) -> None:
        """Convert ``peers`` for :meth:`place` ahead of time (a background task does, a
        few at a time, as news of them arrives)."""
        self._peer_states.prepare(peers)

    def health(self) -> tuple[str, list[str]]:
        """``ok`` or ``degraded``, with why: the one place health is decided."""
        reasons: list[str] = []
        if not self.inventory.discovered:
            reasons.append("device discovery has not finished")
        elif not self.inventory.devices:
            reasons.append("no devices found")
        for device in self.inventory.devices.values():
            if device.health is not Health.OK:
                why = f": {device.health_reason}" if device.health_reason else ""
                reasons.append(f"{device.id} is {device.health.value}{why}")
        reasons += self.degraded_reasons()
        return ("degraded" if reasons else "ok"), reasons

    def degraded_reasons(self) -> list[str]:
        """Reasons of the service itself (not its devices) to be degraded."""
        why = self._worker.unwritable
        return [f"ledger cannot commit: {why}"] if why else []

    @property
    def ledger_writable(self) -> bool:
        return self._worker.unwritable is None

    async def probe_ledger(self) -> bool:
        """Try one durable write; True once the ledger commits again."""
        with contextlib.suppress(XpuError):
            await asyncio.shield(self._worker.probe())
        return self._worker.unwritable is None

    def totals(self) -> tuple[Totals, Totals]:
        """(capacity, allocated) over usable devices."""
        return totals(self.card_uses())

    def lendable(self) -> Totals:
        """Lendable now: unallocated capacity plus what is left of the idle ``lend=true``
        slices (:meth:`idle_lendable`). Slots are the free ones only."""
        capacity, allocated = self.totals()
        memory = capacity.memory_mib - allocated.memory_mib
        compute = capacity.compute_pct - allocated.compute_pct
        for _, memory_left, compute_left in self.idle_lendable():
            memory += memory_left
            compute += compute_left
        return Totals(memory, compute, capacity.slices - allocated.slices)

    def idle_lendable(self) -> list[tuple[Slice, int, int]]:
        """Idle ``lend=true`` slices with what is left of their share (agent.core.capacity)."""
        return idle_lendable(
            self._live.values(),
            {k: u.last_active_at for k, u in self.usage.items()},
            self.clock() - self.config.pool.idle_after_s,
        )

    # -- allocation -----------------------------------------------------------------------

    def normalise(self, request: SliceRequest) -> SliceRequest:
        step = self.config.slicing.compute_step_pct
        if request.memory_mib <= 0:
            raise BadRequest("memory_mib must be positive")
        if not 1 <= request.compute_pct <= 100:
            raise BadRequest("compute_pct must be 1..100")
        if request.ttl_s is not None and request.ttl_s <= 0:
            raise BadRequest("ttl_s must be positive")
        if request.cpu_milli < 0 or request.host_memory_mib < 0:
            raise BadRequest("cpu_milli and host_memory_mib must not be negative")
        compute = placement.round_up_compute(request.compute_pct, step)
        return dataclasses.replace(request, compute_pct=compute)

    async def allocate(self, caller: Caller, request: SliceRequest) -> tuple[Slice, bool]:
        """Allocate a slice for ``caller``. Returns (slice, created)."""
        if request.owner_uid != caller.uid and not caller.admin:
            raise BadRequest("owner is the caller")
        request = self.normalise(request)
        if request.device is not None:
            device = self.device(request.device)
            if device.health is not Health.OK:
                raise DoesNotFit(f"device {device.id} is {device.health}: {device.health_reason}")
        now = self.clock()
        wanted = self.placement_request(request)

        def choose() -> list[str]:
            """Cards to try, best first: ranked here on the loop (the placer has one owner);
            the ledger re-checks capacity, so a card taken meanwhile is only skipped."""
            if request.lent_from is not None and request.device is not None:
                return [request.device]  # an idle slice's share: the ledger checks that
            pool = [c for c in self.card_states() if request.device in (None, c.id)]
            here = self.node_state(pool)
            ranked = self.placer.rank_cards(here, wanted)
            if not ranked:
                short = placement.short_of(here, wanted)
                if short is not None and short.startswith("host"):
                    raise DoesNotFit(
                        f"does not fit on this node's {short} (after the system reserve)",
                        short="host_cpu" if short.startswith("host CPU") else "host_memory",
                    )
                raise self._refusal(pool, request)
            return [c.devices[0] for c in ranked]

        def work(ranked: list[str]) -> tuple[Slice, Event | None]:
            last: DoesNotFit | None = None
            for device_id in ranked:
                device = self.inventory.devices[device_id]
                capacity = DeviceCapacity(
                    device.memory_total_mib, 100, self.config.slicing.max_slices_per_device
                )
                try:
                    slice_, event = self._ledger.allocate(
                        device.id, capacity, request, now, self.host
                    )
                except DoesNotFit as exc:
                    last = exc
                    continue
                return slice_, event
            assert last is not None
            raise last

        # A repeated request_id must return the same slice even if the node is full now.
        if request.request_id is not None:
            existing = next(
                (
                    s
                    for s in self._live.values()
                    if s.request_id == request.request_id and s.owner_uid == request.owner_uid
                ),
                None,
            )
            if existing is not None:
                return existing, False
        self.placer.observe(wanted)
        try:
            ranked = choose()
            slice_, event = await self._run(lambda: work(ranked))
        except DoesNotFit as exc:
            # Local requests come first: lent slices are preemptible (DESIGN.md §6). Only
            # for room on a card: reclaiming (which frees cards) cannot cure a short host.
            if (
                request.borrower is not None
                or "short" in exc.extra
                or not await self._reclaim_lent(request, wanted)
            ):
                raise
            ranked = choose()
            slice_, event = await self._run(lambda: work(ranked))
        self._apply_delta(upsert=[slice_], events=[event])
        if event is not None:
            log.debug("slice allocated", slice=slice_.id, device=slice_.device, uid=caller.uid)
        return slice_, event is not None

    async def _reclaim_lent(self, request: SliceRequest, wanted: placement.Request) -> bool:
        """End the lent slices (lowest priority first) that make ``request`` fit; False
        when reclaiming cannot help. The lender tells the borrowers (agent.bus.lender)."""
        victims = preempt.plan(
            self.node_state(), self._live.values(), wanted, self.placer, request.device
        )
        agent = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), admin=True)
        for slice_id in victims:
            borrower = self._live[slice_id].borrower
            why = "local demand"  # what the borrower is told (a notice carries it)
            with contextlib.suppress(NotFound):
                await self.release(agent, slice_id, SliceState.RELEASED, why)
                log.info("lent slice reclaimed", slice=slice_id, borrower=borrower)
        return bool(victims)

    def _refusal(self, states: Sequence[placement.CardState], request: SliceRequest) -> DoesNotFit:
        usable = [c for c in states if c.healthy]
        if not usable:
            return DoesNotFit("no usable device on this node", request=request.device)
        if request.models:
            usable = [c for c in usable if placement.model_matches(c.model, request.models)]
            if not usable:
                wanted = "|".join(sorted(request.models))
                return DoesNotFit(f"no {wanted} card on this node", request=request.device)
        roomiest = max(usable, key=lambda c: (c.compute_free_pct, c.memory_free_mib))
        return DoesNotFit(
            f"{request.memory_mib} MiB / {request.compute_pct} % does not fit on any device; "
            f"most room: {roomiest.id} with {roomiest.memory_free_mib} MiB and "
            f"{roomiest.compute_free_pct} % free, {roomiest.max_slices - roomiest.slices} slot(s)",
            most_room={
                "device": roomiest.id,
                "memory_free_mib": roomiest.memory_free_mib,
                "compute_free_pct": roomiest.compute_free_pct,
                "slots_free": roomiest.max_slices - roomiest.slices,
            },
        )

    async def release(
        self,
        caller: Caller,
        slice_id: str,
        state: SliceState = SliceState.RELEASED,
        reason: str = "",
    ) -> Slice:
        current = await self.get(slice_id)
        require_owner(caller, current, "release")
        if current.state.value not in LIVE_STATES:
            return current  # released already: a retried DELETE is answered, not refused
        why = reason or f"released by {caller.name}"
        now = self.clock()
        try:
            ended, event = await self._run(lambda: self._ledger.end(slice_id, state, why, now))
        except Conflict:
            return await self.get(slice_id)  # ended meanwhile by another caller
        self._apply_delta(remove=[slice_id], events=[event])
        self.usage.pop(slice_id, None)
        log.debug("slice ended", slice=slice_id, state=state.value, reason=why)
        return ended

    async def renew(self, slice_id: str, ttl_s: float) -> Slice:
        expires = self.clock() + ttl_s

        def work() -> tuple[Slice, list[Slice]]:
            return self._ledger.extend(slice_id, expires), self._ledger.live()

        renewed, live = await self._run(work)
        self._apply(live, ())
        return renewed

    async def expire_due(self) -> list[str]:
        now = self.clock()

        def work() -> tuple[list[Event], list[Slice]]:
            events = []
            for slice_id in self._ledger.expired(now):
                events.append(self._ledger.end(slice_id, SliceState.EXPIRED, "ttl lapsed", now)[1])
            return events, self._ledger.live()

        events, live = await self._run(work)
        if events:
            self._apply(live, events)
        return [e.slice_id for e in events if e.slice_id]

    async def forget_history(self) -> int:
        before = self.clock() - self.config.slicing.history_s
        return await self._run(lambda: self._ledger.forget_history(before))

    # -- leases borrowed from peers (the bus's borrower keeps them here) -----------------

    async def keep_lease(self, lease: Lease) -> None:
        await self._run(lambda: self._ledger.keep_lease(lease))

    async def lease_renewed(self, slice_id: str, expires_at: float) -> None:
        await self._run(lambda: self._ledger.lease_renewed(slice_id, expires_at))

    async def end_lease(self, slice_id: str, state: LeaseState, reason: str) -> Lease | None:
        now = self.clock()
        return await self._run(lambda: self._ledger.end_lease(slice_id, state, reason, now))

    async def leases(self, active_only: bool = True) -> list[Lease]:
        return await self._run(lambda: self._ledger.leases(active_only))

    async def lease(self, slice_id: str) -> Lease | None:
        return await self._run(lambda: self._ledger.lease(slice_id))

    # -- binding --------------------------------------------------------------------------

    async def process_of(self, caller: Caller) -> ProcessRef:
        """The calling process itself (its pid from ``SO_PEERCRED``), start time included."""
        return (await asyncio.to_thread(procs.inspect, caller.pid)).ref

    @staticmethod
    def holds_token(slice_: Slice, token: str | None) -> bool:
        """Whether ``token`` is the slice's capability (constant-time)."""
        return token is not None and secrets.compare_digest(slice_.token, token)

    async def bind(
        self,
        caller: Caller,
        slice_id: str,
        pid: int,
        how: str = "api",
        token: str | None = None,
    ) -> Slice:
        """Bind ``pid`` (the caller's own process) to a slice of the caller's, or to any
        slice whose token the caller presents: the token is how a job dispatched from a
        borrower binds to the slice lent to it (it grants that slice alone)."""
        current = await self.get(slice_id)
        if not self.holds_token(current, token):
            require_owner(caller, current, "bind to")
        if current.state is not SliceState.ACTIVE:
            raise NotFound(f"slice {slice_id} is {current.state}")
        info = await asyncio.to_thread(procs.inspect, pid)
        require_process_owner(caller, pid, info.uid)
        return await self._bind(slice_id, info.ref, how)

    async def _bind(self, slice_id: str, ref: ProcessRef, how: str) -> Slice:
        def work() -> tuple[Event | None, list[Slice]]:
            # Re-check identity right before recording it: the pid may have been recycled.
            if not procs.still_same(ref):
                raise NotFound(f"process {ref.pid} exited")
            return self._ledger.bind(slice_id, ref, how), self._ledger.live()

        event, live = await self._run(work)
        self._apply(live, [event])
        await self._reclaim_share(slice_id)
        return self._live[slice_id]

    async def _reclaim_share(self, slice_id: str) -> None:
        """The owner of an idle ``lend=true`` slice uses it again: what was lent out of it
        ends at once (its jobs are ended by the enforcer; the borrowers are told)."""
        lent = [s.id for s in self._live.values() if s.lent_from == slice_id]
        agent = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), admin=True)
        for lent_id in lent:
            with contextlib.suppress(NotFound):
                await self.release(
                    agent, lent_id, SliceState.RELEASED, f"the owner of {slice_id} is back"
                )
                log.info("lent share reclaimed", slice=lent_id, owner_slice=slice_id)

    async def unbind(self, caller: Caller, slice_id: str, pid: int) -> Slice:
        current = await self.get(slice_id)
        require_owner(caller, current, "unbind from")

        def work() -> tuple[Event, list[Slice]]:
            return self._ledger.unbind(slice_id, pid, f"by {caller.name}"), self._ledger.live()

        event, live = await self._run(work)
        self._apply(live, [event])
        return self._live.get(slice_id) or await self.get(slice_id)

    # -- observing devices ----------------------------------------------------------------

    async def probe_enforcement(self, device_ids: Iterable[str]) -> None:
        """Choose each card's enforcement rung by probing what it and its driver support."""
        for device_id in device_ids:
            device = self.inventory.devices.get(device_id)
            if device is None:
                continue
            backend = self.inventory.backend_of(device_id)
            rung = await ladder.probe(device, backend, self.config)
            if self.rungs.get(device_id) != rung:
                self.rungs[device_id] = rung
                log.info(
                    "enforcement rung", device=device_id, rung=rung.name, refused=dict(rung.refused)
                )

    async def observe_inventory(self, change: InventoryChange) -> None:
        """Slices on a lost card go ``lost``; they come back when the card does. New cards
        get their enforcement rung."""
        if change.added:
            await self.probe_enforcement(change.added)
        lost = [s.id for s in self._live.values() if s.device in change.lost]
        back = [s.id for s in self._live.values() if s.device in change.returned]
        if not lost and not back:
            if change.added:
                self._apply(list(self._live.values()), ())
            return
        for device_id in change.lost:
            log.warning("device lost", device=device_id)
        devices = self.inventory.devices

        def work() -> tuple[list[Event], list[Slice]]:
            events = self._ledger.set_lost(lost, True, "device lost") if lost else []
            if back:
                events += self._ledger.set_lost(back, False, "device returned")
            for device_id in change.lost:
                reason = devices[device_id].health_reason or "lost"
                events.append(
                    self._ledger.record_event(
                        "device.lost", {"device": device_id, "reason": reason}
                    )
                )
            for device_id in change.returned:
                events.append(self._ledger.record_event("device.returned", {"device": device_id}))
            return events, self._ledger.live()

        events, live = await self._run(work)
        self._apply(live, events)

    def matched(self, samples: Mapping[str, DeviceSample]) -> dict[str, tuple[Matched, ...]]:
        """Sampled processes matched to live slices (:mod:`agent.core.matching`), once per
        sample and state of the slices: the usage figures and the enforcer share it."""
        taken = tuple(samples.values())  # held, so that identity means "this very sample"
        cached = self._matched
        if (
            cached is None
            or cached[1] != self._generation
            or len(cached[0]) != len(taken)
            or any(a is not b for a, b in zip(cached[0], taken, strict=True))
        ):
            cached = self._matched = (
                taken,
                self._generation,
                matching.match(self._live.values(), samples),
            )
        return cached[2]

    async def observe_samples(self, samples: Mapping[str, DeviceSample]) -> None:
        """Bind token-carrying processes, forget exited ones, account per-slice use."""
        now = self.clock()
        unsliced: dict[str, tuple[int, ...]] = {}
        per_slice: dict[str, list[float]] = {}
        unknown: list[tuple[str, int]] = []
        for device_id, found in self.matched(samples).items():
            loose = []
            for m in found:
                proc = m.process
                if m.slice is None:
                    loose.append(proc.pid)
                    unknown.append((device_id, proc.pid))
                    continue
                acc = per_slice.setdefault(m.slice.id, [0.0, 0.0])
                acc[0] += proc.memory_mib or 0.0
                acc[1] += proc.utilisation_pct or 0.0
            unsliced[device_id] = tuple(loose)
        for slice_id in self._live:
            memory, compute = per_slice.get(slice_id, [0.0, 0.0])
            old = self.usage.get(slice_id, SliceUsage())
            active = old.last_active_at
            if compute >= 1.0 or active is None:
                active = now
            self.usage[slice_id] = dataclasses.replace(
                old, memory_used_mib=memory, compute_used_pct=compute, last_active_at=active
            )
        self.unsliced = unsliced
        await self._auto_bind(unknown)
        await self._prune_exited()

    async def _auto_bind(self, unknown: Sequence[tuple[str, int]]) -> None:
        for device_id, pid in unknown:
            creds = await asyncio.to_thread(procs.slice_credentials, pid)
            if creds is None:
                continue
            slice_ = self._live.get(creds[0])
            if slice_ is None or slice_.token != creds[1] or slice_.device != device_id:
                continue
            try:
                info = await asyncio.to_thread(procs.inspect, pid)
                await self._bind(slice_.id, info.ref, "token")
            except (NotFound, DoesNotFit) as exc:
                log.debug("auto-bind skipped", pid=pid, reason=str(exc))

    async def _prune_exited(self) -> None:
        refs = [p for s in self._live.values() for p in s.processes]
        if not refs:
            return
        alive = {(r.pid, r.start_time) for r in refs if procs.still_same(r)}
        if len(alive) == len(refs):
            return

        def work() -> tuple[list[Event], list[Slice]]:
            return self._ledger.prune_bindings(alive), self._ledger.live()

        events, live = await self._run(work)
        self._apply(live, events)

    # -- enforcement bookkeeping ----------------------------------------------------------

    async def mark_stopped(self, ref: ProcessRef, slice_id: str | None, stopped: bool) -> None:
        """Kept in the runtime directory, not the ledger: enforcement never waits on (or
        fails with) the ledger's disk (see :mod:`agent.core.stopped`)."""
        await asyncio.to_thread(self._stopped.mark, ref, slice_id, stopped)

    async def stopped_processes(self) -> list[tuple[ProcessRef, str | None]]:
        """What a previous run may have left stopped: the runtime record, and the ledger's
        table that versions before 0.1.1 wrote (read when it can be, then emptied)."""
        found = dict(await asyncio.to_thread(self._stopped.load))
        ledger = self._ledger

        def clear(rows: list[tuple[ProcessRef, str | None]]) -> None:
            for ref, _slice in rows:
                ledger.mark_stopped(ref, None, False)

        try:
            legacy = [(r, s) for r, s in await self._run(ledger.stopped) if r not in found]
            if legacy:
                # Into the runtime record first (one write), then out of the ledger: a crash
                # in between leaves them in both, never in neither.
                await asyncio.to_thread(self._stopped.add, legacy)
                found.update(legacy)
                await self._run(lambda: clear(legacy))
        except XpuError as exc:
            log.warning("could not read or clear the ledger's stopped table", error=str(exc))
        return list(found.items())
