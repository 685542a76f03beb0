"""The bus's topic tree (DESIGN.md §6), built and parsed in one place.

``{root}/{zone}/nodes/{node}/status|capacity|idle|events`` carry a node's published state;
``{root}/{zone}/nodes/{node}/rpc/{method}`` is that node's inbox: requests addressed to it
(``place``, ``borrow``, ``renew``, ``release``), and the ``reply`` and ``notice`` messages
that lenders send back to it. A node writes only under its own ``nodes/{node}/`` and into
other nodes' ``rpc/`` inboxes, and reads only its own inbox: the broker ACL in
``docs/mqtt.md`` enforces exactly that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    STATUS = "status"
    CAPACITY = "capacity"
    IDLE = "idle"
    EVENTS = "events"
    RPC = "rpc"


#: The retained state every node publishes and every peer subscribes to.
STATE_KINDS = (Kind.STATUS, Kind.CAPACITY, Kind.IDLE)
#: Requests a node answers.
METHODS = frozenset({"place", "borrow", "renew", "release"})
#: What lenders send into a borrower's inbox.
REPLY = "reply"
NOTICE = "notice"
#: The agent's own QoS 1 liveness probe (agent.bus.connection).
PROBE = "probe"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a received message was published."""

    node: str
    kind: Kind
    method: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    root: str
    zone: str
    node: str

    @property
    def zone_prefix(self) -> str:
        return f"{self.root}/{self.zone}/nodes/"

    def base(self, node: str | None = None) -> str:
        return f"{self.zone_prefix}{node or self.node}"

    def state(self, kind: Kind, node: str | None = None) -> str:
        return f"{self.base(node)}/{kind.value}"

    @property
    def status(self) -> str:
        return self.state(Kind.STATUS)

    @property
    def capacity(self) -> str:
        return self.state(Kind.CAPACITY)

    @property
    def idle(self) -> str:
        return self.state(Kind.IDLE)

    @property
    def events(self) -> str:
        return self.state(Kind.EVENTS)

    def rpc(self, node: str, method: str) -> str:
        return f"{self.base(node)}/rpc/{method}"

    def reply_to(self, node: str | None = None) -> str:
        """The response topic a requester names: its own inbox's ``reply``."""
        return self.rpc(node or self.node, REPLY)

    def subscriptions(self) -> list[tuple[str, int]]:
        """Every peer's retained state at QoS 0, and this node's inbox at QoS 1.

        State is retained and republished every heartbeat, so a lost copy heals itself;
        at QoS 1 a broker would queue it per subscriber, and Mosquitto drops whatever
        exceeds ``max_queued_messages`` (default 1000): a new agent subscribing to a zone
        of more than ~330 peers (3 retained topics each) would never see them all."""
        peers = [(f"{self.zone_prefix}+/{kind.value}", 0) for kind in STATE_KINDS]
        return [*peers, (f"{self.base()}/rpc/+", 1)]

    def parse(self, topic: str) -> Address | None:
        """The node and kind of a topic in this zone; ``None`` for anything else."""
        if not topic.startswith(self.zone_prefix):
            return None
        parts = topic[len(self.zone_prefix) :].split("/")
        if len(parts) == 2 and parts[1] in {k.value for k in STATE_KINDS}:
            return Address(parts[0], Kind(parts[1]))
        if len(parts) == 2 and parts[1] == Kind.EVENTS.value:
            return Address(parts[0], Kind.EVENTS)
        if len(parts) == 3 and parts[1] == Kind.RPC.value and parts[2]:
            return Address(parts[0], Kind.RPC, parts[2])
        return None
