"""What the core needs from the pool (implemented by ``agent.bus``; standalone otherwise)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.core.caller import Caller
from agent.errors import NotFound, Unavailable
from agent.ledger import placement


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


@dataclass(frozen=True, slots=True)
class PlacedCandidate:
    candidate: placement.Candidate
    model: str
    local: bool


@dataclass(frozen=True, slots=True)
class Lease:
    lender: str
    slice_id: str
    device: str
    memory_mib: int
    compute_pct: int
    expires_at: float | None
    env: dict[str, str] = field(default_factory=dict)
    owner_uid: int | None = None  # who borrowed it (on the borrowing node)


class Pool(Protocol):
    def link(self) -> LinkState: ...

    def peers(self) -> Sequence[Peer]: ...

    def peer(self, node: str) -> Peer | None:
        """One peer, without building the whole pool."""
        ...

    async def borrow(
        self,
        caller: Caller,
        demand: placement.Demand,
        node: str | None,
        ttl_s: float | None,
        model: str | None,
    ) -> Lease: ...

    def leases(self) -> Sequence[Lease]: ...

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
        demand: placement.Demand,
        node: str | None,
        ttl_s: float | None,
        model: str | None,
    ) -> Lease:
        raise Unavailable("no MQTT bus is configured (mqtt.url is empty): nothing to borrow from")

    def leases(self) -> Sequence[Lease]:
        return ()

    async def give_back(self, caller: Caller, slice_id: str) -> Lease:
        raise NotFound(f"no borrowed lease {slice_id!r}")


def place_across(
    local: Sequence[placement.CardState],
    peers: Sequence[Peer],
    demand: placement.Demand,
    policy: placement.Policy,
    model: str | None = None,
    limit: int = 10,
) -> list[PlacedCandidate]:
    """Rank (node, card) pairs over this node and every placeable peer, with the same
    pure placement function the node uses for itself."""
    cards = list(local)
    local_node = {c.node for c in local}
    for peer in peers:
        if not peer.placeable:
            continue
        cards.extend(
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
        )
    if model:
        wanted = model.lower()
        cards = [c for c in cards if wanted in c.model.lower()]
    models = {(c.node, c.id): c.model for c in cards}
    ranked = placement.rank(cards, demand, policy)[:limit]
    return [PlacedCandidate(c, models[(c.node, c.device)], c.node in local_node) for c in ranked]
