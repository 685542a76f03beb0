"""Lending across real agents: borrow, renew, return; TTL lapse; preemption by a local
allocation; the borrower going away."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.broker import MOSQUITTO, Mosquitto, Subscriber, mqtt_config, topic_root
from tests.harness import AgentProcess, json_out, wait_for

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

ONE_CARD = '[{ model = "MockA100-80G", memory_mib = 81920, count = 1 }]'
H100 = '[{ model = "MockH100-80G", memory_mib = 81920, count = 1 }]'


def pair(
    broker: Mosquitto,
    agent_factory: Callable[..., AgentProcess],
    keepalive_s: int = 2,
    lender_devices: str = ONE_CARD,
    root: str | None = None,
    lender_pool: str = "",
) -> tuple[AgentProcess, AgentProcess]:
    """Borrower ``a`` and lender ``b``, each seeing the other."""
    root = root or topic_root()
    a = agent_factory(node="a", config=mqtt_config(broker, root, "a", keepalive_s=keepalive_s))
    b = agent_factory(
        node="b",
        config=mqtt_config(broker, root, "b", keepalive_s=keepalive_s, pool=lender_pool),
        mock_devices=lender_devices,
    )
    wait_for(lambda: placeable(a) == {"b"} and placeable(b) == {"a"}, 5)
    return a, b


def placeable(agent: AgentProcess) -> set[str]:
    return {p["node"] for p in agent.api("GET", "/v1/pool")[1] if p["placeable"]}


def lender_slice(lender: AgentProcess, slice_id: str) -> dict[str, Any]:
    status, body, _ = lender.api("GET", f"/v1/slices/{slice_id}")
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def event_kinds(agent: AgentProcess) -> list[str]:
    return [e["kind"] for e in json_out(agent.xpuctl("--json", "events", "--limit", "200"))]


def test_borrow_renew_and_return(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pair(broker, agent_factory)
    started = time.monotonic()
    lease = json_out(
        a.xpuctl("--json", "borrow", "--memory", "8GiB", "--compute", "30", "--ttl", "3")
    )
    print(f"borrow round trip (xpuctl included) {time.monotonic() - started:.3f}s")
    assert lease["lender"] == "b" and lease["memory_mib"] == 8192 and lease["compute_pct"] == 30
    env = lease["env"]
    assert env["XPU_SLICE_ID"] == lease["slice_id"] and env["XPU_SLICE_TOKEN"]
    assert env["XPU_DEVICE"] == lease["device"] == "mock-0"
    lent = lender_slice(b, lease["slice_id"])
    assert lent["borrower"] == "a" and lent["state"] == "active"
    assert lent["labels"] == {"lent-to": "a"}

    # The borrower renews at half the TTL: after twice the TTL the lease is still alive.
    first_expiry = lent["expires_at"]
    time.sleep(6)
    lent = lender_slice(b, lease["slice_id"])
    assert lent["state"] == "active" and lent["expires_at"] > first_expiry + 2
    listed = json_out(a.xpuctl("--json", "leases"))
    assert [x["slice_id"] for x in listed] == [lease["slice_id"]]
    assert listed[0]["expires_at"] > lease["expires_at"]
    assert "slice.renewed" in event_kinds(b)
    table = a.xpuctl("leases")
    assert table.returncode == 0 and lease["slice_id"] in table.stdout

    # Returning it ends the slice on the lender at once.
    returned = json_out(a.xpuctl("--json", "return", lease["slice_id"]))
    assert returned["slice_id"] == lease["slice_id"]
    assert lender_slice(b, lease["slice_id"])["state"] == "released"
    assert json_out(a.xpuctl("--json", "leases")) == []
    kinds = event_kinds(a)
    assert "lease.borrowed" in kinds and "lease.returned" in kinds
    again = a.xpuctl("return", lease["slice_id"])
    assert again.returncode == 4, again.stderr


def test_borrow_refusals_map_to_exit_codes(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    root = topic_root()
    a = agent_factory(node="a", config=mqtt_config(broker, root, "a"))
    agent_factory(
        node="stingy",
        config=mqtt_config(broker, root, "stingy", pool="lend = false"),
        mock_devices=H100,
    )
    agent_factory(node="h", config=mqtt_config(broker, root, "h"), mock_devices=H100)
    wait_for(lambda: placeable(a) == {"stingy", "h"}, 5)
    row = next(p for p in a.api("GET", "/v1/pool")[1] if p["node"] == "stingy")
    assert row["lends"] is False and row["lendable_memory_mib"] == 0

    refused = a.xpuctl("borrow", "--memory", "1GiB", "--compute", "10", "--node", "stingy")
    assert refused.returncode == 3, refused.stderr  # 403: does not lend
    assert "does not lend" in refused.stderr
    too_big = a.xpuctl("borrow", "--memory", "100GiB", "--compute", "10", "--node", "h")
    assert too_big.returncode == 5, too_big.stderr  # 409: does not fit
    unknown = a.xpuctl("borrow", "--memory", "1GiB", "--compute", "10", "--node", "nobody")
    assert unknown.returncode == 4, unknown.stderr
    no_model = a.xpuctl("borrow", "--memory", "1GiB", "--compute", "10", "--model", "910B")
    assert no_model.returncode == 5, no_model.stderr

    # Without --node: the best placeable peer that lends, here h (stingy does not lend).
    lease = json_out(
        a.xpuctl("--json", "borrow", "--memory", "1GiB", "--compute", "10", "--model", "H100")
    )
    assert lease["lender"] == "h"


def test_ttl_lapse_when_the_borrower_stops_renewing(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    # A long keepalive: the frozen borrower stays "online" while its lease lapses.
    a, b = pair(broker, agent_factory, keepalive_s=20)
    lease = json_out(
        a.xpuctl("--json", "borrow", "--memory", "4GiB", "--compute", "20", "--ttl", "2")
    )
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: lender_slice(b, lease["slice_id"])["state"] == "expired", 6)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    # Back, the borrower learns (notice or its own clock) and drops the lease.
    wait_for(lambda: json_out(a.xpuctl("--json", "leases")) == [], 5)
    assert "lease.expired" in event_kinds(a)


def test_local_allocation_preempts_lent_slices(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    root = topic_root()
    a, b = pair(broker, agent_factory, root=root)
    small = json_out(a.xpuctl("--json", "borrow", "--memory", "8GiB", "--compute", "20"))
    big = json_out(a.xpuctl("--json", "borrow", "--memory", "40GiB", "--compute", "50"))
    # b's one card: 48 GiB / 70 % lent; a local 40 GiB / 50 % does not fit beside them.
    # Reclaiming the newest lent slice alone is enough.
    with Subscriber(broker, f"{root}/z/nodes/a/events") as events_topic:
        local = json_out(b.xpuctl("--json", "alloc", "--memory", "40GiB", "--compute", "50"))
        # ...and so does anyone watching the borrower's events topic.
        wait_for(lambda: any(b"lease.reclaimed" in m for _, m in events_topic.messages), 5)
    assert local["state"] == "active" and local["borrower"] is None
    assert lender_slice(b, big["slice_id"])["state"] == "released"
    assert lender_slice(b, small["slice_id"])["state"] == "active"
    # The borrower hears of it (a notice from the lender) and records an event.
    wait_for(
        lambda: (
            [x["slice_id"] for x in json_out(a.xpuctl("--json", "leases"))] == [small["slice_id"]]
        ),
        5,
    )
    events = json_out(a.xpuctl("--json", "events", "--limit", "50"))
    reclaimed = [e for e in events if e["kind"] == "lease.reclaimed"]
    assert [e["slice_id"] for e in reclaimed] == [big["slice_id"]]
    # A local request that cannot fit even with every lent slice gone keeps them.
    refused = b.xpuctl("alloc", "--memory", "60GiB", "--compute", "10")
    assert refused.returncode == 5
    assert lender_slice(b, small["slice_id"])["state"] == "active"


def test_a_dead_borrowers_leases_lapse_after_the_grace(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    # Offline is not abandonment by itself (a restarted borrower renews its leases), but
    # a dead borrower's leases are cut to pool.borrower_grace_s, not left for their TTL.
    a, b = pair(broker, agent_factory, lender_pool="borrower_grace_s = 2")
    lease = json_out(a.xpuctl("--json", "borrow", "--memory", "8GiB", "--compute", "30"))
    first = lender_slice(b, lease["slice_id"])["expires_at"]
    assert first is not None and first > time.time() + 500  # pool.lease_ttl_s (600 s)
    a.kill9()
    started = time.monotonic()
    wait_for(lambda: lender_slice(b, lease["slice_id"])["state"] == "expired", 8)
    print(f"lent slice lapsed {time.monotonic() - started:.2f}s after the borrower died")
    assert "lease cut to the grace" in b.log()
    assert lender_slice(b, lease["slice_id"])["end_reason"] == "ttl lapsed"


def test_an_idle_lend_true_slice_is_lent_and_taken_back_when_its_owner_returns(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pair(broker, agent_factory, lender_pool="idle_after_s = 1")
    own = json_out(
        b.xpuctl("--json", "alloc", "--memory", "60GiB", "--compute", "80", "--label", "lend=true")
    )
    # The card has 20 GiB / 20 % free: 40 GiB / 50 % fits only in the idle slice's share,
    # and only once it has been idle for pool.idle_after_s.
    early = a.xpuctl("borrow", "--memory", "40GiB", "--compute", "50", "--node", "b")
    assert early.returncode == 5, early.stderr
    time.sleep(1.5)
    lease = json_out(
        a.xpuctl("--json", "borrow", "--memory", "40GiB", "--compute", "50", "--node", "b")
    )
    lent = lender_slice(b, lease["slice_id"])
    assert lent["labels"] == {"lent-to": "a", "lent-from": own["id"]}
    # Lent out of the share, not the card: the card's allocation is the owner's alone.
    card = b.api("GET", "/v1/devices")[1][0]
    assert (card["allocated_memory_mib"], card["allocated_compute_pct"]) == (60 * 1024, 80)
    # The owner binds a process: the lent part ends at once, the borrower is told why.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        b.xpuctl("attach", own["id"], "--pid", str(sleeper.pid)).check_returncode()
        ended = lender_slice(b, lease["slice_id"])
        assert ended["state"] == "released"
        assert ended["end_reason"] == f"the owner of {own['id']} is back"
        wait_for(lambda: json_out(a.xpuctl("--json", "leases")) == [], 5)
        status, after, _ = a.api("GET", f"/v1/pool/leases/{lease['slice_id']}")
        assert status == 200 and after["state"] == "reclaimed"
        assert after["reason"] == f"the owner of {own['id']} is back"
        assert lender_slice(b, own["id"])["state"] == "active"
    finally:
        sleeper.kill()
        sleeper.wait()
