"""The bus's pure parts: topics, payload schemas (and their docs), the peer table's
validation and ordering rules, the drop counters, preemption planning, backoff."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import msgspec
import pytest
import structlog.testing

from agent import placement
from agent.api.schema import PeerView
from agent.api.views import PoolEncoder, peer_view
from agent.bus import payloads
from agent.bus.connection import BACKOFF_MAX_S, BACKOFF_MIN_S, Endpoint, backoff_s
from agent.bus.guard import Guard
from agent.bus.pool import PeerTable
from agent.bus.topics import Address, Kind, Topics
from agent.core import preempt
from agent.model import Slice, SliceState

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mqtt.md"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- topics -------------------------------------------------------------------------------


def test_topics_build_and_parse() -> None:
    t = Topics("xpu/v1", "lab", "n1")
    assert t.status == "xpu/v1/lab/nodes/n1/status"
    assert t.rpc("n2", "borrow") == "xpu/v1/lab/nodes/n2/rpc/borrow"
    assert t.reply_to() == "xpu/v1/lab/nodes/n1/rpc/reply"
    assert t.subscriptions() == [
        ("xpu/v1/lab/nodes/+/status", 0),
        ("xpu/v1/lab/nodes/+/capacity", 0),
        ("xpu/v1/lab/nodes/+/idle", 0),
        ("xpu/v1/lab/nodes/n1/rpc/+", 1),
    ]
    assert t.parse("xpu/v1/lab/nodes/n2/capacity") == Address("n2", Kind.CAPACITY)
    assert t.parse("xpu/v1/lab/nodes/n2/events") == Address("n2", Kind.EVENTS)
    assert t.parse("xpu/v1/lab/nodes/n1/rpc/renew") == Address("n1", Kind.RPC, "renew")
    for foreign in (
        "xpu/v1/other/nodes/n2/status",
        "xpu/v1/lab/nodes/n2/status/extra",
        "xpu/v1/lab/nodes/n2/rpc/",
        "xpu/v1/lab/nodes/n2/bogus",
        "elsewhere",
    ):
        assert t.parse(foreign) is None


def test_endpoint_defaults() -> None:
    assert Endpoint.parse("mqtt://broker") == Endpoint("broker", 1883, False)
    assert Endpoint.parse("mqtts://broker") == Endpoint("broker", 8883, True)
    assert Endpoint.parse("mqtts://b:1234").display() == "mqtts://b:1234"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    for attempt in range(40):
        delay = backoff_s(attempt)
        ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(backoff_s(5), 6) for _ in range(20)}) > 1


# -- payloads and their documentation -------------------------------------------------------


def stamp(node: str = "b", boot: str = "boot1", seq: int = 1, ts: float = 1000.0) -> dict:
    return {"node": node, "boot_id": boot, "seq": seq, "ts": ts}


def capacity(free_mib: int = 1024, **kw: object) -> payloads.Capacity:
    amount = payloads.Amounts(memory_mib=2048, compute_pct=100, slices=10)
    return payloads.Capacity(
        **{**stamp(), **kw},
        devices=[
            payloads.DeviceCapacity(
                id="mock-0",
                model="M",
                vendor="mock",
                health="ok",
                memory_total_mib=2048,
                memory_free_mib=free_mib,
                compute_free_pct=100,
                slice_count=0,
                max_slices=10,
            )
        ],
        capacity=amount,
        allocated=amount,
        free=amount,
    )


def status(state: str = "online", **kw: object) -> payloads.Status:
    return payloads.Status(**{**stamp(), **kw}, state=state, agent="0.1", since=900.0)  # type: ignore[arg-type]


def test_every_payload_round_trips_and_carries_its_schema() -> None:
    body = capacity()
    raw = payloads.encode(body)
    assert json.loads(raw)["schema"] == "xpu.capacity/1"
    assert msgspec.json.decode(raw, type=payloads.Capacity) == body
    for kind in payloads.PUBLISHED:
        schema = payloads.schema_of(kind)
        tag = payloads.schema_tag(kind)
        assert re.fullmatch(r"xpu\.[a-z-]+/1", tag)
        definition = schema["$defs"][kind.__name__]
        assert definition["properties"]["schema"] == {"enum": [tag]}
        assert {"node", "boot_id", "seq", "ts", "schema"} <= set(definition["required"])


def test_requests_decode_as_a_tagged_union_and_tolerate_new_fields() -> None:
    raw = json.dumps(
        {
            "schema": "xpu.renew/1",
            **stamp(node="a"),
            "request_id": "r1",
            "slice_id": "s-1",
            "token": "t",
            "added_in_a_later_version": True,
        }
    ).encode()
    request = msgspec.json.decode(raw, type=payloads.AnyRequest)
    assert isinstance(request, payloads.RenewRequest) and request.slice_id == "s-1"
    assert payloads.METHOD_OF[type(request)] == "renew"


def test_docs_embed_the_generated_schemas() -> None:
    """docs/mqtt.md must show what the code validates (regenerate with
    ``python -m agent.bus.payloads``)."""
    text = DOCS.read_text()
    begin, end = "<!-- schemas:begin -->\n", "<!-- schemas:end -->"
    assert begin in text and end in text
    embedded = text.split(begin, 1)[1].split(end, 1)[0]
    assert embedded.strip() == payloads.schemas_markdown().strip()
    for topic in ("/status", "/capacity", "/idle", "/events", "/rpc/{method}"):
        assert topic in text


# -- the peer table -------------------------------------------------------------------------


def table() -> tuple[PeerTable, Guard, Clock, Clock]:
    mono, wall = Clock(50.0), Clock(1000.0)
    guard = Guard(4096, clock=mono)
    return PeerTable("me", guard, clock=mono, wall=wall), guard, mono, wall


def send(t: PeerTable, body: payloads.Envelope, node: str = "b", retained: bool = False) -> object:
    kind = Kind(payloads.schema_tag(type(body)).split(".")[1].split("/")[0])
    address = Address(node, kind)
    return t.receive(address, payloads.encode(body), f"x/{node}/{kind}", retained)


def test_peer_becomes_placeable_with_status_and_capacity() -> None:
    t, guard, _, _ = table()
    send(t, status(seq=1))
    assert t.peers(90)[0].placeable is False  # no capacity yet
    send(t, capacity(seq=2))
    peer = t.peers(90)[0]
    assert peer.placeable and peer.state == "online" and peer.devices[0].memory_free_mib == 1024
    assert sum(guard.dropped.values()) == 0


def test_cards_are_kept_converted_with_shared_names_and_missing_state_is_listed() -> None:
    t, _, _, _ = table()
    for node in ("b", "c"):
        send(t, status(seq=1, node=node), node=node)
        send(t, capacity(seq=2, node=node), node=node)
    b, c = t.peers(90)
    assert b.devices[0].model == c.devices[0].model
    assert b.devices[0].model is c.devices[0].model  # one string for the fleet, not one each
    assert t.peers(90)[0].devices is b.devices  # converted once, not on every read
    assert {(a.node, a.kind.value) for a in t.missing()} == {("b", "idle"), ("c", "idle")}
    assert t.incomplete() == 0


def test_bad_messages_are_dropped_and_counted() -> None:
    t, guard, _, _ = table()
    send(t, status(seq=1))
    send(t, capacity(seq=2))
    address = Address("b", Kind.CAPACITY)
    assert t.receive(address, b"{", "x") is None
    assert t.receive(address, b"x" * 5000, "x") is None
    assert t.receive(address, payloads.encode(capacity(seq=9, node="eve")), "x") is None
    assert t.receive(address, payloads.encode(capacity(free_mib=1, seq=2)), "x") is None
    assert t.receive(address, payloads.encode(capacity(free_mib=1, seq=1)), "x") is None
    assert t.receive(Address("b", Kind.IDLE), payloads.encode(capacity(seq=10)), "x") is None
    assert guard.dropped["malformed"] == 2
    assert guard.dropped["oversized"] == 1
    assert guard.dropped["spoofed"] == 1
    assert guard.dropped["stale"] == 2
    assert t.peers(90)[0].devices[0].memory_free_mib == 1024


def test_an_exact_duplicate_is_ignored_quietly() -> None:
    """QoS 1 is at-least-once: the same message twice is not an attack."""
    t, guard, _, _ = table()
    send(t, status(seq=1))
    send(t, capacity(seq=2))
    assert send(t, capacity(seq=2)) is None
    assert sum(guard.dropped.values()) == 0
    send(t, capacity(free_mib=7, seq=2))  # same seq, other content: stale
    assert guard.dropped["stale"] == 1


def test_the_will_shares_the_seq_of_its_online_status() -> None:
    t, guard, _, _ = table()
    send(t, status("online", seq=5))
    send(t, capacity(seq=6))
    transition = send(t, status("offline", seq=5))  # the will registered at connect
    assert transition is not None and transition.what == "offline"  # type: ignore[attr-defined]
    assert t.peers(90)[0].state == "offline" and not t.peers(90)[0].placeable
    # ...but a replayed online at that seq is stale, and an older will too.
    send(t, status("online", seq=5))
    send(t, status("offline", seq=4))
    assert guard.dropped["stale"] == 2
    # The next connection (seq 7) says online again.
    send(t, status("online", seq=7))
    assert t.peers(90)[0].placeable


def test_a_new_boot_replaces_the_old_one_and_old_boots_are_stale() -> None:
    t, guard, _, _ = table()
    send(t, status(seq=40, ts=1000.0))
    send(t, capacity(seq=41, ts=1001.0))
    transition = send(t, status(seq=1, boot_id="boot2", ts=1100.0))
    assert transition is not None and transition.what == "rebooted"  # type: ignore[attr-defined]
    assert t.peers(90)[0].placeable is False  # capacity of the new boot not heard yet
    send(t, capacity(seq=2, boot_id="boot2", ts=1100.5))
    assert t.peers(90)[0].placeable
    assert send(t, capacity(seq=99, boot_id="boot1", ts=1002.0)) is None
    assert guard.dropped["stale"] == 1


def test_silent_peers_go_stale_then_are_forgotten() -> None:
    t, _, mono, _ = table()
    send(t, status(seq=1))
    send(t, capacity(seq=2))
    mono.now += 91
    peer = t.peers(90)[0]
    assert peer.state == "stale" and not peer.placeable and peer.age_s == pytest.approx(91)
    assert t.forget_silent(90) == []
    mono.now += 200
    assert t.forget_silent(90) == ["b"]
    assert t.peers(90) == []


def test_retained_messages_are_dated_by_their_timestamp() -> None:
    t, _, _, wall = table()
    wall.now = 1000.0 + 500  # a retained message from 500 s ago, replayed on subscribe
    send(t, status(seq=1, ts=1000.0), retained=True)
    send(t, capacity(seq=2, ts=1000.0), retained=True)
    peer = t.peers(90)[0]
    assert peer.age_s == pytest.approx(500) and peer.state == "stale"
    send(t, capacity(seq=3, ts=1500.0))  # live again
    assert t.peers(90)[0].placeable


def test_a_peer_is_read_again_only_when_news_or_its_state_changes() -> None:
    """Reads reuse a peer's view (10,000 rebuilt per read cost ~90 ms), yet never show an
    old one: news of the peer, or crossing the TTL, gives a new view; the age is live."""
    t, _, mono, _ = table()
    send(t, status(seq=1))
    send(t, capacity(seq=2))
    first = t.peers(90)[0]
    mono.now += 30
    again = t.peers(90)[0]
    assert again is first and again.age_s == pytest.approx(30)  # same view, age off the clock
    send(t, capacity(free_mib=512, seq=3))
    news = t.peers(90)[0]
    assert news is not first and news.devices[0].memory_free_mib == 512
    mono.now += 91
    stale = t.peers(90)[0]
    assert stale.state == "stale" and not stale.placeable and stale is not news


def test_placeable_cards_and_stale_nodes_agree_with_the_full_read() -> None:
    t, _, mono, _ = table()
    for node, seq in (("b", 1), ("c", 1), ("d", 1)):
        send(t, status(seq=seq, node=node), node=node)
    send(t, capacity(seq=2, node="b"), node="b")
    send(t, capacity(seq=2, node="c"), node="c")  # d: no cards yet
    send(t, status("offline", seq=3, node="c"), node="c")
    # Fetched again: what makes a peer placeable first, what only lending needs after.
    assert [(a.node, a.kind.value) for a in t.missing()] == [
        ("d", "capacity"),
        ("b", "idle"),
        ("c", "idle"),
        ("d", "idle"),
    ]
    mono.now += 10
    assert [c.node for c in t.placeable(90)] == ["b"]
    assert t.placeable(90)[0] is t.peers(90)[0].cards  # the very cards placement converts
    assert t.stale(90) == set()
    mono.now += 85
    assert t.placeable(90) == [] and t.stale(90) == {"b", "d"}
    assert {p.node for p in t.peers(90) if p.state == "stale"} == t.stale(90)


def test_the_pool_document_is_the_views_encoded_with_cards_encoded_once() -> None:
    t, _, mono, _ = table()
    for node in ("c", "b", "a"):
        send(t, status(seq=1, node=node), node=node)
        send(t, capacity(seq=2, node=node), node=node)
    encoder = PoolEncoder()

    def expected() -> bytes:
        return msgspec.json.encode([peer_view(p) for p in t.peers(90)])

    assert encoder.encode(t.peers(90)) == expected()
    mono.now += 7.25  # ages move, cards do not
    assert encoder.encode(t.peers(90)) == expected()
    send(t, capacity(free_mib=100, seq=3, node="b"), node="b")  # b's cards change
    body = encoder.encode(t.peers(90))
    assert body == expected() and b'"memory_free_mib":100' in body
    assert encoder.encode([p for p in t.peers(90) if p.node == "a"], whole=False) == (
        msgspec.json.encode([peer_view(t.peers(90)[0])])
    )
    decoded = msgspec.json.decode(body, type=list[PeerView])  # the documented schema
    assert [p.node for p in decoded] == ["a", "b", "c"]


def test_guard_warns_once_per_window() -> None:
    mono = Clock()
    guard = Guard(100, warn_every_s=10, clock=mono)
    with structlog.testing.capture_logs() as logged:
        for _ in range(50):
            guard.drop("malformed", "t")
        mono.now += 11
        guard.drop("malformed", "t")
        guard.drop("spoofed", "t")
    assert guard.dropped["malformed"] == 51 and guard.dropped["spoofed"] == 1
    assert [(e["reason"], e["suppressed"]) for e in logged] == [
        ("malformed", 0),
        ("malformed", 49),
        ("spoofed", 0),
    ]


# -- preemption -----------------------------------------------------------------------------


def card(card_id: str, free_mib: int, free_pct: int, slices: int = 0) -> placement.CardState:
    return placement.CardState(
        id=card_id,
        memory_total_mib=81920,
        memory_free_mib=free_mib,
        compute_free_pct=free_pct,
        slices=slices,
        max_slices=10,
        model="M",
        node="n",
    )


def node(cards: list[placement.CardState]) -> placement.NodeState:
    return placement.NodeState("n", tuple(cards))


def ask(mib: int, pct: int) -> placement.Request:
    return placement.Request(placement.Demand(mib, pct))


def lent(
    slice_id: str, device: str, mib: int, pct: int, priority: int = 0, created: float = 0.0
) -> Slice:
    return Slice(
        id=slice_id,
        device=device,
        memory_mib=mib,
        compute_pct=pct,
        owner_uid=0,
        state=SliceState.ACTIVE,
        created_at=created,
        token="t",
        priority=priority,
        borrower="peer",
    )


def test_preemption_takes_fewest_lowest_priority_newest_first() -> None:
    cards = [card("c0", 0, 0, 3), card("c1", 10000, 10, 2)]
    live = [
        lent("old", "c0", 30000, 40, created=1),
        lent("new", "c0", 30000, 40, created=2),
        lent("vip", "c0", 21920, 20, priority=5, created=3),
        lent("x", "c1", 40000, 40, created=1),
        lent("y", "c1", 31920, 50, created=2),
    ]
    demand = ask(30000, 40)
    best_fit = placement.Placer("best-fit")
    # c0 needs one reclaim (the newest of the lowest priority); c1 needs one too (its
    # newest, y) — equal counts: the placement score of what is left decides, and best fit
    # prefers c0, filled exactly.
    assert preempt.plan(node(cards), live, demand, best_fit) == ["new"]
    assert preempt.plan(node(cards), live, demand, best_fit, device="c1") == ["y"]
    assert preempt.plan(node(cards), live, demand, best_fit, device="c0") == ["new"]
    # Nothing helps a request bigger than a card; local (unlent) slices are never taken.
    assert preempt.plan(node(cards), live, ask(90000, 10), best_fit) == []
    # A model filter leaves out cards of other models.
    only_h100 = placement.Request(placement.Demand(30000, 40), models=frozenset({"h100"}))
    assert preempt.plan(node(cards), live, only_h100, best_fit) == []
    local = [
        Slice(
            id="mine",
            device="c0",
            memory_mib=81920,
            compute_pct=100,
            owner_uid=0,
            state=SliceState.ACTIVE,
            created_at=0,
            token="t",
        )
    ]
    assert preempt.plan(node([card("c0", 0, 0, 1)]), local, demand, best_fit) == []


def test_preemption_takes_as_many_as_needed() -> None:
    cards = [card("c0", 0, 10, 3)]
    live = [lent(f"s{i}", "c0", 27306, 30, created=i) for i in range(3)]
    assert preempt.plan(node(cards), live, ask(50000, 60), placement.Placer()) == [
        "s2",
        "s1",
    ]


# -- the lender's inbox ----------------------------------------------------------------------


def test_fair_inbox_bounds_each_requester_and_serves_them_in_turn() -> None:
    from agent.bus.inbox import FairInbox

    now = [0.0]

    async def scenario() -> list[object]:
        inbox = FairInbox(per_requester=3, total=5, rate_per_s=2.0, clock=lambda: now[0])
        flood = [("flood", i) for i in range(5)]
        accepted = [inbox.put("flood", j) for j in flood]  # type: ignore[arg-type]
        assert accepted == [True, True, True, False, False]  # its own queue is full
        assert inbox.put("peer", ("peer", 0))  # type: ignore[arg-type]
        assert inbox.put("peer", ("peer", 1))  # type: ignore[arg-type]
        assert not inbox.put("third", ("third", 0))  # type: ignore[arg-type]  # the total
        served = [await inbox.get() for _ in range(5)]
        # Served in turn: the peer's first request does not wait behind the whole flood.
        assert served.index(("peer", 0)) <= 1
        # The flood's queue is empty again, but its bucket is not: 3 taken, none refilled.
        assert not inbox.put("flood", ("flood", 9))  # type: ignore[arg-type]
        now[0] += 1.0  # two tokens back (2 per second)
        assert inbox.put("flood", ("flood", 10))  # type: ignore[arg-type]
        assert inbox.put("flood", ("flood", 11))  # type: ignore[arg-type]
        assert not inbox.put("flood", ("flood", 12))  # type: ignore[arg-type]
        return served

    served = asyncio.run(scenario())
    assert len(served) == 5 and len(set(served)) == 5
