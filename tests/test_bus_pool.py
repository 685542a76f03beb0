"""Agents on a real Mosquitto see each other: the pool, placement across it, a dead peer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, publish_raw, read_retained, topic_root
from tests.harness import AgentProcess, json_out, wait_for

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

A100 = '[{ model = "MockA100-80G", memory_mib = 81920, count = 2 }]'
H100 = '[{ model = "MockH100-80G", memory_mib = 81920, count = 2 }]'


def placeable(agent: AgentProcess) -> set[str]:
    return {p["node"] for p in json_out(agent.xpuctl("--json", "pool")) if p["placeable"]}


def peer(agent: AgentProcess, node: str) -> dict[str, object] | None:
    status, peers, _ = agent.api("GET", "/v1/pool")
    assert status == 200
    return next((p for p in peers if p["node"] == node), None)


def test_agents_see_each_other_and_each_others_allocations(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    root = topic_root()
    agents = {
        name: agent_factory(
            node=name,
            config=mqtt_config(broker, root, name),
            mock_devices=H100 if name == "c" else A100,
        )
        for name in ("a", "b", "c")
    }
    started = time.monotonic()
    for name, agent in agents.items():
        wait_for(lambda a=agent, n=name: placeable(a) == {"a", "b", "c"} - {n}, 5)
    print(f"pool converged {time.monotonic() - started:.2f}s after the last agent was up")

    # The pool rows carry the peers' cards and what they would lend.
    row = peer(agents["a"], "c")
    assert row is not None and row["state"] == "online" and row["lends"] is True
    assert [d["model"] for d in row["devices"]] == ["MockH100-80G"] * 2  # type: ignore[index]
    assert row["lendable_memory_mib"] == 2 * 81920

    # An allocation on b is in a's and c's view of b within the debounce.
    json_out(agents["b"].xpuctl("--json", "alloc", "--memory", "8GiB", "--compute", "30"))
    started = time.monotonic()
    for viewer in ("a", "c"):
        wait_for(
            lambda v=viewer: any(
                d["slices"] == 1 and d["memory_free_mib"] == 81920 - 8192
                for d in peer(agents[v], "b")["devices"]  # type: ignore[index]
            ),
            5,
        )
    print(f"allocation visible to peers after {time.monotonic() - started:.2f}s")
    text = agents["a"].xpuctl("pool")
    assert text.returncode == 0 and "b" in text.stdout and "online" in text.stdout

    # The node summary reports the link.
    node = json_out(agents["a"].xpuctl("--json", "status"))
    assert node["mqtt"]["state"] == "connected" and node["mqtt"]["protocol"] == "5"

    # kill -9: the broker publishes c's will; the others see c offline, not placeable,
    # well within 1.5 x keepalive (2 s here).
    agents["c"].kill9()
    started = time.monotonic()
    for viewer in ("a", "b"):
        wait_for(lambda v=viewer: not peer(agents[v], "c")["placeable"], 3.0)  # type: ignore[index]
    elapsed = time.monotonic() - started
    assert peer(agents["a"], "c")["state"] == "offline"  # type: ignore[index]
    print(f"killed peer offline for the others after {elapsed:.2f}s")
    assert elapsed < 3.0


def test_clean_stop_says_offline_and_place_filters_by_model(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    root = topic_root()
    a = agent_factory(
        node="a", config=mqtt_config(broker, root, "a", keepalive_s=30), mock_devices=A100
    )
    h = agent_factory(
        node="h", config=mqtt_config(broker, root, "h", keepalive_s=30), mock_devices=H100
    )
    wait_for(lambda: placeable(a) == {"h"} and placeable(h) == {"a"}, 5)

    ranked = json_out(a.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30"))
    assert {(c["node"], c["local"]) for c in ranked} == {("a", True), ("h", False)}
    only_h100 = json_out(
        a.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30", "--model", "H100")
    )
    assert only_h100 and {c["node"] for c in only_h100} == {"h"}
    assert all("H100" in c["model"] for c in only_h100)
    only_a100 = json_out(
        h.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30", "--model", "a100")
    )
    assert only_a100 and {c["node"] for c in only_a100} == {"a"}
    none = json_out(
        a.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30", "--model", "910B")
    )
    assert none == []
    # A set of models, as everywhere: both nodes; "A10" is not the A100.
    both = json_out(
        a.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30", "--model", "A100|H100")
    )
    assert {c["node"] for c in both} == {"a", "h"}
    a10 = json_out(
        a.xpuctl("--json", "place", "--memory", "8GiB", "--compute", "30", "--model", "A10")
    )
    assert a10 == []
    table = a.xpuctl("place", "--memory", "8GiB", "--compute", "30", "--model", "H100")
    assert table.returncode == 0 and "MockH100-80G" in table.stdout

    # SIGTERM: the retained offline goes out before the clean DISCONNECT (which does not
    # fire the will), so the peer knows at once, keepalive 30 s notwithstanding.
    assert h.stop() == 0
    wait_for(lambda: peer(a, "h")["state"] == "offline", 2)  # type: ignore[index]
    retained = read_retained(broker, f"{root}/z/nodes/h/status")
    assert retained is not None and json.loads(retained)["state"] == "offline"
    assert "published offline status" in h.log()


def test_bad_peer_messages_are_dropped_and_counted(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    root = topic_root()
    extra = "max_payload_bytes = 8192"
    a = agent_factory(node="a", config=mqtt_config(broker, root, "a", extra_mqtt=extra))
    b = agent_factory(node="b", config=mqtt_config(broker, root, "b", extra_mqtt=extra))
    wait_for(lambda: placeable(a) == {"b"}, 5)
    before = peer(a, "b")
    capacity = read_retained(broker, f"{root}/z/nodes/b/capacity")
    assert capacity is not None
    genuine = json.loads(capacity)

    def judged() -> int:
        mqtt = a.api("GET", "/v1/node")[1]["mqtt"]
        return int(sum(mqtt["dropped"].values()))

    def send(node: str, kind: str, payload: bytes) -> None:
        # One at a time: messages on one state topic that are still waiting are coalesced
        # (only the newest counts, agent/bus/intake.py), so each is judged before the next.
        seen = judged()
        assert publish_raw(broker, f"{root}/z/nodes/{node}/{kind}", payload) in (0, 16)
        wait_for(lambda: judged() > seen, 5)

    forged = dict(genuine)
    forged["devices"] = []
    send("b", "capacity", b"{not json")  # malformed
    send("b", "capacity", json.dumps({"schema": "xpu.capacity/1", "node": "b"}).encode())
    send("b", "capacity", json.dumps({**forged, "schema": "xpu.capacity/9"}).encode())
    send("b", "idle", b" " * 9000)  # oversized
    send("b", "capacity", json.dumps({**forged, "node": "mallory"}).encode())  # spoofed
    send("b", "capacity", json.dumps({**forged, "seq": genuine["seq"]}).encode())  # replay
    send("b", "capacity", json.dumps({**forged, "seq": genuine["seq"] - 1}).encode())  # stale
    send("b", "status", json.dumps({**forged, "schema": "xpu.status/1"}).encode())  # wrong kind
    for _ in range(20):
        send("b", "idle", b"[]")  # a burst: counted, warned about once per window

    def dropped() -> dict[str, int]:
        counts: dict[str, int] = a.api("GET", "/v1/node")[1]["mqtt"]["dropped"]
        return counts

    wait_for(lambda: sum(dropped().values()) >= 28, 5)
    counts = dropped()
    assert counts["malformed"] == 24, counts
    assert counts["oversized"] == 1 and counts["spoofed"] == 1 and counts["stale"] == 2, counts

    # Nothing changed: the agent is alive, b is still placeable with its real cards.
    after = peer(a, "b")
    assert after is not None and after["placeable"]
    assert after["devices"] == before["devices"]  # type: ignore[index]
    assert a.api("GET", "/v1/health")[0] == 200
    warnings = [line for line in a.log().splitlines() if "dropped mqtt message" in line]
    malformed = [line for line in warnings if '"malformed"' in line]
    assert 1 <= len(malformed) <= 2, malformed  # rate-limited, not one per message
    # b's own later updates are still taken (its seq moved on).
    json_out(b.xpuctl("--json", "alloc", "--memory", "1GiB", "--compute", "10"))
    wait_for(lambda: sum(d["slices"] for d in peer(a, "b")["devices"]) == 1, 5)  # type: ignore[index]
