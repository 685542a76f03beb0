"""Frozen data types shared by every layer.

Units live in the names (``memory_mib``, ``compute_pct``, ``power_w``); ``None`` means
"not supported / not known", never zero.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Vendor(enum.StrEnum):
    NVIDIA = "nvidia"
    ASCEND = "ascend"
    MOCK = "mock"


class Health(enum.StrEnum):
    OK = "ok"
    UNHEALTHY = "unhealthy"
    LOST = "lost"
    UNKNOWN = "unknown"


class SliceState(enum.StrEnum):
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Device:
    """One accelerator as a backend discovered it. ``id`` is stable across restarts."""

    id: str
    backend: str
    vendor: Vendor
    model: str
    index: int
    memory_total_mib: int
    uuid: str | None = None
    pci_bus_id: str | None = None
    health: Health = Health.OK
    health_reason: str | None = None
    # Hardware partitions (e.g. MIG instances) reported as fixed slices we do not re-slice.
    hardware_partitions: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """What one process uses on one device in the last sample."""

    pid: int
    memory_mib: float | None
    utilisation_pct: float | None
    start_time: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """Live telemetry of one device."""

    device_id: str
    memory_used_mib: float | None
    utilisation_pct: float | None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: tuple[ProcessUsage, ...] = ()
    health: Health = Health.OK
    health_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process identified so that a recycled pid is never mistaken for the old one."""

    pid: int
    start_time: float


@dataclass(frozen=True, slots=True)
class Slice:
    id: str
    device: str
    memory_mib: int
    compute_pct: int
    owner_uid: int
    state: SliceState
    created_at: float
    token: str
    labels: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    expires_at: float | None = None
    borrower: str | None = None
    request_id: str | None = None
    ended_at: float | None = None
    processes: tuple[ProcessRef, ...] = ()
    #: Host CPU (milli-CPUs) and memory (MiB) the slice holds besides its card share.
    cpu_milli: int = 0
    host_memory_mib: int = 0


@dataclass(frozen=True, slots=True)
class SliceRequest:
    memory_mib: int
    compute_pct: int
    owner_uid: int
    device: str | None = None
    ttl_s: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    request_id: str | None = None
    borrower: str | None = None
    #: Allowed card models, lower case (empty: any); see agent.placement.model_matches.
    models: frozenset[str] = frozenset()
    #: Host CPU (milli-CPUs) and memory (MiB) the job needs besides its card share.
    cpu_milli: int = 0
    host_memory_mib: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    kind: str
    data: Mapping[str, object]
    slice_id: str | None = None
