"""Pool scale: N simulated peers on one Mosquitto and one real agent.

The peers are lightweight publishers (one MQTT connection publishing every peer's retained
``status``/``capacity``/``idle``, encoded with the agent's own payload types), not full
daemons. Measured:

- time from the agent's start to a full pool view (``GET /v1/pool`` lists all N peers,
  each with all its cards);
- time until every retained message was read (the peers' idle state comes after cards);
- change latency, after that: a peer's capacity changes → visible in the agent's per-peer read
  ``/v1/pool/peers/{node}`` (p50/p99, each sample includes one read, also reported);
- ``POST /v1/pool/place`` over the whole pool (the first call, after the changes,
  then p50 and max of 30 more), three whole ``GET /v1/pool`` built afresh (answer time
  and size; then Python's ``json.loads`` of it),
  the agent's RSS right after that and ``--settle`` seconds after the full view;
- bytes per node per hour at steady state, from a real agent's own publications.

Run: ``python -m benchmarks.pool_scale --peers 1000 2000 [--devices 8] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from agent.bus.topics import Kind, Topics
from tests import sim_peers
from tests.broker import Mosquitto, mqtt_config
from tests.harness import AgentProcess, _UnixConnection, short_tmpdir

ZONE = "z"


def _client(broker: Mosquitto) -> Any:
    return sim_peers.connect(broker)


def _capacity(node: str, boot: str, seq: int, devices: int, free_mib: int) -> bytes:
    return sim_peers.capacity(
        node,
        boot,
        seq,
        ["MockA100-80G"] * devices,
        lambda i: free_mib if i == 0 else sim_peers.CARD_MIB,
    )


def _publish_peers(client: Any, topics: Topics, n: int, devices: int) -> dict[str, str]:
    nodes = [f"sim-{i:05d}" for i in range(n)]
    return sim_peers.publish(client, topics, nodes, lambda _i: ["MockA100-80G"] * devices)


def _pool(agent: AgentProcess) -> list[dict[str, Any]]:
    status, peers, _ = agent.api("GET", "/v1/pool")
    assert status == 200
    return list(peers)


def _raw(agent: AgentProcess, path: str) -> bytes:
    """One GET, the body as bytes: the agent's answer time without the client's decoding."""
    connection = _UnixConnection(str(agent.socket), timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200, response.status
        return response.read()
    finally:
        connection.close()


def _wait_full_view(agent: AgentProcess, n: int, devices: int, started: float) -> float:
    """Seconds from ``started`` until every peer is listed with all its cards. Polls the
    agent's cheap counters (``GET /v1/node``: peers heard, peers without cards) rather than
    the whole pool, whose reads would compete with the intake being measured; the whole
    pool is read to confirm once the counters say so."""
    while True:
        if time.monotonic() - started > 300:
            raise TimeoutError(f"pool never filled: {_complete(agent, devices)} of {n}")
        status, node, _ = agent.api("GET", "/v1/node")
        mqtt = node["mqtt"] if status == 200 else {}
        if mqtt.get("peers") == n and mqtt.get("peers_incomplete") == 0:
            at = time.monotonic() - started
            if _complete(agent, devices) == n:
                return at
        time.sleep(0.02)


def _wait_synced(agent: AgentProcess, messages: int, started: float) -> float:
    """Seconds from ``started`` until the agent has read ``messages`` (every retained one)."""
    while time.monotonic() - started < 300:
        status, node, _ = agent.api("GET", "/v1/node")
        if status == 200 and node["mqtt"]["received"] >= messages:
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {messages} messages read")


def _complete(agent: AgentProcess, devices: int) -> int:
    """Peers listed with all their cards (status alone is not a view of a peer)."""
    return sum(len(p["devices"]) == devices for p in _pool(agent))


def _one_scale(n: int, devices: int, changes: int, settle_s: float) -> dict[str, Any]:
    broker = Mosquitto().start()
    root = f"bench-{uuid.uuid4().hex[:6]}"
    topics = Topics(root, ZONE, "bench")
    client = _client(broker)
    config = mqtt_config(broker, root, "observer", keepalive_s=30, zone=ZONE)
    config = config.replace("heartbeat_s = 5", "heartbeat_s = 30")
    agent = AgentProcess(
        short_tmpdir(), config=config.replace("peer_ttl_s = 10", "peer_ttl_s = 3600")
    )
    try:
        boots = _publish_peers(client, topics, n, devices)
        started = time.monotonic()
        agent.start()
        full_view_s = _wait_full_view(agent, n, devices, started)
        # Changes are timed once the start-up sync is over (every retained message read:
        # the peers' idle state is fetched after their cards), not while it still runs.
        synced_s = _wait_synced(agent, 3 * n, started)
        rng = random.Random(7)
        latencies, polls = [], []
        for k in range(changes):
            node = f"sim-{rng.randrange(n):05d}"
            free = 40960 - k
            client.publish(
                topics.state(Kind.CAPACITY, node),
                _capacity(node, boots[node], 10 + k, devices, free),
                qos=1,
                retain=True,
            ).wait_for_publish(10)
            sent = time.monotonic()
            while True:
                # A per-peer read: the change's latency, not the time to fetch a whole pool.
                t0 = time.monotonic()
                status, peer, _ = agent.api("GET", f"/v1/pool/peers/{node}")
                polls.append(time.monotonic() - t0)
                if status == 200 and peer["devices"][0]["memory_free_mib"] == free:
                    latencies.append(time.monotonic() - sent)
                    break
                if time.monotonic() - sent > 30:
                    raise TimeoutError(f"change to {node} never seen")
        assert agent.proc is not None
        process = psutil.Process(agent.proc.pid)
        rss_mib = process.memory_info().rss / 2**20
        places = []
        for _ in range(31):
            t0 = time.monotonic()
            status, _, _ = agent.api(
                "POST", "/v1/pool/place", {"memory_mib": 8192, "compute_pct": 30, "limit": 10}
            )
            places.append(time.monotonic() - t0)
            assert status == 200
        # Steady state: past the agent's periodic return of freed memory (agent.memory).
        time.sleep(max(0.0, settle_s - (time.monotonic() - started - full_view_s)))
        settled_mib = process.memory_info().rss / 2**20
        reads, decodes = [], []
        for _ in range(3):
            time.sleep(1.1)  # past the agent's reuse of a large pool's document: built afresh
            t0 = time.monotonic()
            body = _raw(agent, "/v1/pool")
            reads.append(time.monotonic() - t0)
            t0 = time.monotonic()
            whole = json.loads(body)
            decodes.append(time.monotonic() - t0)
            assert len(whole) == n
    finally:
        client.loop_stop()
        client.disconnect()
        agent.cleanup()
        broker.cleanup()
    latencies.sort()
    return {
        "peers": n,
        "devices_per_peer": devices,
        "full_view_s": round(full_view_s, 2),
        "synced_s": round(synced_s, 2),
        "change_p50_ms": round(1000 * statistics.median(latencies), 1),
        "change_p99_ms": round(
            1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1
        ),
        "per_peer_read_p50_ms": round(1000 * statistics.median(polls), 1),
        # The first call right after the view filled, then 30 more.
        "place_first_ms": round(1000 * places[0], 1),
        "place_p50_ms": round(1000 * statistics.median(places[1:]), 1),
        "place_max_ms": round(1000 * max(places[1:]), 1),
        # The agent's answer, whole (last byte received); then Python's json.loads of it.
        "whole_pool_read_ms": round(1000 * statistics.median(reads), 1),
        "whole_pool_read_max_ms": round(1000 * max(reads), 1),
        "whole_pool_bytes": len(body),
        "whole_pool_decode_ms": round(1000 * statistics.median(decodes), 1),
        "agent_rss_mib": round(rss_mib, 1),
        "agent_rss_settled_mib": round(settled_mib, 1),
    }


def _bytes_per_hour(window_s: float, heartbeat_s: float) -> dict[str, Any]:
    """A real agent (8 mock cards, idle) on a broker: what it publishes at steady state."""
    broker = Mosquitto().start()
    root = f"bench-{uuid.uuid4().hex[:6]}"
    received: list[tuple[str, int]] = []
    lock = threading.Lock()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="meter", protocol=paho.MQTTv5)

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if not message.retain:
            with lock:
                received.append((message.topic, len(message.payload) + len(message.topic)))

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(f"{root}/#", qos=1)
    sub.loop_start()
    agent = AgentProcess(
        short_tmpdir(),
        config=mqtt_config(
            broker,
            root,
            "meter-node",
            keepalive_s=30,
            zone=ZONE,
        ).replace("heartbeat_s = 5", f"heartbeat_s = {heartbeat_s}"),
        mock_devices='[{ model = "MockA100-80G", memory_mib = 81920, count = 8 }]',
    )
    try:
        agent.start()
        time.sleep(3)  # start-up publications are not steady state
        with lock:
            received.clear()
        time.sleep(window_s)
        with lock:
            total = sum(size for _, size in received)
            count = len(received)
    finally:
        sub.loop_stop()
        sub.disconnect()
        agent.cleanup()
        broker.cleanup()
    per_hour = total * 3600 / window_s
    return {
        "window_s": window_s,
        "heartbeat_s": heartbeat_s,
        "messages": count,
        "payload_and_topic_bytes": total,
        "bytes_per_node_per_hour": round(per_hour),
        "at_default_heartbeat_30s": round(per_hour * heartbeat_s / 30),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument(
        "--settle", type=float, default=12.0, help="seconds after the full view to read RSS again"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "scales": [_one_scale(n, args.devices, args.changes, args.settle) for n in args.peers],
        "steady_state": _bytes_per_hour(args.window, 10.0),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
