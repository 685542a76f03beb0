"""Frozen data types shared by every layer.

Units live in the names (``memory_mib``, ``compute_pct``, ``power_w``); ``None`` means
"not supported / not known", never zero.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: The API header that presents a slice's token: a capability for that slice alone (a job
#: dispatched from a borrower binds with it; ``xpuctl run --slice`` sends it).
SLICE_TOKEN_HEADER = "X-XPU-Slice-Token"  # noqa: S105 - a header's name, not a secret


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
    #: Why it ended (``None`` while live): the borrower of a lent slice is told this.
    end_reason: str | None = None
    #: Lent out of this idle ``lend=true`` slice's share (not the card's free capacity);
    #: reclaimed as soon as that slice's owner uses it again.
    lent_from: str | None = None


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
    #: Take the capacity of this idle ``lend=true`` slice (a lender's borrow request).
    lent_from: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    kind: str
    data: Mapping[str, object]
    slice_id: str | None = None


#: The states of a borrowed lease: renewed while ``active``; the others say how it ended.
LeaseState = Literal["active", "returned", "reclaimed", "expired", "lost"]
LEASE_STATES: tuple[LeaseState, ...] = typing.get_args(LeaseState)


@dataclass(frozen=True, slots=True)
class Lease:
    """A slice this node borrowed from a peer. Kept in the borrower's ledger, so that a
    restarted agent goes on renewing what its jobs still run in."""

    lender: str
    slice_id: str
    device: str
    memory_mib: int
    compute_pct: int
    expires_at: float | None  # on this node's clock
    env: Mapping[str, str] = field(default_factory=dict)
    owner_uid: int | None = None  # who borrowed it (on the borrowing node)
    #: Where the lender is reached (its ``node.address``), for the launcher.
    address: str = ""
    #: The lease's capability (also in ``env``); shown to nobody but its owner.
    token: str = ""
    #: The TTL asked for at each renewal.
    ttl_s: float = 600.0
    state: LeaseState = "active"
    reason: str | None = None
    created_at: float = 0.0
    ended_at: float | None = None
    #: The borrowing process whose life the lease follows (``xpuctl run --pool``): when
    #: it is gone the agent returns the lease instead of renewing it.
    holder: ProcessRef | None = None
