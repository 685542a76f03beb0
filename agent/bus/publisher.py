"""What this node tells the bus: status, capacity, idle (retained) and its events.

Report by exception: a change of slices or devices (``NodeService.on_change``) is
published after ``mqtt.debounce_ms`` of quiet-ish coalescing; telemetry is checked every
second and published when it moved enough to matter (coarse buckets, so that noise does
not flood the bus); a heartbeat republishes capacity and idle every ``mqtt.heartbeat_s``
when nothing else did, so peers know the node is alive.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Hashable
from typing import Any

import structlog

from agent import __version__
from agent.bus import payloads
from agent.bus.connection import Outgoing
from agent.bus.origin import Origin
from agent.bus.topics import Topics
from agent.core.capacity import totals
from agent.core.service import NodeService
from agent.model import Event

log = structlog.get_logger(__name__)

#: Telemetry buckets: a change smaller than these is not news.
MEMORY_BUCKET_MIB = 256
UTILISATION_BUCKET_PCT = 10
TELEMETRY_CHECK_S = 1.0


def _bucket(value: float | None, size: int) -> int | None:
    return None if value is None else round(value / size)


class Publisher:
    def __init__(
        self,
        service: NodeService,
        topics: Topics,
        origin: Origin,
        send: Callable[[Outgoing, bool], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.topics = topics
        self.origin = origin
        self._send = send
        self._clock = clock
        self._dirty = asyncio.Event()
        self._session_seq = 0
        self._last_signature: dict[str, Hashable] = {}
        self._last_sent: dict[str, float] = {}
        #: Resolved once (``getfqdn`` may ask DNS): where peers reach this node.
        self.address = service.config.node_address
        service.on_change(self.poke)

    @property
    def config(self) -> Any:
        return self.service.config.mqtt

    # -- payloads -----------------------------------------------------------------------

    def status(self, state: str, seq: int | None = None) -> payloads.Status:
        return payloads.Status(
            **self.origin.stamp(seq),
            state=state,  # type: ignore[arg-type]
            agent=__version__,
            since=self.origin.since,
            address=self.address,
        )

    def capacity(self) -> payloads.Capacity:
        service = self.service
        devices = []
        uses = service.card_uses()
        for card in uses.values():
            device, on = card.device, card.slices
            sample = service.inventory.samples.get(device.id)
            slices = []
            for s in on:
                use = service.usage.get(s.id)
                slices.append(
                    payloads.SliceUse(
                        id=s.id,
                        memory_mib=s.memory_mib,
                        compute_pct=s.compute_pct,
                        memory_used_mib=round(use.memory_used_mib) if use else 0,
                        compute_used_pct=round(use.compute_used_pct) if use else 0,
                        priority=s.priority,
                        borrower=s.borrower,
                    )
                )
            devices.append(
                payloads.DeviceCapacity(
                    id=device.id,
                    model=device.model,
                    vendor=device.vendor.value,
                    health=device.health.value,
                    memory_total_mib=device.memory_total_mib,
                    memory_free_mib=card.memory_free_mib,
                    compute_free_pct=card.compute_free_pct,
                    slice_count=len(on),
                    max_slices=card.max_slices,
                    memory_used_mib=round(sample.memory_used_mib)
                    if sample and sample.memory_used_mib is not None
                    else None,
                    utilisation_pct=round(sample.utilisation_pct)
                    if sample and sample.utilisation_pct is not None
                    else None,
                    slices=slices,
                    enforcement=rung.name if (rung := service.rungs.get(device.id)) else "",
                )
            )
        capacity, allocated = totals(uses)
        host_cpu, host_memory = service.host_free()
        return payloads.Capacity(
            **self.origin.stamp(),
            host_cpu_free_milli=host_cpu,
            host_memory_free_mib=host_memory,
            devices=devices,
            capacity=payloads.Amounts(
                memory_mib=capacity.memory_mib,
                compute_pct=capacity.compute_pct,
                slices=capacity.slices,
            ),
            allocated=payloads.Amounts(
                memory_mib=allocated.memory_mib,
                compute_pct=allocated.compute_pct,
                slices=allocated.slices,
            ),
            free=payloads.Amounts(
                memory_mib=capacity.memory_mib - allocated.memory_mib,
                compute_pct=capacity.compute_pct - allocated.compute_pct,
                slices=capacity.slices - allocated.slices,
            ),
        )

    def idle(self) -> payloads.Idle:
        pool = self.service.config.pool
        if not pool.lend:
            return payloads.Idle(
                **self.origin.stamp(),
                lend=False,
                memory_mib=0,
                compute_pct=0,
                slices=0,
                idle_after_s=pool.idle_after_s,
            )
        amount = self.service.lendable()
        return payloads.Idle(
            **self.origin.stamp(),
            lend=True,
            memory_mib=amount.memory_mib,
            compute_pct=amount.compute_pct,
            slices=amount.slices,
            idle_after_s=pool.idle_after_s,
        )

    @staticmethod
    def _signature(body: payloads.Capacity | payloads.Idle) -> Hashable:
        """What must change for a republish to be news (telemetry in coarse buckets)."""
        if isinstance(body, payloads.Idle):
            return (body.lend, body.memory_mib, body.compute_pct, body.slices)
        return tuple(
            (
                d.id,
                d.health,
                d.memory_free_mib,
                d.compute_free_pct,
                d.slice_count,
                _bucket(d.memory_used_mib, MEMORY_BUCKET_MIB),
                _bucket(d.utilisation_pct, UTILISATION_BUCKET_PCT),
                tuple(
                    (
                        s.id,
                        s.borrower,
                        _bucket(s.memory_used_mib, MEMORY_BUCKET_MIB),
                        _bucket(s.compute_used_pct, UTILISATION_BUCKET_PCT),
                    )
                    for s in d.slices
                ),
            )
            for d in body.devices
        )

    # -- the connection's hooks ---------------------------------------------------------

    def will(self) -> Outgoing:
        """The retained ``offline`` the broker publishes if this connection dies. It
        shares its seq with the ``online`` sent right after the connect (peers accept an
        ``offline`` at the seq of the ``online`` they hold: it is that connection's will)."""
        self._session_seq = self.origin.next_seq()
        return self._retained(self.topics.status, self.status("offline", self._session_seq))

    def on_connect(self) -> None:
        """(Re)connected: say online again and republish everything retained."""
        self._send(
            self._retained(self.topics.status, self.status("online", self._session_seq)), True
        )
        self.publish_state(force=True)

    def goodbye(self) -> Outgoing:
        return self._retained(self.topics.status, self.status("offline"))

    @staticmethod
    def _retained(topic: str, body: payloads.Envelope) -> Outgoing:
        return Outgoing(topic, payloads.encode(body), qos=1, retain=True)

    # -- publishing ---------------------------------------------------------------------

    def poke(self) -> None:
        """Something changed (slices, devices): publish after the debounce."""
        self._dirty.set()

    def publish_state(self, force: bool) -> None:
        now = self._clock()
        heartbeat = self.config.heartbeat_s
        for topic, body in (
            (self.topics.capacity, self.capacity()),
            (self.topics.idle, self.idle()),
        ):
            signature = self._signature(body)
            due = now - self._last_sent.get(topic, float("-inf")) >= heartbeat
            if force or due or signature != self._last_signature.get(topic):
                self._send(self._retained(topic, body), True)
                self._last_signature[topic] = signature
                self._last_sent[topic] = now

    async def run(self) -> None:
        """Debounced report-by-exception, telemetry watch and heartbeat."""
        debounce_s = self.config.debounce_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=TELEMETRY_CHECK_S)
            except TimeoutError:
                self.publish_state(force=False)
                continue
            await asyncio.sleep(debounce_s)
            self._dirty.clear()
            self.publish_state(force=True)

    async def forward_events(self) -> None:
        """The node's events, as they happen, on its events topic (not retained)."""
        async with self.service.hub.follow() as queue:
            while True:
                event = await queue.get()
                self._send(
                    Outgoing(self.topics.events, payloads.encode(self.event(event)), qos=1),
                    False,
                )

    def event(self, event: Event) -> payloads.EventMessage:
        # Event data come from many producers: make them plain JSON whatever they hold.
        data = json.loads(json.dumps(dict(event.data), default=str))
        return payloads.EventMessage(
            **self.origin.stamp(),
            event_seq=event.seq,
            event_ts=event.ts,
            kind=event.kind,
            slice_id=event.slice_id,
            data=data,
        )
