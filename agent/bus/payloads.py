"""Every MQTT payload: versioned msgspec structs (JSON on the wire).

Each payload carries ``schema`` (the tag, e.g. ``"xpu.capacity/1"``), ``node`` (the sender),
``boot_id`` (random per agent start), ``seq`` (monotonic per boot, shared by all the
sender's topics) and ``ts`` (the sender's wall clock). Receivers tolerate unknown fields, so
a version may grow; a change that breaks readers gets a new schema number.

``docs/mqtt.md`` embeds the JSON Schemas generated from these structs
(``python -m agent.bus.payloads``); a test keeps the two equal.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

import msgspec

NodeName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,253}$")]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Mib = Annotated[int, msgspec.Meta(ge=0)]
Pct = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="schema"):
    """Fields every payload has."""

    node: NodeName
    boot_id: Id
    seq: Count
    ts: float


# -- published state (retained) ---------------------------------------------------------


class Status(Envelope, frozen=True, kw_only=True, tag="xpu.status/1"):
    """``nodes/{node}/status``, retained; also the node's last will (``offline``)."""

    state: Literal["online", "offline"]
    agent: Text
    since: float
    #: Where the node is reached to run a job on it (``node.address``).
    address: Text = ""


class SliceUse(msgspec.Struct, frozen=True, kw_only=True):
    id: Id
    memory_mib: Mib
    compute_pct: Pct
    memory_used_mib: Mib
    compute_used_pct: Pct
    priority: int = 0
    borrower: NodeName | None = None


class DeviceCapacity(msgspec.Struct, frozen=True, kw_only=True):
    id: Id
    model: Text
    vendor: Text
    health: Text
    memory_total_mib: Mib
    memory_free_mib: int
    compute_free_pct: int
    slice_count: Count
    max_slices: Count
    memory_used_mib: Mib | None = None
    utilisation_pct: Pct | None = None
    slices: Annotated[list[SliceUse], msgspec.Meta(max_length=1000)] = []
    #: The mechanism holding its slices to their memory (nvml-limits, mps, hami-core,
    #: sampling); empty before it is probed.
    enforcement: Text = ""


class Amounts(msgspec.Struct, frozen=True, kw_only=True):
    memory_mib: int
    compute_pct: int
    slices: int


class Capacity(Envelope, frozen=True, kw_only=True, tag="xpu.capacity/1"):
    """``nodes/{node}/capacity``, retained: per device and node totals."""

    devices: Annotated[list[DeviceCapacity], msgspec.Meta(max_length=1024)]
    capacity: Amounts
    allocated: Amounts
    free: Amounts
    #: Host CPU (milli) and memory (MiB) free for slices (absent from agents before 0.2).
    host_cpu_free_milli: int | None = None
    host_memory_free_mib: int | None = None


class Idle(Envelope, frozen=True, kw_only=True, tag="xpu.idle/1"):
    """``nodes/{node}/idle``, retained: what the node would lend now (zero unless
    ``lend``)."""

    lend: bool
    memory_mib: int
    compute_pct: int
    slices: int
    idle_after_s: float


class EventMessage(Envelope, frozen=True, kw_only=True, tag="xpu.event/1"):
    """``nodes/{node}/events``, not retained: one event of the node's ledger."""

    event_seq: Count
    event_ts: float
    kind: Text
    slice_id: Id | None = None
    data: dict[str, Any] = {}


# -- requests and what comes back (rpc/) --------------------------------------------------


class Request(Envelope, frozen=True, kw_only=True):
    """A request in a lender's inbox. ``node`` is the requester. Over MQTT 5 the response
    topic, correlation data and expiry also travel as properties (which win); over 3.1.1
    only these fields carry them."""

    request_id: Id
    reply_to: Text | None = None
    expires_at: float | None = None


class BorrowRequest(Request, frozen=True, kw_only=True, tag="xpu.borrow/1"):
    memory_mib: Annotated[int, msgspec.Meta(ge=1)]
    compute_pct: Annotated[int, msgspec.Meta(ge=1, le=100)]
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    model: Text | None = None
    cpu_milli: Annotated[int, msgspec.Meta(ge=0, le=64_000_000)] = 0
    host_memory_mib: Annotated[int, msgspec.Meta(ge=0, le=2**30)] = 0


class RenewRequest(Request, frozen=True, kw_only=True, tag="xpu.renew/1"):
    slice_id: Id
    token: Text
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


class ReleaseRequest(Request, frozen=True, kw_only=True, tag="xpu.release/1"):
    slice_id: Id
    token: Text


class PlaceRequest(Request, frozen=True, kw_only=True, tag="xpu.place/1"):
    memory_mib: Annotated[int, msgspec.Meta(ge=1)]
    compute_pct: Annotated[int, msgspec.Meta(ge=1, le=100)]
    model: Text | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


AnyRequest = BorrowRequest | RenewRequest | ReleaseRequest | PlaceRequest
METHOD_OF: dict[type[Request], str] = {
    BorrowRequest: "borrow",
    RenewRequest: "renew",
    ReleaseRequest: "release",
    PlaceRequest: "place",
}


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True):
    slice_id: Id
    token: Text
    device: Id
    model: Text
    memory_mib: Mib
    compute_pct: Pct
    expires_at: float | None
    env: dict[str, str] = {}


class PlacedCard(msgspec.Struct, frozen=True, kw_only=True):
    device: Id
    model: Text
    score: float
    memory_free_after_mib: int
    compute_free_after_pct: int


class Reply(Envelope, frozen=True, kw_only=True, tag="xpu.reply/1"):
    """The lender's answer, in the requester's ``rpc/reply``. ``status`` follows HTTP:
    200/201 ok, 400 bad request, 403 not lending, 404 unknown lease, 409 does not fit."""

    request_id: Id
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    title: Text = ""
    detail: Text = ""
    lease: LeaseGrant | None = None
    candidates: list[PlacedCard] | None = None


class Notice(Envelope, frozen=True, kw_only=True, tag="xpu.notice/1"):
    """A lender tells a borrower that a lease ended without being returned: ``expired``
    (TTL lapsed) or ``reclaimed`` (preempted by a local allocation, or ended by an admin).
    Carries the lease token so that only the lender can have sent it."""

    slice_id: Id
    token: Text
    state: Literal["expired", "reclaimed"]
    #: Why, in the lender's words (``local demand``, ``ttl lapsed``, ...).
    reason: Text = ""


STATE_TYPES: dict[str, type[Status] | type[Capacity] | type[Idle]] = {
    "status": Status,
    "capacity": Capacity,
    "idle": Idle,
}
PUBLISHED: tuple[type[Envelope], ...] = (
    Status,
    Capacity,
    Idle,
    EventMessage,
    BorrowRequest,
    RenewRequest,
    ReleaseRequest,
    PlaceRequest,
    Reply,
    Notice,
)


def encode(payload: Envelope) -> bytes:
    return msgspec.json.encode(payload)


def schema_of(kind: type[Envelope]) -> dict[str, Any]:
    """The JSON Schema of one payload type, self-contained."""
    return msgspec.json.schema(kind)


def schema_tag(kind: type[Envelope]) -> str:
    tag = kind.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def schemas_markdown() -> str:
    """The block ``docs/mqtt.md`` embeds between its schema markers."""
    parts = []
    for kind in PUBLISHED:
        text = json.dumps(schema_of(kind), indent=2, sort_keys=True)
        parts.append(f"#### `{schema_tag(kind)}`\n\n```json\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(schemas_markdown())
