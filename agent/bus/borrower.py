"""The borrower's side of lending: borrow from the best peer, keep the leases (in the
ledger, across restarts), renew them, return them (see :mod:`agent.bus.lending`)."""

from __future__ import annotations

import asyncio
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
from agent.bus.inbox import INBOX_MAX
from agent.bus.lending import MAX_LENDERS_TRIED, RENEW_CHECK_S, RPC_TIMEOUT_S, Send, error_of
from agent.bus.origin import Origin
from agent.bus.topics import Topics
from agent.core import procs
from agent.core.caller import Caller
from agent.core.pool import Peer
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
from agent.model import Lease, LeaseState, ProcessRef, SliceRequest

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class HeldLease:
    lease: Lease
    renew_at: float  # this node's wall clock, like lease.expires_at


#: How an event kind of the borrower names the lease's final state.
_ENDED_AS: dict[str, LeaseState] = {
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
        connects: Callable[[], int] = lambda: 0,
    ) -> None:
        self.service = service
        #: The bus's session count: a new session renews every lease at once (a lender
        #: that saw this node go offline cut them to its pool.borrower_grace_s).
        self._connects = connects
        self._seen_connects = 0
        self.topics = topics
        self.origin = origin
        self._send = send
        self._connected = connected
        self.guard = guard
        self._clock = clock
        self.held: dict[str, HeldLease] = {}
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
            self.held[lease.slice_id] = HeldLease(lease, renew_at=now)
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
            ranked = self.service.place(
                wanted,
                [p.cards for p in known if p.placeable and p.cards is not None],
                100,
                local=False,
                among={p.node for p in known if p.lends},
            )
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
        self.held[grant.slice_id] = HeldLease(lease, now + ttl / 2)
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
        if self._connected() and self._connects() != self._seen_connects:
            self._seen_connects = self._connects()
            for slice_id, held in list(self.held.items()):
                self.held[slice_id] = replace(held, renew_at=now)
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
