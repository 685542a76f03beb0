"""The peer pool: every peer's retained status, capacity and idle as last heard.

Each message is checked before it touches the table: size cap, schema, the topic's node
equal to the payload's node, and order — ``seq`` must grow within a ``boot_id``, and a new
``boot_id`` must not be older (by the node's own clock) than the one it replaces. A peer
whose status is ``offline``, or unheard for longer than ``pool.peer_ttl_s``, is listed but
not placeable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.bus import guard as reasons
from agent.bus import payloads
from agent.bus.guard import Guard
from agent.bus.topics import Address, Kind
from agent.core.caller import Caller
from agent.core.pool import LinkState, Peer, PeerCards, PeerDevice
from agent.model import Lease, ProcessRef, SliceRequest

if TYPE_CHECKING:
    from agent.bus.borrower import Borrower
    from agent.bus.connection import Connection

#: How long past ``peer_ttl_s`` a silent or offline peer stays listed (as a multiple).
FORGET_AFTER_TTLS = 3.0


@dataclass(slots=True)
class _Record:
    node: str
    boot_id: str
    newest_ts: float
    heard_at: float
    seqs: dict[str, int] = field(default_factory=dict)
    digests: dict[str, int] = field(default_factory=dict)
    status: payloads.Status | None = None
    #: The cards and spare host as last heard, converted once on receipt (not on every
    #: read of the pool: 10,000 peers x 8 cards rebuilt per ``GET /v1/pool`` cost 0.3-0.4 s
    #: of the loop), and replaced, never changed, by the next capacity message.
    cards: PeerCards | None = None
    idle: payloads.Idle | None = None
    #: The peer as last read, while nothing about it changed (see :meth:`PeerTable._peer`).
    view: Peer | None = None


def _cards(body: payloads.Capacity) -> PeerCards:
    """The cards as the pool keeps them. Their names repeat across a fleet (ids ``mock-0``,
    models, vendors, ``ok``): interned, 80,000 cards share a handful of strings."""
    devices = tuple(
        PeerDevice(
            id=sys.intern(d.id),
            model=sys.intern(d.model),
            vendor=sys.intern(d.vendor),
            health=sys.intern(d.health),
            memory_total_mib=d.memory_total_mib,
            memory_free_mib=d.memory_free_mib,
            compute_free_pct=d.compute_free_pct,
            slices=d.slice_count,
            max_slices=d.max_slices,
        )
        for d in body.devices
    )
    return PeerCards(
        sys.intern(body.node), devices, body.host_cpu_free_milli, body.host_memory_free_mib
    )


@dataclass(frozen=True, slots=True)
class Transition:
    """Something the lender must act on: a peer went ``offline`` or ``rebooted``."""

    node: str
    what: str


class PeerTable:
    def __init__(
        self,
        me: str,
        guard: Guard,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.me = me
        self.guard = guard
        self._clock = clock
        self._wall = wall
        self._peers: dict[str, _Record] = {}
        #: Grows when a peer (or a boot of it) is new or forgotten, or a part of one is
        #: cleared: when the order changes or something may have gone missing.
        self.version = 0
        self._order: tuple[int, list[_Record]] = (0, [])
        #: Grows with every change of a peer's cards (a cheap "anything new?" for readers).
        self.cards_changes = 0

    def receive(
        self, address: Address, raw: bytes, topic: str, retained: bool = False
    ) -> Transition | None:
        """Validate and apply one state message."""
        kind = payloads.STATE_TYPES.get(address.kind.value)
        if kind is None:
            self.guard.drop(reasons.UNEXPECTED, topic, "not a state topic")
            return None
        if not raw:
            return self._cleared(address)
        body = self.guard.decode(raw, kind, topic)
        if body is None:
            return None
        if body.node != address.node:
            self.guard.drop(reasons.SPOOFED, topic, f"payload node {body.node!r}")
            return None
        now = self._clock()
        # A retained message may be old news (replayed at subscribe time): date it by its
        # timestamp, so that a long-dead peer does not look fresh for a whole TTL.
        heard = now - max(0.0, self._wall() - body.ts) if retained else now
        record = self._peers.get(body.node)
        transition = None
        if record is None or record.boot_id != body.boot_id:
            if record is not None and body.ts < record.newest_ts:
                self.guard.drop(reasons.STALE, topic, f"older boot {body.boot_id}")
                return None
            if record is not None:
                transition = Transition(body.node, "rebooted")
            record = _Record(body.node, body.boot_id, body.ts, heard)
            self._peers[body.node] = record
            self.version += 1
        elif record.seqs.get(address.kind) == body.seq and record.digests.get(address.kind) == hash(
            raw
        ):
            return None  # QoS 1 is at-least-once: the same message again is no news
        elif not self._in_order(record, address.kind, body):
            self.guard.drop(
                reasons.STALE, topic, f"seq {body.seq} <= {record.seqs.get(address.kind)}"
            )
            return None
        record.seqs[address.kind] = body.seq
        record.digests[address.kind] = hash(raw)
        record.newest_ts = max(record.newest_ts, body.ts)
        record.heard_at = max(record.heard_at, heard)
        record.view = None
        if isinstance(body, payloads.Status):
            was = record.status.state if record.status else None
            record.status = body
            if body.state == "offline" and was != "offline":
                transition = Transition(body.node, "offline")
        elif isinstance(body, payloads.Capacity):
            record.cards = _cards(body)
            self.cards_changes += 1
        else:
            record.idle = body
        return transition

    def _cleared(self, address: Address) -> Transition | None:
        """An empty message is MQTT's deletion of a retained one (an operator clearing a
        decommissioned node, or the node itself): forget that part of the peer; without its
        status the peer is gone, and what it borrowed is reclaimed as for ``offline``."""
        record = self._peers.get(address.node)
        if record is None:
            return None
        self.version += 1
        record.view = None
        if address.kind is Kind.STATUS:
            del self._peers[address.node]
            return Transition(address.node, "offline")
        if address.kind is Kind.CAPACITY:
            record.cards = None
        elif address.kind is Kind.IDLE:
            record.idle = None
        record.seqs.pop(address.kind, None)
        record.digests.pop(address.kind, None)
        return None

    @staticmethod
    def _in_order(record: _Record, kind: Kind, body: payloads.Envelope) -> bool:
        last = record.seqs.get(kind)
        if last is None or body.seq > last:
            return True
        # A connection's will shares the seq of the ``online`` that followed its connect.
        return (
            body.seq == last
            and isinstance(body, payloads.Status)
            and body.state == "offline"
            and record.status is not None
            and record.status.state == "online"
        )

    def peers(self, ttl_s: float) -> list[Peer]:
        """Every peer, by name."""
        now = self._clock()
        if self._order[0] != self.version:
            self._order = (self.version, sorted(self._peers.values(), key=_node))
        return [self._peer(r, now, ttl_s) for r in self._order[1]]

    def peer(self, node: str, ttl_s: float) -> Peer | None:
        record = self._peers.get(node)
        return None if record is None else self._peer(record, self._clock(), ttl_s)

    def online(self, node: str, ttl_s: float) -> bool:
        """Whether ``node`` is a peer this agent has heard say ``online`` within ``ttl_s``."""
        record = self._peers.get(node)
        return record is not None and self._peer(record, self._clock(), ttl_s).state == "online"

    def _peer(self, record: _Record, now: float, ttl_s: float) -> Peer:
        """The peer as of ``now``: the record's last view while still right (nothing heard
        since, same state), else a new one. 10,000 peers built afresh on each read cost
        ~90 ms; looked up, ~5 ms."""
        state: str = record.status.state if record.status else "unknown"
        if state == "online" and now - record.heard_at > ttl_s:
            state = "stale"
        view = record.view
        if view is not None and view.state == state:
            return view
        cards, idle, status = record.cards, record.idle, record.status
        lends = idle is not None and idle.lend
        view = Peer(
            node=record.node,
            state=state,
            placeable=state == "online" and cards is not None,
            heard_at=record.heard_at,
            agent=status.agent if status else None,
            address=status.address if status else "",
            devices=cards.devices if cards else (),
            lendable_memory_mib=idle.memory_mib if idle and lends else 0,
            lendable_compute_pct=idle.compute_pct if idle and lends else 0,
            lends=lends,
            cpu_free_milli=cards.cpu_free_milli if cards else None,
            host_memory_free_mib=cards.host_memory_free_mib if cards else None,
            cards=cards,
            clock=self._clock,
        )
        record.view = view
        return view

    def placeable(self, ttl_s: float) -> list[PeerCards]:
        """The cards of every placeable peer (said ``online``, heard within ``ttl_s``, cards
        known): what ``place`` ranks, read without building a :class:`Peer` for each."""
        since = self._clock() - ttl_s
        return [
            r.cards
            for r in self._peers.values()
            if r.cards is not None
            and r.heard_at >= since
            and r.status is not None
            and r.status.state == "online"
        ]

    def stale(self, ttl_s: float) -> set[str]:
        """Peers that said ``online`` but have been unheard for longer than ``ttl_s`` (read
        every second: no :class:`Peer` is built for it)."""
        since = self._clock() - ttl_s
        return {
            r.node
            for r in self._peers.values()
            if r.heard_at < since and r.status is not None and r.status.state == "online"
        }

    def __len__(self) -> int:
        return len(self._peers)

    def missing(self) -> list[Address]:
        """What a known peer has not been heard to say at all (lost in a burst the broker
        could not queue): the state to fetch again, what makes a peer placeable (status,
        cards) before what only lending needs (idle)."""
        first, then = [], []
        for record in self._peers.values():
            if record.status is None:
                first.append(Address(record.node, Kind.STATUS))
            if record.cards is None:
                first.append(Address(record.node, Kind.CAPACITY))
            if record.idle is None:
                then.append(Address(record.node, Kind.IDLE))
        return first + then

    def incomplete(self) -> int:
        """Peers heard (status) whose cards have not arrived: not placeable yet."""
        return sum(1 for r in self._peers.values() if r.status is not None and r.cards is None)

    def forget_silent(self, ttl_s: float) -> list[str]:
        """Drop peers that are not placeable and unheard for several TTLs."""
        now = self._clock()
        gone = [
            r.node
            for r in self._peers.values()
            if now - r.heard_at > FORGET_AFTER_TTLS * ttl_s
            and not self._peer(r, now, ttl_s).placeable
        ]
        for node in gone:
            del self._peers[node]
        if gone:
            self.version += 1
        return gone


def _node(record: _Record) -> str:
    return record.node


class MqttPool:
    """The :class:`agent.core.pool.Pool` of an agent on a bus."""

    def __init__(
        self,
        table: PeerTable,
        connection: Connection,
        borrower: Borrower,
        guard: Guard,
        peer_ttl_s: Callable[[], float],
    ) -> None:
        self.table = table
        self.connection = connection
        self.borrower = borrower
        self.guard = guard
        self._peer_ttl_s = peer_ttl_s

    def link(self) -> LinkState:
        connection = self.connection
        return LinkState(
            enabled=True,
            connected=connection.connected,
            url=connection.endpoint.display(),
            state=connection.state,
            protocol=("5" if connection.supports_properties else "3.1.1")
            if connection.connects
            else None,
            connects=connection.connects,
            received=connection.received,
            published=connection.published,
            dropped=dict(self.guard.dropped),
            peers=len(self.table),
            peers_incomplete=self.table.incomplete(),
            coalesced=connection.coalesced,
            stalls=connection.stalls,
        )

    def peers(self) -> Sequence[Peer]:
        return self.table.peers(self._peer_ttl_s())

    def peer(self, node: str) -> Peer | None:
        return self.table.peer(node, self._peer_ttl_s())

    def placeable(self) -> Sequence[PeerCards]:
        return self.table.placeable(self._peer_ttl_s())

    async def borrow(
        self,
        caller: Caller,
        request: SliceRequest,
        node: str | None,
        holder: ProcessRef | None = None,
    ) -> Lease:
        return await self.borrower.borrow(caller, request, node, self.peers(), holder)

    def leases(self) -> Sequence[Lease]:
        return self.borrower.leases()

    async def lease(self, slice_id: str) -> Lease | None:
        return await self.borrower.lease(slice_id)

    async def give_back(self, caller: Caller, slice_id: str) -> Lease:
        return await self.borrower.give_back(caller, slice_id)
