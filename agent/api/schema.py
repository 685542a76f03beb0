"""Bodies of the local API, shared by the server and ``xpuctl``.

Only msgspec is imported here so that the client stays light.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

API_PREFIX = "/v1"
PROBLEM_TYPE_BASE = "https://xpu-agent.dev/problems/"

# Every number and string a caller sends is bounded here, at the edge: msgspec refuses
# anything outside with a 400 that names the field, and the OpenAPI document shows the
# same bounds (it is generated from these types).
#: 1 MiB .. 1 PiB: no card is larger, and the ledger's integers stay far from overflow.
MemoryMib = Annotated[int, msgspec.Meta(ge=1, le=2**30)]
ComputePct = Annotated[int, msgspec.Meta(ge=1, le=100)]
#: A slice or lease lives at most a year; a longer one is a mistake, not a plan.
MAX_TTL_S = 366 * 86400.0
TtlS = Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_S)]
#: Linux's pid_max is at most 2^22.
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**22)]
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
NodeName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,253}$")]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=32)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
#: Host CPU in milli-CPUs (at most 64k CPUs) and host memory (as card memory).
CpuMilli = Annotated[int, msgspec.Meta(ge=0, le=64_000_000)]
HostMemoryMib = Annotated[int, msgspec.Meta(ge=0, le=2**30)]
#: Allowed card models, ``A100|H100`` (a name matches a model containing it, no digit after).
Models = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: Event sequence numbers are SQLite integers (signed 64 bits).
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class AllocateBody(Body):
    """A slice to allocate on this node (``POST /v1/slices``)."""

    memory_mib: MemoryMib
    compute_pct: ComputePct
    device: Name | None = None
    ttl_s: TtlS | None = None
    labels: Labels = msgspec.field(default_factory=dict)
    priority: Priority = 0
    request_id: Name | None = None
    model: Models | None = None
    cpu_milli: CpuMilli = 0
    host_memory_mib: HostMemoryMib = 0


class BindBody(Body):
    """A process to bind to a slice (yours, or one that presents the slice's token)."""

    pid: Pid


class PlaceBody(Body):
    """A request to rank (node, device) candidates for, across the pool."""

    memory_mib: MemoryMib
    compute_pct: ComputePct
    model: Models | None = None
    limit: Limit = 10
    cpu_milli: CpuMilli = 0
    host_memory_mib: HostMemoryMib = 0


class BorrowBody(Body):
    """A lease to borrow from a peer (``node``, else the best one that lends)."""

    memory_mib: MemoryMib
    compute_pct: ComputePct
    node: NodeName | None = None
    ttl_s: TtlS | None = None
    model: Models | None = None
    cpu_milli: CpuMilli = 0
    host_memory_mib: HostMemoryMib = 0
    #: The lease lives as long as the calling process: when it exits, the agent returns
    #: the lease (``xpuctl run --pool``), instead of renewing it until returned.
    hold: bool = False


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    extra: dict[str, Any] | None = None


class ProcessView(msgspec.Struct, kw_only=True):
    pid: int
    start_time: float


class SliceUsageView(msgspec.Struct, kw_only=True):
    memory_used_mib: float
    compute_used_pct: float
    throttled: bool
    last_action: str | None


class SliceView(msgspec.Struct, kw_only=True):
    id: str
    device: str
    memory_mib: int
    compute_pct: int
    owner_uid: int
    state: str
    labels: dict[str, str]
    priority: int
    created_at: float
    expires_at: float | None
    ended_at: float | None
    #: Why it ended (released by whom, ttl lapsed, local demand, ...).
    end_reason: str | None = None
    borrower: str | None
    request_id: str | None
    processes: list[ProcessView]
    usage: SliceUsageView | None
    cpu_milli: int = 0
    host_memory_mib: int = 0
    #: Only shown to the slice's owner and admins: it carries the slice token.
    env: dict[str, str] | None


class EnforcementView(msgspec.Struct, kw_only=True):
    """The mechanism holding the card's slices to their memory (agent.core.ladder), and
    why each stronger one was refused."""

    rung: str
    refused: dict[str, str] = {}


class DeviceView(msgspec.Struct, kw_only=True):
    id: str
    backend: str
    vendor: str
    model: str
    index: int
    uuid: str | None
    pci_bus_id: str | None
    health: str
    health_reason: str | None
    memory_total_mib: int
    memory_used_mib: float | None
    utilisation_pct: float | None
    temperature_c: float | None
    power_w: float | None
    allocated_memory_mib: int
    allocated_compute_pct: int
    slice_count: int
    slices: list[SliceView]
    unsliced_pids: list[int]
    hardware_partitions: list[str]
    enforcement: EnforcementView | None = None


class Amount(msgspec.Struct, kw_only=True):
    memory_mib: int
    compute_pct: int
    slices: int


class MqttView(msgspec.Struct, kw_only=True):
    enabled: bool
    connected: bool
    url: str
    state: str
    protocol: str | None = None
    connects: int = 0
    received: int = 0
    published: int = 0
    #: Peer messages dropped, by reason: oversized, malformed, spoofed, stale, ...
    dropped: dict[str, int] = {}
    #: Peers heard of (listed in the pool).
    peers: int = 0
    #: Peers heard of whose cards have not arrived yet (not placeable).
    peers_incomplete: int = 0
    #: Retained state replaced in the intake by newer state before it was read.
    coalesced: int = 0
    #: Sessions replaced because the agent's QoS 1 probe did not come back.
    stalls: int = 0


class HealthView(msgspec.Struct, kw_only=True):
    """Liveness (always 200 while the agent answers) and whether it is degraded, and why."""

    status: str
    version: str
    uptime_s: float
    node: str
    reasons: list[str] = []


class HostView(msgspec.Struct, kw_only=True):
    """Host CPU and memory for slices: the node's less the system reserve, what is free, and
    whether limits are enforced (a delegated cgroup tree) or only accounted."""

    cpu_milli: int
    memory_mib: int
    cpu_free_milli: int
    memory_free_mib: int
    enforced: bool
    limits: str


class NodeView(msgspec.Struct, kw_only=True):
    node: str
    zone: str
    version: str
    uptime_s: float
    health: str
    health_reasons: list[str]
    backends: list[str]
    devices: int
    devices_healthy: int
    capacity: Amount
    allocated: Amount
    free: Amount
    idle: Amount
    mqtt: MqttView
    host: HostView


class EventView(msgspec.Struct, kw_only=True):
    seq: int
    ts: float
    kind: str
    slice_id: str | None
    data: dict[str, Any]


class PeerDeviceView(msgspec.Struct, kw_only=True):
    id: str
    model: str
    vendor: str
    health: str
    memory_total_mib: int
    memory_free_mib: int
    compute_free_pct: int
    slices: int


class PeerView(msgspec.Struct, kw_only=True):
    node: str
    state: str
    placeable: bool
    age_s: float
    agent: str | None
    #: Where the peer is reached to run a job on it (its ``node.address``).
    address: str = ""
    devices: list[PeerDeviceView]
    lendable_memory_mib: int
    lendable_compute_pct: int
    lends: bool = True


class CandidateView(msgspec.Struct, kw_only=True):
    node: str
    device: str
    model: str
    score: float
    memory_free_after_mib: int
    compute_free_after_pct: int
    local: bool


class LeaseView(msgspec.Struct, kw_only=True):
    lender: str
    slice_id: str
    device: str
    memory_mib: int
    compute_pct: int
    expires_at: float | None
    #: Only shown to the borrowing user and admins: it carries the lease token.
    env: dict[str, str]
    owner_uid: int | None = None
    #: Where the lender is reached, and the argv that reaches it (``pool.launcher``).
    address: str = ""
    launcher: list[str] = []
    #: ``xpuctl`` on the lender; whether the token goes in the remote command line.
    remote_xpuctl: str = "xpuctl"
    token_in_command: bool = False
    #: ``active``, or how it ended: ``returned``, ``reclaimed``, ``expired``, ``lost``.
    state: str = "active"
    reason: str | None = None
    ended_at: float | None = None
