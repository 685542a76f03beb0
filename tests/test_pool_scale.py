"""A zone of thousands of peers on a real Mosquitto: a new agent gets every one of them
whole, and reading that pool never stalls the agent's other requests."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from agent.bus.topics import Topics
from tests import sim_peers
from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, topic_root
from tests.harness import PY, AgentProcess, wait_for

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

PEERS = 3000
CARDS = 8
READER = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b"GET /v1/pool HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
    while s.recv(1 << 20):
        pass
    s.close()
"""


@pytest.fixture(scope="module")
def zone() -> Iterator[tuple[Mosquitto, str]]:
    broker = Mosquitto().start()
    root = topic_root()
    client = sim_peers.connect(broker)
    try:
        nodes = [f"sim-{i:05d}" for i in range(PEERS)]
        sim_peers.publish(
            client, Topics(root, "z", "sim"), nodes, lambda _i: ["MockA100-80G"] * CARDS
        )
    finally:
        client.loop_stop()
        client.disconnect()
    yield broker, root
    broker.cleanup()


def test_every_retained_peer_arrives_whole(
    zone: tuple[Mosquitto, str], agent_factory: Callable[..., AgentProcess]
) -> None:
    broker, root = zone
    agent = agent_factory(
        node="newcomer",
        config=mqtt_config(broker, root, "newcomer", keepalive_s=30).replace(
            "peer_ttl_s = 10", "peer_ttl_s = 3600"
        ),
    )
    started = time.monotonic()

    def complete() -> int:
        peers = agent.api("GET", "/v1/pool?placeable=1")[1]
        return sum(len(p["devices"]) == CARDS for p in peers)

    wait_for(lambda: complete() == PEERS, 30, 0.2)
    print(f"{PEERS} peers whole after {time.monotonic() - started:.1f}s")
    mqtt = agent.api("GET", "/v1/node")[1]["mqtt"]
    assert mqtt["peers_incomplete"] == 0, mqtt
    one = agent.api("GET", "/v1/pool/peers/sim-00042")
    assert one[0] == 200 and len(one[1]["devices"]) == CARDS
    assert agent.api("GET", "/v1/pool/peers/nobody")[0] == 404
    assert len(agent.api("GET", "/v1/pool?node=sim-00007")[1]) == 1
    assert agent.api("GET", "/v1/pool?model=H100")[1] == []

    # Reading the whole pool over and over (two other processes, bodies discarded) does not
    # hold up a concurrent health check.
    readers = [subprocess.Popen([PY, "-c", READER, str(agent.socket), "8"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        health = []
        for _ in range(30):
            t0 = time.monotonic()
            assert agent.api("GET", "/v1/health")[0] == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.02)
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()
    median_ms = 1000 * statistics.median(health)
    print(f"health under pool reads: median {median_ms:.1f} ms, max {1000 * max(health):.1f} ms")
    assert median_ms < 10 and max(health) < 0.25, (median_ms, max(health))
