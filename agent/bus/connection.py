"""The one task that owns the MQTT client.

aiomqtt 2.5 (over paho-mqtt 2) gives a connected client as an async context manager and
nothing more: no reconnect, no re-subscribe. This module adds what a daemon needs:

- MQTT 5, falling back to 3.1.1 when the broker refuses the protocol version;
- ``TCP_NODELAY`` on the socket (paho leaves Nagle on: a QoS 1 publish that follows another
  small write waits ~44 ms for a delayed ACK on loopback; ~0.2 ms with it);
- reconnect with jittered exponential backoff; every connect re-subscribes, registers a
  fresh retained ``offline`` will, and calls ``on_connect`` (the publisher republishes
  status, capacity and idle);
- a retained ``offline`` published before a clean disconnect: a clean DISCONNECT does not
  fire the will, and cancelling :meth:`Connection.run` is how the daemon stops it;
- producers never block: :meth:`Connection.publish` stores the latest value per retained
  topic and a bounded queue of the rest, and one sender drains them while connected.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.bus.intake import IntakeStats, intake_type
from agent.config import MqttConfig

log = structlog.get_logger(__name__)

BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 10.0
#: Non-retained messages (events, replies) kept while disconnected; the oldest go first.
QUEUE_MAX = 1000
#: Seconds a goodbye (retained ``offline``) may take before we disconnect anyway.
GOODBYE_TIMEOUT_S = 2.0
OPERATION_TIMEOUT_S = 5.0
#: Seconds a refetch's SUBACK/UNSUBACK may take: Mosquitto 2.0.11 sent no SUBACK at all
#: for a SUBSCRIBE that arrived while it was dropping our outgoing messages (measured), so
#: waiting the ordinary twice-the-keep-alive would stall the refetch for a minute.
REFETCH_TIMEOUT_S = 5.0
#: Messages read from the intake per wake-up of the receiver.
READ_BATCH = 256
#: Seconds a QoS 1 probe to our own inbox may take before the session counts as stalled.
PROBE_TIMEOUT_S = 10.0
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
#: CONNACK codes that mean "I do not speak this protocol version" (3.1.1: 1; MQTT 5: 0x84).
_UNSUPPORTED_PROTOCOL = frozenset({1, 0x84})
#: aiomqtt's words when no CONNACK came within the timeout.
_NO_CONNACK = "Operation timed out"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish. ``deadline`` (monotonic) drops it if not sent by then."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: int | None = None
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname or "localhost", parts.port or (8883 if tls else 1883), tls)

    def display(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class _Secrets:
    """What is read from disk before each connect (off the loop)."""

    password: str | None
    tls: ssl.SSLContext | None


def _read_secrets(config: MqttConfig, endpoint: Endpoint) -> _Secrets:
    password = None
    if config.password_file:
        password = Path(config.password_file).read_text(encoding="utf-8").strip()
    context = None
    if endpoint.tls:
        context = ssl.create_default_context(cafile=config.ca_file or None)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file or None)
    return _Secrets(password, context)


def _properties(packet: int, **values: object) -> Properties:
    props = Properties(packet)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _reason_value(rc: object) -> int | None:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def backoff_s(attempt: int) -> float:
    """Exponential in ``attempt`` (0-based), capped, with jitter in [50 %, 100 %]."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2.0 ** min(attempt, 32))
    jitter: float = random.uniform(0.5, 1.0)
    return ceiling * jitter


class Connection:
    """Owns the client; run :meth:`run` as one supervised task."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        subscriptions: Sequence[str | tuple[str, int]],
        *,
        on_message: Callable[[aiomqtt.Message], None],
        on_connect: Callable[[], None],
        will: Callable[[], Outgoing],
        goodbye: Callable[[], Outgoing],
        clock: Callable[[], float] = time.monotonic,
        probe_topic: str | None = None,
        probe_every_s: float | None = None,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.config = config
        #: A topic of our own QoS 1 subscription: a message published there every
        #: ``probe_every_s`` must come back within ``probe_timeout_s``, else the session
        #: is stalled (a broker that stopped delivering QoS 1 to us while the TCP link and
        #: keep-alive look fine) and is replaced by a fresh one.
        self.probe_topic = probe_topic
        self.probe_every_s = probe_every_s if probe_every_s is not None else config.heartbeat_s
        self.probe_timeout_s = probe_timeout_s
        self.stalls = 0
        self._intake = IntakeStats()
        self._probe_token: bytes | None = None
        self._probe_back = asyncio.Event()
        self.endpoint = Endpoint.parse(config.url)
        self.client_id = client_id
        # (topic filter, QoS); a bare filter is QoS 1.
        self.subscriptions = tuple((s, 1) if isinstance(s, str) else s for s in subscriptions)
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._goodbye = goodbye
        self._clock = clock
        self.protocol = aiomqtt.ProtocolVersion.V5
        self._v5_refused = False
        self._stopping = False
        self.state = "connecting"
        self.published = 0
        self.received = 0
        self.connects = 0
        self.dropped_outgoing = 0
        self._latest: dict[str, Outgoing] = {}
        self._queue: collections.deque[Outgoing] = collections.deque()
        self._wake = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    # -- producers (never block) --------------------------------------------------------

    @property
    def _ack_timeout_s(self) -> float:
        """How long a PUBACK or SUBACK may take. An acknowledgement travels behind whatever
        the broker already queued for us — a zone's retained state right after connecting
        — so a slow one is not a dead link (keep-alive decides that): twice the keep-alive,
        never less than the connect timeout."""
        return max(OPERATION_TIMEOUT_S, 2.0 * self.config.keepalive_s)

    @property
    def coalesced(self) -> int:
        """Retained state replaced in the intake by newer state before it was read."""
        return self._intake.coalesced

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def backlog(self) -> int:
        """Messages received and not yet handled."""
        current = self._intake.current
        return 0 if current is None else current.qsize()

    async def caught_up(self) -> None:
        """Return once every message received so far has been handled."""
        await self._intake.drained.wait()

    def quiet_s(self) -> float:
        """Seconds since the last message arrived, if every one has been handled; 0 while
        some wait (a burst is still being read)."""
        if self.backlog():
            return 0.0
        last = self._intake.last_put_at
        return float("inf") if last == 0.0 else time.monotonic() - last

    @property
    def supports_properties(self) -> bool:
        return self.protocol is aiomqtt.ProtocolVersion.V5

    def publish(self, message: Outgoing, latest: bool = False) -> None:
        """Queue ``message``. ``latest``: only the newest value of its topic matters
        (retained state), so a newer one replaces one not yet sent."""
        if latest:
            self._latest.pop(message.topic, None)
            self._latest[message.topic] = message
        else:
            if len(self._queue) >= QUEUE_MAX:
                self._queue.popleft()
                self.dropped_outgoing += 1
            self._queue.append(message)
        self._wake.set()

    def pending(self) -> int:
        return len(self._latest) + len(self._queue)

    def _take(self) -> tuple[Outgoing, bool] | None:
        if self._latest:
            topic = next(iter(self._latest))
            return self._latest.pop(topic), True
        if self._queue:
            return self._queue.popleft(), False
        return None

    def _put_back(self, message: Outgoing, latest: bool) -> None:
        if latest:
            self._latest.setdefault(message.topic, message)
        else:
            self._queue.appendleft(message)

    # -- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect; forever. Cancel it to publish the goodbye and
        disconnect cleanly."""
        attempt = 0
        down_since: float | None = None
        while True:
            self.state = "connecting"
            try:
                secrets = await asyncio.to_thread(_read_secrets, self.config, self.endpoint)
                client = self._client_for(secrets)
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        await stack.enter_async_context(client)
                    except aiomqtt.MqttCodeError as exc:
                        if (
                            self.protocol is aiomqtt.ProtocolVersion.V5
                            and _reason_value(exc.rc) in _UNSUPPORTED_PROTOCOL
                        ):
                            log.info("broker refuses MQTT 5; using 3.1.1", broker=self._where)
                            self.protocol = aiomqtt.ProtocolVersion.V311
                            self._v5_refused = True
                            continue
                        raise
                    except aiomqtt.MqttError as exc:
                        # Some 3.1.1 brokers (amqtt) drop an MQTT 5 CONNECT without a
                        # CONNACK: after a CONNACK timeout, try the other version next.
                        if str(exc) == _NO_CONNACK and not self._v5_refused:
                            self.protocol = (
                                aiomqtt.ProtocolVersion.V311
                                if self.protocol is aiomqtt.ProtocolVersion.V5
                                else aiomqtt.ProtocolVersion.V5
                            )
                            log.info(
                                "no CONNACK from the broker; trying another MQTT version",
                                broker=self._where,
                                next="5" if self.supports_properties else "3.1.1",
                            )
                        raise
                    attempt = 0
                    if down_since is not None:
                        log.info(
                            "mqtt reconnected",
                            broker=self._where,
                            down_s=round(self._clock() - down_since, 1),
                        )
                    down_since = None
                    await self._session(client)
            except* (aiomqtt.MqttError, OSError, ssl.SSLError) as group:
                first = group.exceptions[0]
                if down_since is None:
                    down_since = self._clock()
                    log.warning(
                        "mqtt connection lost or refused", broker=self._where, error=str(first)
                    )
                else:
                    log.debug("mqtt connect failed", broker=self._where, error=str(first))
            finally:
                self._client = None
                self.state = "disconnected"
            if self._stopping:
                # Cancelled, and closing the client raised something else on the way out
                # (a broker that never acknowledges): the cancellation still wins.
                raise asyncio.CancelledError
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1

    @property
    def _where(self) -> str:
        return self.endpoint.display()

    def _client_for(self, secrets: _Secrets) -> aiomqtt.Client:
        will = self._will()
        v5 = self.protocol is aiomqtt.ProtocolVersion.V5
        extra: dict[str, Any] = {}
        if v5:
            extra["clean_start"] = True
            # No MaximumPacketSize: Mosquitto 2.0.11 (Debian 12) drops a QoS 1 message over
            # a client's announced size without freeing its in-flight slot, so about 20
            # oversized messages from any peer silence the inbox for good. The agent takes
            # every packet and drops (and counts) oversized ones itself; the broker's own
            # max_packet_size bounds what it can be sent (docs/mqtt.md).
            extra["properties"] = _properties(PacketTypes.CONNECT, SessionExpiryInterval=0)
        else:
            extra["clean_session"] = True
        return aiomqtt.Client(
            self.endpoint.host,
            self.endpoint.port,
            identifier=self.client_id,
            protocol=self.protocol,
            username=self.config.username or None,
            password=secrets.password,
            tls_context=secrets.tls,
            will=aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain),
            keepalive=self.config.keepalive_s,
            timeout=OPERATION_TIMEOUT_S,
            socket_options=[NODELAY],
            queue_type=intake_type(self._intake),
            **extra,
        )

    async def _session(self, client: aiomqtt.Client) -> None:
        self._client = client
        granted: Sequence[object] = ()
        if self.subscriptions:
            granted = await client.subscribe(list(self.subscriptions))
        refused = [
            t
            for (t, _), code in zip(self.subscriptions, granted, strict=False)
            if (_reason_value(code) or 0) >= 0x80
        ]
        if refused:
            log.warning("broker refused subscriptions (ACL?)", topics=refused)
        self.connects += 1
        self.state = "connected"
        log.info(
            "mqtt connected",
            broker=self._where,
            protocol="5" if self.supports_properties else "3.1.1",
            client_id=self.client_id,
        )
        self._on_connect()
        self._wake.set()
        # Two tasks, the first to end (with the connection's error) ends the session. Not a
        # TaskGroup: on 3.11 a child failing while the group's __aexit__ waits leaves the
        # parent task marked as cancelling, which would confuse the reconnect loop.
        sender = asyncio.create_task(self._sender(client), name="mqtt-send")
        receiver = asyncio.create_task(self._receiver(client), name="mqtt-receive")
        tasks = {sender, receiver}
        if self.probe_topic is not None:
            tasks.add(asyncio.create_task(self._prober(client), name="mqtt-probe"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._stopping = True
            sender.cancel()
            await self._say_goodbye(client)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # the connection's error
        raise aiomqtt.MqttError("the session ended")

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        goodbye = self._goodbye()
        try:
            await client.publish(
                goodbye.topic,
                goodbye.payload,
                qos=goodbye.qos,
                retain=goodbye.retain,
                timeout=GOODBYE_TIMEOUT_S,
            )
            log.info("published offline status before disconnecting")
        except (aiomqtt.MqttError, OSError) as exc:
            log.warning("could not publish offline status", error=str(exc))

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (taken := self._take()) is not None:
                message, latest = taken
                if message.deadline is not None and self._clock() > message.deadline:
                    self.dropped_outgoing += 1
                    continue
                try:
                    await client.publish(
                        message.topic,
                        message.payload,
                        qos=message.qos,
                        retain=message.retain,
                        properties=self._publish_properties(message),
                        timeout=self._ack_timeout_s,
                    )
                except aiomqtt.MqttError:
                    self._put_back(message, latest)
                    raise
                self.published += 1

    def _publish_properties(self, message: Outgoing) -> Properties | None:
        if not self.supports_properties:
            return None
        values: dict[str, object] = {}
        if message.response_topic is not None:
            values["ResponseTopic"] = message.response_topic
        if message.correlation is not None:
            values["CorrelationData"] = message.correlation
        if message.expiry_s is not None:
            values["MessageExpiryInterval"] = message.expiry_s
        return _properties(PacketTypes.PUBLISH, **values) if values else None

    async def _prober(self, client: aiomqtt.Client) -> None:
        """Two probes in a row must go missing: one can be lost in a burst the broker could
        not queue (a zone's retained state at subscribe time), which heals by itself."""
        assert self.probe_topic is not None
        missed = 0
        while True:
            await asyncio.sleep(self.probe_every_s)
            token = os.urandom(8).hex().encode()
            self._probe_token = token
            self._probe_back.clear()
            await client.publish(self.probe_topic, token, qos=1, timeout=self._ack_timeout_s)
            try:
                await asyncio.wait_for(self._probe_back.wait(), self.probe_timeout_s)
                missed = 0
            except TimeoutError:
                missed += 1
                if missed < 2:
                    continue
                self.stalls += 1
                log.warning(
                    "mqtt QoS 1 delivery stalled; reconnecting",
                    broker=self._where,
                    waited_s=self.probe_timeout_s,
                    stalls=self.stalls,
                )
                raise aiomqtt.MqttError("QoS 1 probe not delivered") from None

    async def refetch(self, topics: Sequence[str]) -> bool:
        """Ask the broker again for the retained messages of ``topics`` (subscribe to each
        exactly, then drop those extra subscriptions; the wildcard ones stay). False when
        not connected or not acknowledged in time (the topics are then still missing and
        asked for again later)."""
        client = self._client
        if client is None or not topics:
            return False
        try:
            await client.subscribe([(t, 0) for t in topics], timeout=REFETCH_TIMEOUT_S)
            return True
        except aiomqtt.MqttError as exc:
            log.info("refetch not acknowledged; asking again later", error=str(exc))
            return False
        finally:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(list(topics), timeout=REFETCH_TIMEOUT_S)

    async def _receiver(self, client: aiomqtt.Client) -> None:
        async for first in client.messages:
            current = self._intake.current
            for message in [first, *(current.take(READ_BATCH) if current else ())]:
                self._handle(message)

    def _handle(self, message: aiomqtt.Message) -> None:
        self.received += 1
        if message.topic.value == self.probe_topic:  # exact: no wildcard matching per message
            if message.payload == self._probe_token:
                self._probe_back.set()
            return  # our own probe (or a stranger's): not for the handlers
        try:
            self._on_message(message)
        except Exception:
            log.exception("mqtt message handler failed", topic=str(message.topic))


def property_of(message: aiomqtt.Message, name: str) -> Any:
    """An MQTT 5 property of a received message, or ``None``."""
    return getattr(message.properties, name, None) if message.properties is not None else None
