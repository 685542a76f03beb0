"""This agent on the bus: the connection, the publisher, the pool, lender and borrower,
wired together, and the named tasks the daemon supervises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import structlog

from agent.bus import guard as reasons
from agent.bus import payloads
from agent.bus.borrower import Borrower
from agent.bus.connection import Connection, Outgoing, property_of
from agent.bus.guard import Guard
from agent.bus.lender import Lender
from agent.bus.lending import CLOCK_SKEW_S
from agent.bus.origin import Origin
from agent.bus.pool import MqttPool, PeerTable, Transition
from agent.bus.publisher import Publisher
from agent.bus.topics import (
    METHODS,
    NOTICE,
    PROBE,
    REPLY,
    STATE_KINDS,
    Address,
    Kind,
    Topics,
)
from agent.config import Config
from agent.core.service import NodeService
from agent.supervise import every

log = structlog.get_logger(__name__)

#: Seconds between looks for peers with missing state; topics per refetch; how long the
#: bus must have been quiet before a refetch (the subscribe-time burst is over: a SUBSCRIBE
#: that reaches Mosquitto while it drops our messages is never acknowledged). A look is a
#: pass over the peer table (~2 ms at 10,000 peers) only once the bus is quiet.
RESYNC_EVERY_S = 0.1
RESYNC_BATCH = 800
RESYNC_QUIET_S = 0.3
RESYNC_WAIT_MAX_S = 5.0

PRUNE_EVERY_S = 1.0
#: Seconds between conversions of peers' new cards for placement; peers per step (~9 ms).
PREPARE_EVERY_S = 0.5
PREPARE_BATCH = 100


class _Deferral:
    """Put off work while the bus is in a burst (not quiet for ``RESYNC_QUIET_S``), but
    never for longer than ``RESYNC_WAIT_MAX_S``: a zone that is never quiet (thousands of
    peers heartbeating) is not in a burst either."""

    def __init__(self) -> None:
        self._since: float | None = None

    def wait(self, busy: bool) -> bool:
        """Whether to put the work off now (``busy``: the bus is in a burst)."""
        now = time.monotonic()
        if busy:
            self._since = now if self._since is None else self._since
            if now - self._since < RESYNC_WAIT_MAX_S:
                return True
        self._since = None
        return False


class Bus:
    def __init__(self, config: Config, service: NodeService) -> None:
        node = config.node_name
        self.service = service
        self.topics = Topics(config.mqtt.topic_root, config.node.zone, node)
        self.origin = Origin(node)
        self.guard = Guard(config.mqtt.max_payload_bytes)
        self.table = PeerTable(node, self.guard)
        self.publisher = Publisher(service, self.topics, self.origin, self._send)
        self.connection = Connection(
            config.mqtt,
            client_id=node,
            subscriptions=self.topics.subscriptions(),
            on_message=self.route,
            on_connect=self.publisher.on_connect,
            will=self.publisher.will,
            goodbye=self.publisher.goodbye,
            probe_topic=self.topics.rpc(node, PROBE),
        )
        self.lender = Lender(
            service,
            self.topics,
            self.origin,
            self._send,
            self.guard,
            online=lambda node: self.table.online(node, service.config.pool.peer_ttl_s),
        )
        self.borrower = Borrower(
            service,
            self.topics,
            self.origin,
            self._send,
            lambda: self.connection.connected,
            self.guard,
            connects=lambda: self.connection.connects,
        )
        self.pool = MqttPool(
            self.table,
            self.connection,
            self.borrower,
            self.guard,
            peer_ttl_s=lambda: service.config.pool.peer_ttl_s,
        )
        self._stale: set[str] = set()

    def _send(self, message: Outgoing, latest: bool) -> None:
        self.connection.publish(message, latest)

    def tasks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {
            "mqtt": self.connection.run,
            "mqtt-publish": self.publisher.run,
            "mqtt-events": self.publisher.forward_events,
            "lender": self.lender.run,
            "leases": self.borrower.run,
            "pool-expiry": self._expire_peers,
            "pool-resync": self._resync,
            "pool-prepare": self._prepare,
        }

    def _in_burst(self) -> bool:
        return self.connection.quiet_s() < RESYNC_QUIET_S

    async def _prepare(self) -> None:
        """Keep placement's view of the peers converted as news arrives, a few hundred at a
        time between other work, so that ``place`` right after a zone's burst does not pay
        for 10,000 conversions at once."""

        deferral = _Deferral()
        prepared_at = -1  # the table's count of card changes when last prepared

        async def step() -> None:
            nonlocal prepared_at
            if self.table.cards_changes == prepared_at:
                return
            # Not while a zone's state is still pouring in (it would slow that down by a
            # third), unless that has gone on for long.
            if deferral.wait(self.table.incomplete() > 0 and self._in_burst()):
                return
            prepared_at = self.table.cards_changes
            todo = self.service.unprepared_peers(self.pool.placeable())
            for start in range(0, len(todo), PREPARE_BATCH):
                self.service.prepare_peers(todo[start : start + PREPARE_BATCH])
                await asyncio.sleep(0)  # the loop serves others between batches

        await every(PREPARE_EVERY_S, step)

    async def _resync(self) -> None:
        """Fetch again, in batches the broker can queue, the retained state that known
        peers are missing. Mosquitto queues at most ``max_queued_messages`` (default
        1,000) per client and drops the rest, and a zone's retained state arrives all at
        once at subscribe: a newcomer to a 3,000-peer zone hears of every peer but misses
        a part of their cards. Once that burst is over, each batch (800 topics) is a
        subscription to exact topics, answered with just those retained messages; the next
        batch goes when the agent has read the last one, so the broker never holds more
        than one batch for us."""
        tried: dict[tuple[str, str], int] = {}
        settled = -1  # the table's version when nothing (more) could be fetched
        deferral = _Deferral()
        while True:
            await asyncio.sleep(RESYNC_EVERY_S)
            if not self.connection.connected or self.table.version == settled:
                continue
            if deferral.wait(self._in_burst()):
                continue
            version = self.table.version
            # A topic that a few refetches did not bring is simply not retained (an older
            # agent, a cleared node): stop asking.
            missing = [a for a in self.table.missing() if tried.get((a.node, a.kind.value), 0) < 3]
            if not missing:
                settled = version
                continue
            for address in missing:
                key = (address.node, address.kind.value)
                tried[key] = tried.get(key, 0) + 1
            log.info("fetching missed peer state again", topics=len(missing))
            for start in range(0, len(missing), RESYNC_BATCH):
                batch = missing[start : start + RESYNC_BATCH]
                topics = [self.topics.state(a.kind, a.node) for a in batch]
                if not await self.connection.refetch(topics):
                    break
                await self.connection.caught_up()

    # -- receiving --------------------------------------------------------------------------

    def route(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        raw = message.payload if isinstance(message.payload, bytes) else b""
        address = self.topics.parse(topic)
        if address is None:
            self.guard.drop(reasons.UNEXPECTED, topic, "outside this zone's tree")
            return
        if address.kind in STATE_KINDS:
            if address.node == self.origin.node:
                return  # our own retained state, echoed back
            transition = self.table.receive(address, raw, topic, retained=message.retain)
            if transition is not None:
                self._on_transition(transition)
            return
        if address.kind is Kind.RPC and address.node == self.origin.node:
            self._route_inbox(address, message, topic, raw)
            return
        self.guard.drop(reasons.UNEXPECTED, topic, "not subscribed to this")

    def _route_inbox(
        self, address: Address, message: aiomqtt.Message, topic: str, raw: bytes
    ) -> None:
        if address.method == REPLY:
            reply = self.guard.decode(raw, payloads.Reply, topic)
            if reply is not None:
                self.borrower.on_reply(reply, property_of(message, "CorrelationData"), topic)
            return
        if address.method == NOTICE:
            notice = self.guard.decode(raw, payloads.Notice, topic)
            if notice is not None:
                self.borrower.on_notice(notice, topic)
            return
        if address.method not in METHODS:
            self.guard.drop(reasons.UNEXPECTED, topic, f"no method {address.method!r}")
            return
        request = self.guard.decode(raw, payloads.AnyRequest, topic)
        if request is None:
            return
        if payloads.METHOD_OF[type(request)] != address.method:
            self.guard.drop(
                reasons.MALFORMED, topic, f"{request.__class__.__name__} sent to {address.method}"
            )
            return
        # Answers go only to the requester's own inbox, never where a request says.
        reply_to = property_of(message, "ResponseTopic") or request.reply_to
        if reply_to != self.topics.reply_to(request.node):
            self.guard.drop(reasons.SPOOFED, topic, f"response topic {reply_to!r}")
            return
        if (
            request.expires_at is not None
            and self.origin.wall() > request.expires_at + CLOCK_SKEW_S
        ):
            self.guard.drop(reasons.STALE, topic, "request expired")
            return
        correlation = property_of(message, "CorrelationData") or request.request_id.encode()
        self.lender.submit(request, reply_to, correlation)

    def _on_transition(self, transition: Transition) -> None:
        log.info("peer changed", peer=transition.node, what=transition.what)
        # Offline: the lender cuts what it lent there to pool.borrower_grace_s (a borrower
        # that comes back renews at once). A new boot alone is not news for lending: the
        # borrower is up, and renews the leases its ledger holds.
        if transition.what == "offline":
            self.lender.borrower_gone(transition.node, "borrower went offline")

    async def _expire_peers(self) -> None:
        async def step() -> None:
            ttl = self.service.config.pool.peer_ttl_s
            stale = self.table.stale(ttl)
            for node in stale - self._stale:
                log.warning("peer unheard; not placeable", peer=node, ttl_s=ttl)
            self._stale = stale
            for node in self.table.forget_silent(ttl):
                log.info("peer forgotten", peer=node)

        await every(PRUNE_EVERY_S, step)
