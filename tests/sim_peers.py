"""Simulated peers: one MQTT connection publishing many peers' retained ``status``,
``capacity`` and ``idle``, encoded with the agent's own payload types (so the agent under
test validates them exactly as it validates a real peer's). Shared by the tests and
``benchmarks/pool_scale.py``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.bus import payloads
from agent.bus.topics import Kind, Topics
from tests.broker import Mosquitto

CARD_MIB = 81920


def connect(broker: Mosquitto) -> Any:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"sim-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port, keepalive=60)
    client.loop_start()
    return client


def capacity(
    node: str,
    boot: str,
    seq: int,
    models: Sequence[str],
    free_mib: Callable[[int], int] = lambda _i: CARD_MIB,
) -> bytes:
    """A peer with one card per entry of ``models``; card ``i`` has ``free_mib(i)`` free."""
    cards = [
        payloads.DeviceCapacity(
            id=f"mock-{i}",
            model=model,
            vendor="mock",
            health="ok",
            memory_total_mib=CARD_MIB,
            memory_free_mib=free_mib(i),
            compute_free_pct=100 if free_mib(i) == CARD_MIB else 50,
            slice_count=0 if free_mib(i) == CARD_MIB else 1,
            max_slices=10,
        )
        for i, model in enumerate(models)
    ]
    n = len(models)
    total = payloads.Amounts(memory_mib=CARD_MIB * n, compute_pct=100 * n, slices=10 * n)
    used = sum(CARD_MIB - c.memory_free_mib for c in cards)
    return msgspec.json.encode(
        payloads.Capacity(
            node=node,
            boot_id=boot,
            seq=seq,
            ts=time.time(),
            devices=cards,
            capacity=total,
            allocated=payloads.Amounts(memory_mib=used, compute_pct=0, slices=0),
            free=payloads.Amounts(
                memory_mib=total.memory_mib - used, compute_pct=total.compute_pct, slices=0
            ),
        )
    )


def publish(
    client: Any,
    topics: Topics,
    nodes: Sequence[str],
    models: Callable[[int], Sequence[str]],
    free_mib: Callable[[int], int] = lambda _i: CARD_MIB,
) -> dict[str, str]:
    """Retain every node's state; returns node → boot id. Waits until the broker has all."""
    boots = {}
    infos = []
    for i, node in enumerate(nodes):
        boot = uuid.uuid4().hex[:12]
        boots[node] = boot
        now = time.time()
        status = payloads.Status(
            node=node, boot_id=boot, seq=1, ts=now, state="online", agent="sim", since=now
        )
        idle = payloads.Idle(
            node=node,
            boot_id=boot,
            seq=3,
            ts=now,
            lend=True,
            memory_mib=0,
            compute_pct=0,
            slices=0,
            idle_after_s=300,
        )
        for kind, body in (
            (Kind.STATUS, msgspec.json.encode(status)),
            (Kind.CAPACITY, capacity(node, boot, 2, models(i), free_mib)),
            (Kind.IDLE, msgspec.json.encode(idle)),
        ):
            infos.append(client.publish(topics.state(kind, node), body, qos=1, retain=True))
    for info in infos:
        info.wait_for_publish(30)
    return boots
