"""Bodies of the local API, shared by the server and ``xpuctl``.

Only msgspec is imported here so that the client stays light.
"""

from __future__ import annotations

from typing import Any

import msgspec

API_PREFIX = "/v1"
PROBLEM_TYPE_BASE = "https://xpu-agent.dev/problems/"


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class AllocateBody(Body):
    memory_mib: int
    compute_pct: int
    device: str | None = None
    ttl_s: float | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    priority: int = 0
    request_id: str | None = None


class BindBody(Body):
    pid: int


class PlaceBody(Body):
    memory_mib: int
    compute_pct: int
    model: str | None = None
    limit: int = 10


class BorrowBody(Body):
    memory_mib: int
    compute_pct: int
    node: str | None = None
    ttl_s: float | None = None
    model: str | None = None


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
    borrower: str | None
    request_id: str | None
    processes: list[ProcessView]
    usage: SliceUsageView | None
    #: Only shown to the slice's owner and admins: it carries the slice token.
    env: dict[str, str] | None


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


class HealthView(msgspec.Struct, kw_only=True):
    status: str
    version: str
    uptime_s: float
    node: str


class NodeView(msgspec.Struct, kw_only=True):
    node: str
    zone: str
    version: str
    uptime_s: float
    health: str
    backends: list[str]
    devices: int
    devices_healthy: int
    capacity: Amount
    allocated: Amount
    free: Amount
    idle: Amount
    mqtt: MqttView


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
