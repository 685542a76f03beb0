"""What the core needs from the pool (implemented by ``agent.bus``; standalone otherwise)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent import placement
from agent.core.caller import Caller
from agent.errors import NotFound, Unavailable
from agent.model import Lease, ProcessRef, SliceRequest

#: The model filter, parsed once for every interface (``"A100|H100"`` -> a set).
parse_models = placement.parse_models
model_matches = placement.model_matches


@dataclass(frozen=True, slots=True)
class LinkState:
    enabled: bool
    connected: bool
    url: str
    state: str  # "standalone" | "connecting" | "connected" | "disconnected"
    protocol: str | None = None  # "5" | "3.1.1" once connected
    connects: int = 0
    received: int = 0
    published: int = 0
    #: Peer messages dropped, by reason (oversized, malformed, spoofed, stale, ...).
    dropped: Mapping[str, int] = field(default_factory=dict)
    #: Peers heard of (listed in the pool).
    peers: int = 0
    #: Peers heard of whose cards have not arrived (not placeable yet).
    peers_incomplete: int = 0
    #: Retained state messages replaced in the intake by a newer one before being read.
    coalesced: int = 0
    #: Sessions replaced because the QoS 1 probe did not come back.
    stalls: int = 0


@dataclass(frozen=True, slots=True)
class PeerDevice:
    id: str
    model: str
    vendor: str
    health: str
    memory_total_mib: int
    memory_free_mib: int
    compute_free_pct: int
    slices: int
    max_slices: int = 10


@dataclass(frozen=True, slots=True)
class PeerCards:
    """What placement needs of a peer, as last heard: its cards and spare host. Replaced,
    never changed, when news of them arrives, so ranking a pool of thousands costs an
    identity check per peer, not a conversion."""

    node: str
    devices: tuple[PeerDevice, ...]
    cpu_free_milli: int | None = None
    host_memory_free_mib: int | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer as this agent last heard of it. Kept, not rebuilt, until news of the peer
    arrives or its ``state`` changes (``stale`` past the TTL), so that reading a pool of
    thousands costs a look per peer: its age is therefore read off the clock
    (:attr:`age_s`), not stored."""

    node: str
    state: str
    placeable: bool
    #: When it was last heard, on ``clock``.
    heard_at: float
    agent: str | None
    devices: tuple[PeerDevice, ...]
    lendable_memory_mib: int
    lendable_compute_pct: int
    lends: bool = True
    #: Spare host CPU and memory for slices, where the peer publishes them.
    cpu_free_milli: int | None = None
    host_memory_free_mib: int | None = None
    #: Where the peer is reached to run a job on it (its ``node.address``; may be empty).
    address: str = ""
    #: The cards as placement takes them (``None`` until they are heard).
    cards: PeerCards | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    @property
    def age_s(self) -> float:
        """Seconds since it was last heard."""
        return max(0.0, self.clock() - self.heard_at)

    def has_model(self, models: frozenset[str]) -> bool:
        return any(model_matches(d.model, models) for d in self.devices)


@dataclass(frozen=True, slots=True)
class PlacedCandidate:
    node: str
    device: str
    model: str
    score: float
    memory_free_after_mib: int
    compute_free_after_pct: int
    local: bool


class Pool(Protocol):
    def link(self) -> LinkState: ...

    def peers(self) -> Sequence[Peer]: ...

    def peer(self, node: str) -> Peer | None:
        """One peer, without building the whole pool."""
        ...

    def placeable(self) -> Sequence[PeerCards]:
        """The cards of every placeable peer, without building a :class:`Peer` for each."""
        ...

    async def borrow(
        self,
        caller: Caller,
        request: SliceRequest,
        node: str | None,
        holder: ProcessRef | None = None,
    ) -> Lease:
        """Borrow ``request`` (normalised; its ``ttl_s`` is the lease's) from ``node`` or the
        best peer; ``holder``: return it when that process is gone."""
        ...

    def leases(self) -> Sequence[Lease]: ...

    async def lease(self, slice_id: str) -> Lease | None:
        """A lease held now or ended lately (``None``: never borrowed here)."""
        ...

    async def give_back(self, caller: Caller, slice_id: str) -> Lease: ...


class StandalonePool:
    """No bus configured: the pool is this node alone and nothing can be borrowed."""

    def link(self) -> LinkState:
        return LinkState(enabled=False, connected=False, url="", state="standalone")

    def peers(self) -> Sequence[Peer]:
        return ()

    def peer(self, node: str) -> Peer | None:
        return None

    def placeable(self) -> Sequence[PeerCards]:
        return ()

    async def borrow(
        self,
        caller: Caller,
        request: SliceRequest,
        node: str | None,
        holder: ProcessRef | None = None,
    ) -> Lease:
        raise Unavailable("no MQTT bus is configured (mqtt.url is empty): nothing to borrow from")

    def leases(self) -> Sequence[Lease]:
        return ()

    async def lease(self, slice_id: str) -> Lease | None:
        return None

    async def give_back(self, caller: Caller, slice_id: str) -> Lease:
        raise NotFound(f"no borrowed lease {slice_id!r}")


class PeerStates:
    """Peers as placement sees them, converted only for peers whose cards changed (their
    :class:`PeerCards` is replaced, never mutated, when news of it arrives), so ranking a
    pool of thousands costs one identity check per peer, not a conversion. Keeps the
    healthy cards per model and free capacity of the peers it last saw (:attr:`supply`) up
    to date as it goes. Give it the whole placeable pool each time: peers missing from it
    are forgotten."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[PeerCards, placement.NodeState]] = {}
        self.supply = placement.Supply()

    def unprepared(self, peers: Sequence[PeerCards]) -> list[PeerCards]:
        """Those of ``peers`` whose cards are new since they were last converted."""
        cache = self._states
        return [c for c in peers if (hit := cache.get(c.node)) is None or hit[0] is not c]

    def prepare(self, peers: Sequence[PeerCards]) -> None:
        """Convert ``peers`` ahead of :meth:`states` (10,000 new peers converted by one
        ``place`` take ~0.9 s). Forgets nothing: :meth:`states` does that."""
        cache = self._states
        gone: list[placement.NodeState] = []
        new: list[placement.NodeState] = []
        for cards in peers:
            cached = cache.get(cards.node)
            if cached is not None and cached[0] is cards:
                continue
            if cached is not None:
                gone.append(cached[1])
            state = _peer_state(cards)
            cache[cards.node] = (cards, state)
            new.append(state)
        if gone or new:
            self.supply = self.supply - placement.supply_of(gone) + placement.supply_of(new)

    def states(self, peers: Sequence[PeerCards]) -> list[placement.NodeState]:
        self.prepare(peers)
        cache = self._states
        out = [cache[cards.node][1] for cards in peers]
        if len(cache) > len(out):  # peers gone: forget them
            seen = {p.node for p in peers}
            gone = [cache.pop(node)[1] for node in [n for n in cache if n not in seen]]
            self.supply = self.supply - placement.supply_of(gone)
        return out


def _peer_state(peer: PeerCards) -> placement.NodeState:
    return placement.NodeState(
        peer.node,
        tuple(
            placement.CardState(
                id=d.id,
                memory_total_mib=d.memory_total_mib,
                memory_free_mib=d.memory_free_mib,
                compute_free_pct=d.compute_free_pct,
                slices=d.slices,
                max_slices=d.max_slices,
                model=d.model,
                node=peer.node,
                healthy=d.health == "ok",
            )
            for d in peer.devices
        ),
        cpu_free_milli=peer.cpu_free_milli,
        memory_free_mib=peer.host_memory_free_mib,
    )


def place_across(
    placer: placement.Placer,
    request: placement.Request,
    local: placement.NodeState | None,
    peers: Sequence[placement.NodeState],
    limit: int = 10,
) -> list[PlacedCandidate]:
    """Rank (node, card) pairs over this node and every placeable peer with the placer the
    node uses for itself (a card of a peer scores exactly as it would on that peer)."""
    nodes = [local, *peers] if local is not None else list(peers)
    by_id = {n.id: n for n in nodes}
    out = []
    for c in placer.rank_nodes(nodes, request, limit=limit, every_card=True):
        node = by_id[c.node]
        card = next(x for x in node.cards if x.id == c.devices[0])
        out.append(
            PlacedCandidate(
                node=c.node,
                device=c.devices[0],
                model=card.model,
                score=c.score,
                memory_free_after_mib=c.memory_free_after_mib,
                compute_free_after_pct=c.compute_free_after_pct,
                local=local is not None and c.node == local.id,
            )
        )
    return out
