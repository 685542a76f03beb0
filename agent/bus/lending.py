"""Lending idle capacity to peers: request/response over the bus (DESIGN.md §6).

A borrower sends ``borrow`` / ``renew`` / ``release`` (and ``place``) into the lender's inbox
``{root}/{zone}/nodes/{lender}/rpc/{method}``, naming its own ``.../rpc/reply`` as the MQTT 5
response topic, with correlation data and a message expiry (over 3.1.1 the same travel in
the payload). The lender answers there.

The **lender** allocates a slice with ``borrower`` set and a TTL (``pool.lease_ttl_s`` unless
asked for less or more) and returns its id, card, environment and expiry. The slice ends
when its TTL lapses (the agent's expiry task) or when a local allocation preempts it; a
borrower whose status goes ``offline`` or that restarted keeps its leases for
``pool.borrower_grace_s`` at most — a restarted borrower renews them (they are in its
ledger), a dead one lets them lapse. When a lent slice ends its processes are ended too
(:mod:`agent.enforce.loop`): the lease governs the job. A lease that ends without being
returned is announced to the borrower with a ``notice`` carrying the reason and the lease
token, so that only the lender can have sent it. Renew and release must carry the token
too: nobody but the borrower can extend or end its lease.

The **borrower** keeps its leases in its ledger (and in memory), renews each at half its
TTL — after a restart at once —, records ``lease.*`` events (they reach its events topic
like every event), and returns them on request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.bus import guard as reasons
from agent.bus import payloads
from agent.bus.connection import Outgoing
from agent.bus.guard import Guard
from agent.bus.origin import Origin
from agent.bus.topics import NOTICE, Topics
from agent.core import procs
from agent.core.caller import Caller
from agent.core.pool import Peer, model_matches, parse_models
from agent.core.service import NodeService
from agent.errors import (
    BadRequest,
    Conflict,
    DoesNotFit,
    Forbidden,
    NotFound,
    Unavailable,
    XpuError,
)
from agent.model import Lease, ProcessRef, Slice, SliceRequest, SliceState
from agent.units import parse_duration_s

log = structlog.get_logger(__name__)

#: How long a borrower waits for an answer (also the request's message expiry).
RPC_TIMEOUT_S = 5.0
#: How long a reply may wait in our outgoing queue before it is pointless.
REPLY_EXPIRY_S = 30
#: Lenders tried in turn when no node is named.
MAX_LENDERS_TRIED = 3
#: Requests waiting for the lender task; more are dropped (and counted).
INBOX_MAX = 256
#: 3.1.1 carries the expiry in the payload: allow this much clock skew.
CLOCK_SKEW_S = 30.0
RENEW_CHECK_S = 0.5

Send = Callable[[Outgoing, bool], None]


def system_caller() -> Caller:
    """The agent itself, acting for a peer."""
    return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), admin=True)


_ERRORS: dict[int, type[XpuError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: DoesNotFit,
}


def error_of(reply: payloads.Reply) -> XpuError:
    kind = _ERRORS.get(reply.status, Unavailable)
    return kind(f"{reply.node}: {reply.detail or reply.title}", lender=reply.node)


# -- the lender ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    request: payloads.AnyRequest
    reply_to: str
    correlation: bytes


@dataclass(frozen=True, slots=True)
class _Reclaim:
    """The borrower went away: its leases are kept ``pool.borrower_grace_s`` at most."""

    borrower: str
    why: str


@dataclass(frozen=True, slots=True)
class _Ended:
    """A lent slice ended without the borrower's word: tell the borrower why."""

    slice: Slice


_Urgent = _Reclaim | _Ended


#: Requests one requester may have waiting in a lender's inbox; more are dropped.
PER_REQUESTER_MAX = 16
#: Requests one requester may have answered per second (a token bucket of
#: PER_REQUESTER_MAX): a lender that refuses as fast as a flood arrives must still not queue
#: thousands of replies ahead of a real peer's.
PER_REQUESTER_RATE = 20.0


class FairInbox:
    """The lender's inbox: one bounded queue per requester, served round-robin, and a
    per-requester rate (a token bucket), so that a node sending thousands of requests delays
    only itself — also when the lender refuses them as fast as they come, which would
    otherwise queue thousands of replies ahead of a real peer's; reclaims (the lender's own
    decisions) go first."""

    def __init__(
        self,
        per_requester: int = PER_REQUESTER_MAX,
        total: int = INBOX_MAX,
        rate_per_s: float = PER_REQUESTER_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per = per_requester
        self._total = total
        self._rate = rate_per_s
        self._clock = clock
        #: requester -> (tokens, when last refilled)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._queues: dict[str, collections.deque[_Job]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self._urgent: collections.deque[_Urgent] = collections.deque()
        self._ready = asyncio.Event()
        self._size = 0

    def put(self, requester: str, item: _Job | _Urgent) -> bool:
        if isinstance(item, _Reclaim | _Ended):
            self._urgent.append(item)
            self._ready.set()
            return True
        queue = self._queues.get(requester)
        if self._size >= self._total or (queue is not None and len(queue) >= self._per):
            return False
        now = self._clock()
        tokens, then = self._buckets.get(requester, (float(self._per), now))
        tokens = min(float(self._per), tokens + (now - then) * self._rate)
        if tokens < 1.0:
            self._buckets[requester] = (tokens, now)
            return False
        self._buckets[requester] = (tokens - 1.0, now)
        if len(self._buckets) > 4 * self._total:  # forget requesters with full buckets
            full = [r for r, (t, _) in self._buckets.items() if t >= self._per - 1]
            for r in full:
                del self._buckets[r]
        if queue is None:
            queue = self._queues[requester] = collections.deque()
            self._turns.append(requester)
        queue.append(item)
        self._size += 1
        self._ready.set()
        return True

    async def get(self) -> _Job | _Urgent:
        while not self._urgent and not self._turns:
            self._ready.clear()
            await self._ready.wait()
        if self._urgent:
            return self._urgent.popleft()
        requester = self._turns.popleft()
        queue = self._queues[requester]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._turns.append(requester)  # back of the line: the others go first
        else:
            del self._queues[requester]
        return item


class Lender:
    def __init__(
        self,
        service: NodeService,
        topics: Topics,
        origin: Origin,
        send: Send,
        guard: Guard,
        clock: Callable[[], float] = time.monotonic,
        online: Callable[[str], bool] = lambda _node: True,
    ) -> None:
        self.service = service
        self.topics = topics
        self.origin = origin
        self._send = send
        self.guard = guard
        self._clock = clock
        #: Whether a node is a peer we know to be online (lending goes only to those).
        self._online = online
        self._inbox = FairInbox()
        self._lent: dict[str, Slice] = {}
        self._quiet: set[str] = set()  # ended on the borrower's word (or absence): no notice
        self.served = 0
        service.on_change(self._watch)

    # -- intake (on the loop, from the router) --------------------------------------------

    def submit(self, request: payloads.AnyRequest, reply_to: str, correlation: bytes) -> None:
        if not self._inbox.put(request.node, _Job(request, reply_to, correlation)):
            self.guard.drop(reasons.OVERLOADED, reply_to, f"{request.node} has too many waiting")

    def borrower_gone(self, node: str, why: str) -> None:
        if any(s.borrower == node for s in self.service.live.values()):
            self._inbox.put(node, _Reclaim(node, why))

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        self._watch()
        while True:
            item = await self._inbox.get()
            if isinstance(item, _Reclaim):
                await self._grace(item.borrower, item.why)
                continue
            if isinstance(item, _Ended):
                await self._tell(item.slice)
                continue
            reply = await self._answer(item.request)
            self.served += 1
            self._send(
                Outgoing(
                    item.reply_to,
                    payloads.encode(reply),
                    qos=1,
                    correlation=item.correlation,
                    expiry_s=REPLY_EXPIRY_S,
                    deadline=self._clock() + REPLY_EXPIRY_S,
                ),
                False,
            )
            # Let the receiver run between jobs even when a job never waited (a refusal is
            # decided on the loop): it then drains what the broker has delivered into the
            # per-requester queues — where a flood is bounded and a real peer's request
            # takes its turn — instead of feeding them one at a time in arrival order.
            await asyncio.sleep(0)

    async def _answer(self, request: payloads.AnyRequest) -> payloads.Reply:
        try:
            if isinstance(request, payloads.BorrowRequest):
                return await self._borrow(request)
            if isinstance(request, payloads.RenewRequest):
                return await self._renew(request)
            if isinstance(request, payloads.ReleaseRequest):
                return await self._release(request)
            return self._place(request)
        except XpuError as exc:
            return self._reply(request, exc.status, exc.title, exc.detail)
        except Exception:
            log.exception("lending request failed", request=type(request).__name__)
            return self._reply(request, 500, "Internal error", "see the lender's log")

    def _reply(
        self,
        request: payloads.Request,
        status: int,
        title: str = "",
        detail: str = "",
        lease: payloads.LeaseGrant | None = None,
        candidates: list[payloads.PlacedCard] | None = None,
    ) -> payloads.Reply:
        return payloads.Reply(
            **self.origin.stamp(),
            request_id=request.request_id,
            status=status,
            title=title,
            detail=detail,
            lease=lease,
            candidates=candidates,
        )

    def _grant(self, slice_: Slice) -> payloads.LeaseGrant:
        """The lease as the borrower gets it; its environment also names this agent's
        socket, for the dispatched job's ``xpuctl run --slice`` on this node."""
        device = self.service.inventory.devices.get(slice_.device)
        return payloads.LeaseGrant(
            slice_id=slice_.id,
            token=slice_.token,
            device=slice_.device,
            model=device.model if device else "",
            memory_mib=slice_.memory_mib,
            compute_pct=slice_.compute_pct,
            expires_at=slice_.expires_at,
            env=self.service.env(slice_) | {"XPU_AGENT_SOCKET": self.service.config.paths.socket},
        )

    def _lease_ttl_s(self, asked: float | None) -> float:
        """What the borrower asked for (else ``pool.lease_ttl_s``), never past
        ``pool.max_lease_ttl_s``: a lease is renewed while used, not granted for years."""
        pool = self.service.config.pool
        ttl = asked if asked is not None else parse_duration_s(pool.lease_ttl_s)
        return min(ttl, parse_duration_s(pool.max_lease_ttl_s))

    async def _borrow(self, request: payloads.BorrowRequest) -> payloads.Reply:
        config = self.service.config
        if not config.pool.lend:
            raise Forbidden(f"{self.origin.node} does not lend (pool.lend = false)")
        if request.node == self.origin.node:
            raise BadRequest("a node does not borrow from itself")
        if not self._online(request.node):
            raise Forbidden(
                f"{self.origin.node} lends only to peers it knows to be online; "
                f"{request.node} is not one (yet)"
            )
        wanted = SliceRequest(
            memory_mib=request.memory_mib,
            compute_pct=request.compute_pct,
            owner_uid=os.getuid(),
            models=parse_models(request.model),
            cpu_milli=request.cpu_milli,
            host_memory_mib=request.host_memory_mib,
            ttl_s=self._lease_ttl_s(request.ttl_s),
            labels={"lent-to": request.node},
            borrower=request.node,
            # A retried request (same id) gets the same slice, not a second one.
            request_id=f"lend:{request.node}:{request.request_id}",
        )
        try:
            slice_, created = await self.service.allocate(system_caller(), wanted)
        except DoesNotFit as exc:
            if "short" in exc.extra:
                raise
            slice_, created = await self._lend_from_idle(wanted, exc)
        log.info(
            "lent a slice",
            slice=slice_.id,
            borrower=request.node,
            device=slice_.device,
            created=created,
        )
        return self._reply(request, 201 if created else 200, lease=self._grant(slice_))

    async def _lend_from_idle(
        self, wanted: SliceRequest, refused: DoesNotFit
    ) -> tuple[Slice, bool]:
        """No free card has room: lend out of an idle ``lend=true`` slice's share instead
        (reclaimed the moment its owner binds a process to it again)."""
        devices = self.service.inventory.devices
        for idle, memory_left, compute_left in self.service.idle_lendable():
            device = devices.get(idle.device)
            if device is None or memory_left < wanted.memory_mib:
                continue
            if compute_left < wanted.compute_pct:
                continue
            if wanted.models and not model_matches(device.model, wanted.models):
                continue
            labels = dict(wanted.labels) | {"lent-from": idle.id}
            try:
                return await self.service.allocate(
                    system_caller(),
                    replace(wanted, device=idle.device, lent_from=idle.id, labels=labels),
                )
            except DoesNotFit:
                continue
        raise refused

    def _held_by(self, slice_id: str, node: str, token: str) -> Slice:
        slice_ = self.service.live.get(slice_id)
        if (
            slice_ is None
            or slice_.borrower != node
            or not secrets.compare_digest(slice_.token, token)
        ):
            raise NotFound(f"no lease {slice_id} for {node} on {self.origin.node}")
        return slice_

    async def _renew(self, request: payloads.RenewRequest) -> payloads.Reply:
        self._held_by(request.slice_id, request.node, request.token)
        renewed = await self.service.renew(request.slice_id, self._lease_ttl_s(request.ttl_s))
        return self._reply(request, 200, lease=self._grant(renewed))

    async def _release(self, request: payloads.ReleaseRequest) -> payloads.Reply:
        held = self._held_by(request.slice_id, request.node, request.token)
        self._quiet.add(held.id)
        ended = await self.service.release(
            system_caller(), held.id, SliceState.RELEASED, f"returned by {request.node}"
        )
        log.info("lease returned", slice=held.id, borrower=request.node)
        return self._reply(request, 200, lease=self._grant(ended))

    def _place(self, request: payloads.PlaceRequest) -> payloads.Reply:
        ranked = self.service.place(
            SliceRequest(
                memory_mib=request.memory_mib,
                compute_pct=request.compute_pct,
                owner_uid=os.getuid(),
                models=parse_models(request.model),
            ),
            limit=request.limit,
        )
        return self._reply(
            request,
            200,
            candidates=[
                payloads.PlacedCard(
                    device=p.device,
                    model=p.model,
                    score=p.score,
                    memory_free_after_mib=p.memory_free_after_mib,
                    compute_free_after_pct=p.compute_free_after_pct,
                )
                for p in ranked
            ],
        )

    async def _grace(self, borrower: str, why: str) -> None:
        """The borrower went offline or restarted: not an abandonment by itself (a
        restarted borrower renews what its jobs still run in), but its leases are cut to
        ``pool.borrower_grace_s`` at most, so that a dead one frees them soon."""
        grace = parse_duration_s(self.service.config.pool.borrower_grace_s)
        horizon = self.service.clock() + grace
        for slice_ in [s for s in self.service.live.values() if s.borrower == borrower]:
            if slice_.expires_at is not None and slice_.expires_at <= horizon:
                continue
            with contextlib.suppress(NotFound):
                await self.service.renew(slice_.id, grace)
                log.info("lease cut to the grace", slice=slice_.id, borrower=borrower, why=why)

    # -- noticing leases that ended without the borrower's word --------------------------

    def _watch(self) -> None:
        """On every change: a lent slice that vanished was expired or reclaimed."""
        current = {s.id: s for s in self.service.live.values() if s.borrower is not None}
        for slice_id, old in self._lent.items():
            if slice_id in current:
                continue
            if slice_id in self._quiet:
                self._quiet.discard(slice_id)
                continue
            self._inbox.put(old.borrower or "", _Ended(old))
        self._lent = current

    async def _tell(self, old: Slice) -> None:
        """Send the borrower a notice with the ledger's reason for the end."""
        assert old.borrower is not None
        try:
            ended = await self.service.get(old.id)
        except XpuError:
            ended = old
        expired = ended.state is SliceState.EXPIRED
        notice = payloads.Notice(
            **self.origin.stamp(),
            slice_id=old.id,
            token=old.token,
            state="expired" if expired else "reclaimed",
            reason=ended.end_reason or ("ttl lapsed" if expired else "reclaimed by the lender"),
        )
        log.info("lease ended", slice=old.id, borrower=old.borrower, state=notice.state)
        self._send(
            Outgoing(
                self.topics.rpc(old.borrower, NOTICE),
                payloads.encode(notice),
                qos=1,
                deadline=self._clock() + REPLY_EXPIRY_S,
            ),
            False,
        )


# -- the borrower --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    lease: Lease
    renew_at: float  # this node's wall clock, like lease.expires_at


#: How an event kind of the borrower names the lease's final state.
_ENDED_AS = {
    "lease.returned": "returned",
    "lease.reclaimed": "reclaimed",
    "lease.expired": "expired",
    "lease.lost": "lost",
}


class Borrower:
    def __init__(
        self,
        service: NodeService,
        topics: Topics,
        origin: Origin,
        send: Send,
        connected: Callable[[], bool],
        guard: Guard,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.topics = topics
        self.origin = origin
        self._send = send
        self._connected = connected
        self.guard = guard
        self._clock = clock
        self.held: dict[str, Held] = {}
        self._waiting: dict[str, tuple[str, asyncio.Future[payloads.Reply]]] = {}
        self._notices: asyncio.Queue[payloads.Notice] = asyncio.Queue(INBOX_MAX)

    # -- request/response ----------------------------------------------------------------

    async def call(self, lender: str, request: payloads.Request) -> payloads.Reply:
        if not self._connected():
            raise Unavailable("the MQTT bus is not connected")
        method = payloads.METHOD_OF[type(request)]
        future: asyncio.Future[payloads.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = (lender, future)
        try:
            self._send(
                Outgoing(
                    self.topics.rpc(lender, method),
                    payloads.encode(request),
                    qos=1,
                    response_topic=self.topics.reply_to(),
                    correlation=request.request_id.encode(),
                    expiry_s=int(RPC_TIMEOUT_S),
                    deadline=self._clock() + RPC_TIMEOUT_S,
                ),
                False,
            )
            return await asyncio.wait_for(future, RPC_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(
                f"{lender} did not answer {method} within {RPC_TIMEOUT_S:g}s"
            ) from None
        finally:
            self._waiting.pop(request.request_id, None)

    def _request_fields(self) -> dict[str, Any]:
        return {
            **self.origin.stamp(),
            "request_id": uuid.uuid4().hex,
            "reply_to": self.topics.reply_to(),
            "expires_at": self.origin.wall() + RPC_TIMEOUT_S,
        }

    def on_reply(self, reply: payloads.Reply, correlation: bytes | None, topic: str) -> None:
        key = correlation.decode(errors="replace") if correlation else reply.request_id
        waiting = self._waiting.get(key)
        if waiting is None:
            self.guard.drop(reasons.UNEXPECTED, topic, "reply to no pending request")
            return
        lender, future = waiting
        if reply.node != lender:
            self.guard.drop(reasons.SPOOFED, topic, f"reply from {reply.node}, asked {lender}")
            return
        if not future.done():
            future.set_result(reply)

    def on_notice(self, notice: payloads.Notice, topic: str) -> None:
        held = self.held.get(notice.slice_id)
        if (
            held is None
            or held.lease.lender != notice.node
            or not secrets.compare_digest(held.lease.token, notice.token)
        ):
            self.guard.drop(
                reasons.UNEXPECTED, topic, f"notice for unknown lease {notice.slice_id}"
            )
            return
        try:
            self._notices.put_nowait(notice)
        except asyncio.QueueFull:
            self.guard.drop(reasons.OVERLOADED, topic, "notice queue full")

    # -- leases ---------------------------------------------------------------------------

    def leases(self) -> list[Lease]:
        return sorted((h.lease for h in self.held.values()), key=lambda lease: lease.slice_id)

    async def lease(self, slice_id: str) -> Lease | None:
        """A lease held now, or one that ended (kept ``slicing.history_s`` in the ledger)."""
        held = self.held.get(slice_id)
        if held is not None:
            return held.lease
        with contextlib.suppress(XpuError):
            return await self.service.lease(slice_id)
        return None

    async def resume(self) -> int:
        """At start: the leases a previous run held, renewed at once (a lender may have cut
        them to its grace when it saw this node go)."""
        try:
            kept = await self.service.leases()
        except XpuError as exc:
            log.warning("could not read the borrowed leases", error=str(exc))
            return 0
        now = self.origin.wall()
        for lease in kept:
            self.held[lease.slice_id] = Held(lease, renew_at=now)
        if kept:
            log.info("resumed borrowed leases", leases=[lease.slice_id for lease in kept])
        return len(kept)

    async def borrow(
        self,
        caller: Caller,
        wanted: SliceRequest,
        node: str | None,
        peers: Sequence[Peer],
        holder: ProcessRef | None = None,
    ) -> Lease:
        """Borrow ``wanted`` (normalised) from ``node``, or from the peers the node's placer
        ranks best (the next one when a lender refuses); ``holder``: the process whose
        life the lease follows."""
        known = list(peers)
        if node is not None:
            peer = next((p for p in known if p.node == node), None)
            if node == self.origin.node:
                raise BadRequest("a node does not borrow from itself: allocate a slice")
            if peer is None:
                raise NotFound(f"no peer {node!r} in the pool")
            if not peer.placeable:
                raise Conflict(f"peer {node} is {peer.state}: not placeable")
            lenders = [node]
        else:
            ranked = self.service.place(wanted, [p for p in known if p.lends], 100, local=False)
            lenders = list(dict.fromkeys(c.node for c in ranked))
            # Then peers whose lendable capacity (idle lend=true slices) covers it.
            lenders += [
                p.node
                for p in known
                if p.placeable
                and p.lends
                and p.node not in lenders
                and p.lendable_memory_mib >= wanted.memory_mib
                and p.lendable_compute_pct >= wanted.compute_pct
                and (not wanted.models or p.has_model(wanted.models))
            ]
            if not lenders:
                on = f" on a {'|'.join(sorted(wanted.models))} card" if wanted.models else ""
                raise DoesNotFit(
                    f"no peer can lend {wanted.memory_mib} MiB / {wanted.compute_pct} %{on}"
                )
        addresses = {p.node: p.address for p in known}
        model = "|".join(sorted(wanted.models)) or None
        last: XpuError | None = None
        for lender in lenders[:MAX_LENDERS_TRIED]:
            request = payloads.BorrowRequest(
                **self._request_fields(),
                memory_mib=wanted.memory_mib,
                compute_pct=wanted.compute_pct,
                ttl_s=wanted.ttl_s,
                model=model,
                cpu_milli=wanted.cpu_milli,
                host_memory_mib=wanted.host_memory_mib,
            )
            reply = await self.call(lender, request)
            if reply.status < 300 and reply.lease is not None:
                address = addresses.get(lender) or lender
                return await self._keep(lender, address, reply, reply.lease, caller, holder)
            last = error_of(reply)
            if reply.status not in (403, 409):
                raise last
        assert last is not None
        raise last

    @staticmethod
    def _remaining_s(reply: payloads.Reply, grant: payloads.LeaseGrant) -> float:
        """The lease's time left, by the lender's clock alone (its expiry minus the reply's
        timestamp), so that clock skew between the two nodes does not matter."""
        if grant.expires_at is None:
            return 600.0
        return max(1.0, grant.expires_at - reply.ts)

    async def _keep(
        self,
        lender: str,
        address: str,
        reply: payloads.Reply,
        grant: payloads.LeaseGrant,
        caller: Caller,
        holder: ProcessRef | None,
    ) -> Lease:
        now = self.origin.wall()
        ttl = self._remaining_s(reply, grant)
        lease = Lease(
            lender=lender,
            slice_id=grant.slice_id,
            device=grant.device,
            memory_mib=grant.memory_mib,
            compute_pct=grant.compute_pct,
            expires_at=now + ttl,  # on this node's clock
            env=dict(grant.env),
            owner_uid=caller.uid,
            address=address,
            token=grant.token,
            ttl_s=ttl,
            created_at=now,
            holder=holder,
        )
        self.held[grant.slice_id] = Held(lease, now + ttl / 2)
        try:
            await self.service.keep_lease(lease)
        except XpuError as exc:
            # Held in memory all the same: it works, and is renewed, until a restart.
            log.warning("lease not recorded in the ledger", slice=grant.slice_id, error=str(exc))
        log.info("borrowed a slice", lender=lender, slice=grant.slice_id, device=grant.device)
        await self.service.record(
            "lease.borrowed",
            {
                "lender": lender,
                "device": grant.device,
                "memory_mib": grant.memory_mib,
                "compute_pct": grant.compute_pct,
                "expires_at": grant.expires_at,
                "uid": caller.uid,
            },
            grant.slice_id,
        )
        return lease

    async def give_back(self, caller: Caller, slice_id: str, why: str = "returned") -> Lease:
        held = self.held.get(slice_id)
        if held is None:
            raise NotFound(f"no borrowed lease {slice_id!r}")
        if not (caller.admin or caller.uid == held.lease.owner_uid):
            raise Forbidden(
                f"{caller.name} may not return lease {slice_id} borrowed by uid "
                f"{held.lease.owner_uid}"
            )
        request = payloads.ReleaseRequest(
            **self._request_fields(),
            slice_id=slice_id,
            token=held.lease.token,
        )
        reply = await self.call(held.lease.lender, request)
        if reply.status >= 300 and reply.status != 404:
            raise error_of(reply)
        await self._forget(slice_id, "lease.returned", why)
        return replace(held.lease, state="returned", reason=why)

    async def _forget(self, slice_id: str, kind: str, why: str) -> None:
        held = self.held.pop(slice_id, None)
        if held is None:
            return
        log.info("lease ended", slice=slice_id, lender=held.lease.lender, why=why)
        try:
            await self.service.end_lease(slice_id, _ENDED_AS[kind], why)
        except XpuError as exc:
            log.warning("lease end not recorded", slice=slice_id, error=str(exc))
        await self.service.record(kind, {"lender": held.lease.lender, "reason": why}, slice_id)

    # -- the task: renewals and notices ---------------------------------------------------

    async def run(self) -> None:
        await self.resume()
        while True:
            try:
                notice = await asyncio.wait_for(self._notices.get(), timeout=RENEW_CHECK_S)
            except TimeoutError:
                await self._renew_due()
                continue
            kind = "lease.expired" if notice.state == "expired" else "lease.reclaimed"
            await self._forget(notice.slice_id, kind, notice.reason or notice.state)

    async def _return_orphans(self) -> None:
        """Leases whose holder (the ``xpuctl run --pool`` that borrowed them) is gone —
        killed, say, before it could return them — are returned, not renewed forever."""
        for slice_id, held in list(self.held.items()):
            holder = held.lease.holder
            if holder is None or procs.running(holder) or not self._connected():
                continue
            agent = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), admin=True)
            with contextlib.suppress(XpuError):
                await self.give_back(agent, slice_id, f"its holder (pid {holder.pid}) is gone")

    async def _renew_due(self) -> None:
        await self._return_orphans()
        now = self.origin.wall()
        for slice_id, held in list(self.held.items()):
            expires = held.lease.expires_at
            if expires is not None and now >= expires:
                await self._forget(slice_id, "lease.expired", "not renewed in time")
                continue
            if now < held.renew_at or not self._connected():
                continue
            request = payloads.RenewRequest(
                **self._request_fields(),
                slice_id=slice_id,
                token=held.lease.token,
                ttl_s=held.lease.ttl_s,
            )
            try:
                reply = await self.call(held.lease.lender, request)
            except Unavailable as exc:
                log.debug("renewal not answered; retrying", slice=slice_id, error=str(exc))
                self.held[slice_id] = replace(held, renew_at=now + 1.0)
                continue
            if reply.status == 404:
                await self._forget(slice_id, "lease.lost", "the lender no longer holds it")
            elif reply.status < 300 and reply.lease is not None and slice_id in self.held:
                now = self.origin.wall()
                left = self._remaining_s(reply, reply.lease)
                lease = replace(held.lease, expires_at=now + left)
                self.held[slice_id] = replace(held, lease=lease, renew_at=now + left / 2)
                with contextlib.suppress(XpuError):
                    await self.service.lease_renewed(slice_id, now + left)
            else:
                log.warning("renewal refused", slice=slice_id, status=reply.status)
                self.held[slice_id] = replace(held, renew_at=now + 1.0)
