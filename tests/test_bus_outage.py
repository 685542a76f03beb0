"""The broker goes away for 30 s: the local API keeps answering, and the pool
reconverges once it is back (it lost every retained message: no persistence)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, topic_root
from tests.harness import AgentProcess, json_out, wait_for

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

OUTAGE_S = 30.0


def placeable(agent: AgentProcess) -> set[str]:
    return {p["node"] for p in agent.api("GET", "/v1/pool")[1] if p["placeable"]}


def test_broker_outage_keeps_the_api_up_and_the_pool_reconverges(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    broker = Mosquitto().start()
    try:
        root = topic_root()
        # peer_ttl_s 10 < the outage: last-heard peers turn stale, then come back.
        a = agent_factory(node="a", config=mqtt_config(broker, root, "a"))
        b = agent_factory(node="b", config=mqtt_config(broker, root, "b"))
        wait_for(lambda: placeable(a) == {"b"} and placeable(b) == {"a"}, 5)

        broker.stop()
        down_at = time.monotonic()
        # The agents notice the closed link within moments (a busy CI host may take a few
        # hundred ms); from then on, for the whole outage, none may claim to be connected.
        wait_for(
            lambda: all(
                x.api("GET", "/v1/node")[1]["mqtt"]["state"] != "connected" for x in (a, b)
            ),
            3,
            0.05,
        )
        slowest = 0.0
        states: set[str] = set()
        allocated = False
        while time.monotonic() - down_at < OUTAGE_S:
            for agent in (a, b):
                started = time.monotonic()
                status, node, _ = agent.api("GET", "/v1/node")
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200
                states.add(node["mqtt"]["state"])
            if not allocated and time.monotonic() - down_at > 5:
                # Changes while the bus is down are published once it is back.
                json_out(a.xpuctl("--json", "alloc", "--memory", "8GiB", "--compute", "30"))
                allocated = True
            time.sleep(0.5)
        print(f"slowest local API answer during the outage: {slowest * 1000:.1f} ms")
        assert slowest < 1.0
        assert states <= {"connecting", "disconnected"}
        # Not placeable: unheard for longer than peer_ttl_s (stale), or offline if the
        # broker sent the wills on its way down, or forgotten after three TTLs.
        assert placeable(a) == set() and placeable(b) == set()

        broker.start()
        back_at = time.monotonic()
        wait_for(lambda: placeable(a) == {"b"} and placeable(b) == {"a"}, 15)
        wait_for(
            lambda: any(
                d["slices"] == 1 for p in b.api("GET", "/v1/pool")[1] for d in p["devices"]
            ),
            5,
        )
        print(f"pool reconverged {time.monotonic() - back_at:.2f}s after the broker returned")
        for agent in (a, b):
            mqtt = agent.api("GET", "/v1/node")[1]["mqtt"]
            assert mqtt["connected"] and mqtt["connects"] == 2
            assert "mqtt reconnected" in agent.log()
    finally:
        broker.cleanup()
