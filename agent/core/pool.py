"""What the core needs from the pool (implemented by ``agent.bus``; standalone otherwise)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
class Peer:
    node: str
    state: str
    placeable: bool
    age_s: float
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
    """Peers as placement sees them, rebuilt only for peers whose record changed (a peer's
    :class:`Peer` is replaced, never mutated, when news of it arrives), so ranking a pool of
    thousands costs one look per peer, not a conversion. Keeps the healthy cards per model
    and free capacity of the peers it last saw (:attr:`supply`) up to date as it goes."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[Peer, placement.NodeState]] = {}
        self.supply = placement.Supply()

    def states(self, peers: Sequence[Peer]) -> list[placement.NodeState]:
        out = []
        cache = self._states
        for peer in peers:
            cached = cache.get(peer.node)
            if cached is None or _changed(cached[0], peer):
                if cached is not None:
                    self.supply = self.supply - placement.supply_of([cached[1]])
                cached = (peer, _peer_state(peer))
                self.supply = self.supply + placement.supply_of([cached[1]])
                cache[peer.node] = cached
            out.append(cached[1])
        if len(cache) > len(out):  # peers gone: forget them
            seen = {p.node for p in peers}
            for node in [n for n in cache if n not in seen]:
                self.supply = self.supply - placement.supply_of([cache.pop(node)[1]])
        return out


def _changed(old: Peer, new: Peer) -> bool:
    """Peers are rebuilt on every read; their cards only when news arrives."""
    return (
        old.devices is not new.devices
        or old.cpu_free_milli != new.cpu_free_milli
        or old.host_memory_free_mib != new.host_memory_free_mib
    )


def _peer_state(peer: Peer) -> placement.NodeState:
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
