"""The connection owner against real brokers, in-process: TCP_NODELAY and the latency it
buys, producers that never block, reconnect with re-subscribe and republish, the goodbye
before a clean disconnect, and the fall back to MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest

from agent.bus.connection import QUEUE_MAX, Connection, Outgoing
from agent.config import MqttConfig
from tests.broker import MOSQUITTO, Mosquitto, free_port, read_retained, topic_root
from tests.harness import until

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


class Probe:
    """A Connection with recording hooks."""

    def __init__(
        self,
        url: str,
        name: str,
        root: str,
        subscriptions: list[str],
        probe_topic: str | None = None,
    ) -> None:
        self.received: list[aiomqtt.Message] = []
        self.connects = 0
        self.on_message: Callable[[aiomqtt.Message], None] = self.received.append
        self.connection = Connection(
            MqttConfig(url=url, keepalive_s=5),
            client_id=name,
            subscriptions=subscriptions,
            on_message=self._dispatch,
            on_connect=self._connected,
            will=lambda: Outgoing(f"{root}/{name}/status", b"will", retain=True),
            goodbye=lambda: Outgoing(f"{root}/{name}/status", b"goodbye", retain=True),
            probe_topic=probe_topic,
            probe_every_s=0.3,
            probe_timeout_s=1.0,
        )

    def _dispatch(self, message: aiomqtt.Message) -> None:
        self.on_message(message)

    def _connected(self) -> None:
        self.connects += 1


@contextlib.asynccontextmanager
async def running(probe: Probe, wait: bool = True) -> AsyncIterator[Probe]:
    task = asyncio.create_task(probe.connection.run(), name="mqtt-test")
    try:
        if wait:
            await until(lambda: probe.connection.connected)
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def client_socket(connection: Connection) -> socket.socket:
    client = connection._client  # the test looks inside on purpose
    assert client is not None
    sock = client._client.socket()
    assert isinstance(sock, socket.socket)
    return sock


async def test_nodelay_is_set_and_a_request_reply_round_trip_is_sub_millisecond(
    broker: Mosquitto,
) -> None:
    root = topic_root()
    answered: list[float] = []
    server = Probe(broker.url, "server", root, [f"{root}/req"])
    server.on_message = lambda m: server.connection.publish(
        Outgoing(f"{root}/rep", bytes(m.payload), qos=1)  # type: ignore[arg-type]
    )
    client = Probe(broker.url, "client", root, [f"{root}/rep"])
    client.on_message = lambda _m: answered.append(time.perf_counter())
    async with running(server), running(client):
        sock = client_socket(client.connection)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        rtts = []
        for i in range(40):
            start = time.perf_counter()
            client.connection.publish(Outgoing(f"{root}/req", b"x" * 300, qos=1))
            await until(lambda n=i: len(answered) > n, 5)
            rtts.append(answered[-1] - start)
    median_ms = statistics.median(rtts) * 1000
    print(f"request/reply round trip through two agents' connections: median {median_ms:.2f} ms")
    # Without TCP_NODELAY this is ~88 ms (two delayed ACKs); see benchmarks/mqtt_latency.py.
    assert median_ms < 10


async def test_producers_never_block_on_a_disconnected_bus() -> None:
    port = free_port()  # nobody listens
    probe = Probe(f"mqtt://127.0.0.1:{port}", "lonely", "r", ["r/#"])
    async with running(probe, wait=False):
        await until(lambda: probe.connection.state == "disconnected", 5)
        started = time.perf_counter()
        for i in range(20_000):
            probe.connection.publish(Outgoing(f"r/state/{i % 3}", b"%d" % i, retain=True), True)
            probe.connection.publish(Outgoing("r/events", b"%d" % i))
        elapsed = time.perf_counter() - started
        # Latest value per retained topic, a bounded queue for the rest.
        assert probe.connection.pending() == 3 + QUEUE_MAX
        assert probe.connection.dropped_outgoing == 20_000 - QUEUE_MAX
        assert elapsed < 1.0
        assert not probe.connection.connected


async def test_reconnect_resubscribes_and_calls_on_connect_again(broker: Mosquitto) -> None:
    own = Mosquitto().start()  # this one is stopped and restarted
    try:
        root = topic_root()
        probe = Probe(own.url, "phoenix", root, [f"{root}/in"])
        async with running(probe):
            assert probe.connects == 1
            own.stop()
            await until(lambda: not probe.connection.connected, 5)
            # Published while down: kept, and sent once back.
            probe.connection.publish(Outgoing(f"{root}/state", b"while-down", retain=True), True)
            own.start()
            await until(lambda: probe.connection.connected and probe.connects == 2, 15)
            await until(lambda: read_retained(own, f"{root}/state", 0.5) == b"while-down", 5)
            # Subscriptions are back: a message from someone else arrives.
            async with aiomqtt.Client("127.0.0.1", own.port, identifier="other") as other:
                await other.publish(f"{root}/in", b"hello", qos=1)
            await until(lambda: any(m.payload == b"hello" for m in probe.received), 5)
    finally:
        own.cleanup()


async def test_a_session_whose_qos1_deliveries_stop_is_replaced(broker: Mosquitto) -> None:
    root = topic_root()
    # Delivered: the probe comes back every time, the session stays, handlers see nothing.
    healthy = Probe(broker.url, "alive", root, [f"{root}/alive/rpc/+"], f"{root}/alive/rpc/probe")
    async with running(healthy):
        await asyncio.sleep(2.0)
        assert healthy.connection.stalls == 0 and healthy.connects == 1
        assert healthy.received == []
    # Not delivered (here: the broker never routes the probe back, as a wedged in-flight
    # window would not): the session is replaced by a fresh one, again and again.
    stuck = Probe(broker.url, "stuck", root, [f"{root}/stuck/rpc/reply"], f"{root}/stuck/rpc/probe")
    async with running(stuck):
        await until(lambda: stuck.connection.stalls >= 2 and stuck.connects >= 3, 15)


async def test_cancelling_publishes_the_goodbye_before_disconnecting(broker: Mosquitto) -> None:
    root = topic_root()
    probe = Probe(broker.url, "leaver", root, [])
    async with running(probe):
        pass
    # A clean DISCONNECT does not fire the will: the retained status is the goodbye.
    assert read_retained(broker, f"{root}/leaver/status") == b"goodbye"


class FakeBroker:
    """A minimal MQTT 3.1.1-only broker. ``refusal``: how it turns MQTT 5 away — a
    CONNACK "unacceptable protocol version" (as Mosquitto 1.x does) or closing without a
    word (as amqtt does). ``deaf``: it never acknowledges a PUBLISH nor closes on
    DISCONNECT (a wedged broker)."""

    def __init__(self, refusal: str = "connack", deaf: bool = False) -> None:
        self.refusal = refusal
        self.deaf = deaf
        self.levels: list[int] = []
        self.published: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = header >> 4
                if kind == 1:  # CONNECT
                    level = body[2 + int.from_bytes(body[0:2], "big")]
                    self.levels.append(level)
                    if level != 4:
                        if self.refusal == "connack":
                            writer.write(bytes([0x20, 2, 0, 1]))
                            await writer.drain()
                        return
                    writer.write(bytes([0x20, 2, 0, 0]))
                elif kind == 8:  # SUBSCRIBE
                    i, codes = 2, []
                    while i < len(body):
                        i += 2 + int.from_bytes(body[i : i + 2], "big")
                        codes.append(min(body[i], 1))
                        i += 1
                    writer.write(bytes([0x90, 2 + len(codes)]) + body[:2] + bytes(codes))
                elif kind == 3:  # PUBLISH
                    n = int.from_bytes(body[0:2], "big")
                    self.published.append(body[2 : 2 + n].decode())
                    if (header >> 1) & 3 and not self.deaf:
                        writer.write(bytes([0x40, 2]) + body[2 + n : 4 + n])
                elif kind == 12:  # PINGREQ
                    writer.write(bytes([0xD0, 0]))
                elif kind == 14 and not self.deaf:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.mark.parametrize("refusal", ["connack", "silence"])
async def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(refusal: str) -> None:
    fake = FakeBroker(refusal)
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    probe = Probe(f"mqtt://127.0.0.1:{port}", "old", "r", ["r/in"])
    probe.connection.publish(Outgoing("r/hello", b"hi", retain=True), True)
    async with server:
        async with running(probe):
            await until(lambda: "r/hello" in fake.published, 15)
            assert probe.connection.protocol is aiomqtt.ProtocolVersion.V311
            assert fake.levels == [5, 4]
        server.close()


async def test_cancel_stops_it_even_when_the_broker_never_answers() -> None:
    """The daemon's shutdown must not hang on a wedged broker: the goodbye gives up, the
    DISCONNECT is not acknowledged, and the task still ends."""
    fake = FakeBroker(deaf=True)
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    probe = Probe(f"mqtt://127.0.0.1:{port}", "stuck", "r", ["r/in"])
    async with server:
        task = asyncio.create_task(probe.connection.run())
        await until(lambda: probe.connection.connected, 15)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        assert time.monotonic() - started < 10
        assert "r/stuck/status" in fake.published  # the goodbye was at least sent
        server.close()
