"""The lender's side of lending: grant, renew and take back slices lent to peers, and
tell a borrower when its lease ended without its word (see :mod:`agent.bus.lending`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import replace

import structlog

from agent.bus import guard as reasons
from agent.bus import payloads
from agent.bus.connection import Outgoing
from agent.bus.guard import Guard
from agent.bus.inbox import Ended, FairInbox, Job, Reclaim
from agent.bus.lending import REPLY_EXPIRY_S, Send, system_caller
from agent.bus.origin import Origin
from agent.bus.topics import NOTICE, Topics
from agent.core.pool import model_matches, parse_models
from agent.core.service import NodeService
from agent.errors import BadRequest, DoesNotFit, Forbidden, NotFound, XpuError
from agent.model import Slice, SliceRequest, SliceState
from agent.units import parse_duration_s

log = structlog.get_logger(__name__)


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
        if not self._inbox.put(request.node, Job(request, reply_to, correlation)):
            self.guard.drop(reasons.OVERLOADED, reply_to, f"{request.node} has too many waiting")

    def borrower_gone(self, node: str, why: str) -> None:
        if any(s.borrower == node for s in self.service.live.values()):
            self._inbox.put(node, Reclaim(node, why))

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        self._watch()
        while True:
            item = await self._inbox.get()
            try:
                if isinstance(item, Reclaim):
                    await self._grace(item.borrower, item.why)
                    continue
                if isinstance(item, Ended):
                    await self._tell(item.slice)
                    continue
            except XpuError as exc:  # the ledger cannot commit: the TTL still ends it
                log.warning("lending bookkeeping failed", item=type(item).__name__, error=str(exc))
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
        """The borrower went offline: not an abandonment by itself (a borrower that comes
        back — reconnected, or restarted — renews at once what its jobs still run in), but
        its leases are cut to ``pool.borrower_grace_s`` at most, so that a dead one frees
        them soon."""
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
            self._inbox.put(old.borrower or "", Ended(old))
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
