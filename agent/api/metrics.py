"""Prometheus metrics of the agent: what only the agent knows (slices, allocation, pool).

Raw device telemetry is already exported by dcgm-exporter and npu-exporter, so this module
exports the agent's own view and labels every device series with the keys those exporters
use — ``uuid`` and ``pci_bus_id`` for NVIDIA, ``id`` (the logical chip id) for Ascend — so
that a PromQL join can put a slice's quota next to the card's measured use.

One custom collector reads the core on every scrape (nothing is cached, nothing can go
stale) into a registry of its own: the process-wide default registry is global state, and
two agents in one test process would otherwise report each other's figures.

The same rendering is served three ways: ``/metrics`` on the API socket, an optional
loopback TCP listener (``metrics.listen``) and an optional node_exporter textfile
(``metrics.textfile``), replaced atomically so node_exporter never reads half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from agent import __version__
from agent.api.views import idle_amount
from agent.config import parse_listen
from agent.core.ladder import RUNGS
from agent.core.pool import Pool
from agent.core.service import NodeService
from agent.model import Device, Health, SliceState, Vendor
from agent.supervise import every

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
#: The exposition's media type (text format 0.0.4); Prometheus 3 wants it spelled out.
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Labels of every per-device series: the agent's id plus the exporters' join keys.
DEVICE_LABELS = ("device", "uuid", "pci_bus_id", "id")
SLICE_LABELS = ("slice", *DEVICE_LABELS)
LIVE_STATES = (SliceState.ACTIVE, SliceState.LOST)


def device_label_values(device: Device | None, device_id: str) -> list[str]:
    """Values for :data:`DEVICE_LABELS`. An empty value is the same as an absent label in
    Prometheus, so NVIDIA series carry no ``id`` and Ascend series no ``uuid``."""
    if device is None:
        return [device_id, "", "", ""]
    chip = str(device.index) if device.vendor is Vendor.ASCEND else ""
    return [device.id, device.uuid or "", device.pci_bus_id or "", chip]


class AgentCollector(Collector):
    """Reads the node service and the pool at scrape time."""

    def __init__(
        self,
        service: NodeService,
        pool: Pool,
        restarts: Mapping[str, int] | None = None,
    ) -> None:
        self._service = service
        self._pool = pool
        self._restarts = restarts if restarts is not None else {}

    def collect(self) -> Iterator[Metric]:
        yield from self._build()
        yield from self._devices()
        yield from self._slices()
        yield from self._node()
        yield from self._pool_metrics()

    # -- families -------------------------------------------------------------------------

    def _build(self) -> Iterable[Metric]:
        service = self._service
        info = InfoMetricFamily(
            "xpu_agent_build",
            "The agent's version; the value is always 1.",
            labels=("version", "python", "node", "zone"),
        )
        info.add_metric(
            [
                __version__,
                platform.python_version(),
                service.config.node_name,
                service.config.node.zone,
            ],
            {},
        )
        yield info
        yield GaugeMetricFamily(
            "xpu_agent_start_time_seconds",
            "When the agent started, in seconds since the epoch.",
            value=service.started_at,
            unit="seconds",
        )
        restarts = CounterMetricFamily(
            "xpu_agent_task_restarts",
            "Restarts of a supervised background task after it failed.",
            labels=("task",),
        )
        for task, count in sorted(self._restarts.items()):
            restarts.add_metric([task], count)
        yield restarts

    def _devices(self) -> Iterable[Metric]:
        service = self._service
        devices = list(service.inventory.devices.values())
        info = GaugeMetricFamily(
            "xpu_agent_device_info",
            "One series per device (value 1) naming its vendor, model and backend.",
            labels=(*DEVICE_LABELS, "vendor", "model", "backend", "index"),
        )
        total = GaugeMetricFamily(
            "xpu_agent_device_memory_total_bytes",
            "The device's memory.",
            labels=DEVICE_LABELS,
            unit="bytes",
        )
        allocated = GaugeMetricFamily(
            "xpu_agent_device_memory_allocated_bytes",
            "Memory promised to live slices on the device.",
            labels=DEVICE_LABELS,
            unit="bytes",
        )
        compute = GaugeMetricFamily(
            "xpu_agent_device_compute_allocated_ratio",
            "Compute promised to live slices on the device (0-1).",
            labels=DEVICE_LABELS,
            unit="ratio",
        )
        slots = GaugeMetricFamily(
            "xpu_agent_device_slices_max",
            "How many slices the device may hold (slicing.max_slices_per_device).",
            labels=DEVICE_LABELS,
        )
        health = GaugeMetricFamily(
            "xpu_agent_device_health",
            "1 for the device's current health state, 0 for the others.",
            labels=(*DEVICE_LABELS, "state"),
        )
        unsliced = GaugeMetricFamily(
            "xpu_agent_device_unsliced_processes",
            "Processes on the device that belong to no slice.",
            labels=DEVICE_LABELS,
        )
        slices = GaugeMetricFamily(
            "xpu_agent_slices",
            "Live slices per device and state.",
            labels=(*DEVICE_LABELS, "state"),
        )
        rungs = GaugeMetricFamily(
            "xpu_agent_device_enforcement_rung",
            "1 for the mechanism holding the device's slices to their memory"
            " (nvml-limits, mps, hami-core, sampling), 0 for the others.",
            labels=(*DEVICE_LABELS, "rung"),
        )
        uses = service.card_uses()
        for device in devices:
            labels = device_label_values(device, device.id)
            use = uses[device.id]
            on = use.slices
            info.add_metric(
                [*labels, device.vendor.value, device.model, device.backend, str(device.index)],
                1,
            )
            total.add_metric(labels, device.memory_total_mib * MIB)
            allocated.add_metric(labels, use.memory_allocated_mib * MIB)
            compute.add_metric(labels, use.compute_allocated_pct / 100)
            slots.add_metric(labels, use.max_slices)
            for state in Health:
                health.add_metric([*labels, state.value], 1 if device.health is state else 0)
            unsliced.add_metric(labels, len(service.unsliced.get(device.id, ())))
            for live_state in LIVE_STATES:
                count = sum(1 for s in on if s.state is live_state)
                slices.add_metric([*labels, live_state.value], count)
            held_by = service.rungs.get(device.id)
            if held_by is not None:
                for name in RUNGS:
                    rungs.add_metric([*labels, name], 1 if held_by.name == name else 0)
        yield from (info, total, allocated, compute, slots, health, unsliced, slices, rungs)

    def _slices(self) -> Iterable[Metric]:
        service = self._service
        devices = service.inventory.devices
        info = GaugeMetricFamily(
            "xpu_agent_slice_info",
            "One series per live slice (value 1) with its owner, state and borrower.",
            labels=(*SLICE_LABELS, "owner_uid", "state", "borrower", "priority"),
        )
        memory_limit = GaugeMetricFamily(
            "xpu_agent_slice_memory_limit_bytes",
            "The slice's memory quota.",
            labels=SLICE_LABELS,
            unit="bytes",
        )
        memory_used = GaugeMetricFamily(
            "xpu_agent_slice_memory_used_bytes",
            "Memory the slice's processes used in the last sample.",
            labels=SLICE_LABELS,
            unit="bytes",
        )
        quota = GaugeMetricFamily(
            "xpu_agent_slice_compute_quota_ratio",
            "The slice's compute quota as a share of the device (0-1).",
            labels=SLICE_LABELS,
            unit="ratio",
        )
        used = GaugeMetricFamily(
            "xpu_agent_slice_compute_used_ratio",
            "Compute the slice's processes used in the last sample, as a share of the device;"
            " above the quota when the policy lets a slice use idle compute.",
            labels=SLICE_LABELS,
            unit="ratio",
        )
        throttled = GaugeMetricFamily(
            "xpu_agent_slice_throttled",
            "1 while the enforcer holds the slice to its compute quota.",
            labels=SLICE_LABELS,
        )
        processes = GaugeMetricFamily(
            "xpu_agent_slice_processes",
            "Processes bound to the slice.",
            labels=SLICE_LABELS,
        )
        expiry = GaugeMetricFamily(
            "xpu_agent_slice_expiry_timestamp_seconds",
            "When the slice's lease lapses (only slices with a time-to-live).",
            labels=SLICE_LABELS,
            unit="seconds",
        )
        for s in sorted(service.live.values(), key=lambda s: s.id):
            labels = [s.id, *device_label_values(devices.get(s.device), s.device)]
            usage = service.usage.get(s.id)
            info.add_metric(
                [*labels, str(s.owner_uid), s.state.value, s.borrower or "", str(s.priority)], 1
            )
            memory_limit.add_metric(labels, s.memory_mib * MIB)
            quota.add_metric(labels, s.compute_pct / 100)
            processes.add_metric(labels, len(s.processes))
            if usage is not None:
                memory_used.add_metric(labels, usage.memory_used_mib * MIB)
                used.add_metric(labels, usage.compute_used_pct / 100)
            note = service.notes.get(s.id)
            throttled.add_metric(labels, 1 if note is not None and note.throttled else 0)
            if s.expires_at is not None:
                expiry.add_metric(labels, s.expires_at)
        yield from (info, memory_limit, memory_used, quota, used, throttled, processes, expiry)

    def _node(self) -> Iterable[Metric]:
        capacity, _ = self._service.totals()
        idle = idle_amount(self._service)
        yield GaugeMetricFamily(
            "xpu_agent_node_lendable_memory_bytes",
            "Memory this node could lend now: unallocated plus idle lendable slices.",
            value=max(0, idle.memory_mib) * MIB,
            unit="bytes",
        )
        share = idle.compute_pct / capacity.compute_pct if capacity.compute_pct else 0.0
        yield GaugeMetricFamily(
            "xpu_agent_node_lendable_compute_ratio",
            "Compute this node could lend now, as a share of its usable compute (0-1).",
            value=max(0.0, share),
            unit="ratio",
        )

    def _pool_metrics(self) -> Iterable[Metric]:
        link = self._pool.link()
        peers = list(self._pool.peers())
        yield GaugeMetricFamily(
            "xpu_agent_mqtt_connected",
            "1 while the agent is connected to the MQTT broker.",
            value=1 if link.connected else 0,
        )
        yield GaugeMetricFamily(
            "xpu_agent_mqtt_enabled",
            "1 when a broker is configured (mqtt.url), 0 when the agent runs standalone.",
            value=1 if link.enabled else 0,
        )
        by_state = GaugeMetricFamily(
            "xpu_agent_pool_peers",
            "Peers as last heard on the bus, by state and whether placement may use them.",
            labels=("state", "placeable"),
        )
        counts: dict[tuple[str, str], int] = {}
        for peer in peers:
            key = (peer.state, "true" if peer.placeable else "false")
            counts[key] = counts.get(key, 0) + 1
        for (state, placeable), count in sorted(counts.items()):
            by_state.add_metric([state, placeable], count)
        yield by_state
        age = GaugeMetricFamily(
            "xpu_agent_pool_peer_age_seconds",
            "Seconds since the peer was last heard.",
            labels=("peer",),
            unit="seconds",
        )
        lendable = GaugeMetricFamily(
            "xpu_agent_pool_peer_lendable_memory_bytes",
            "Memory the peer last said it could lend.",
            labels=("peer",),
            unit="bytes",
        )
        for peer in sorted(peers, key=lambda p: p.node):
            age.add_metric([peer.node], peer.age_s)
            lendable.add_metric([peer.node], peer.lendable_memory_mib * MIB)
        yield from (age, lendable)


class Metrics:
    """The agent's registry and the three ways it is served."""

    def __init__(
        self,
        service: NodeService,
        pool: Pool,
        restarts: Mapping[str, int] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self._service = service
        collector = AgentCollector(service, pool, restarts)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        if process_metrics:
            # process_* (CPU, RSS, open fds, start time) of this process, into our registry.
            ProcessCollector(registry=self.registry)
        # node_exporter exports its own process_* series and fails a scrape that carries
        # two of them, so the textfile holds the agent's families only.
        self._textfile_registry = CollectorRegistry(auto_describe=False)
        self._textfile_registry.register(collector)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4); cheap, so it runs on the event loop."""
        return generate_latest(self.registry)

    def render_textfile(self) -> bytes:
        """The exposition for node_exporter's textfile collector (no process_* series)."""
        return generate_latest(self._textfile_registry)

    # -- TCP listener ---------------------------------------------------------------------

    async def serve_tcp(self, runner: web.AppRunner | None) -> None:
        """Serve the API app on ``metrics.listen`` (loopback only; the app answers only
        ``/metrics`` there). A supervised task: a port in use fails it, it is retried with
        backoff, and the socket API is unaffected."""
        listen = self._service.config.metrics.listen
        if not listen:
            return
        if runner is None:
            raise RuntimeError("the API is not running")
        host, port = parse_listen(listen)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("metrics listener up", listen=listen)
        try:
            await asyncio.Event().wait()
        finally:
            await site.stop()

    # -- node_exporter textfile -----------------------------------------------------------

    async def write_textfile_forever(self) -> None:
        """Rewrite ``metrics.textfile`` every ``metrics.textfile_interval_s``; remove it when
        the agent stops so that node_exporter does not keep serving a dead agent's figures."""
        config = self._service.config.metrics
        if not config.textfile:
            return
        path = Path(config.textfile)
        # A write runs in a thread that cancellation does not stop: without the lock it
        # could rename a fresh file into place after the removal below.
        lock = threading.Lock()
        stopped = threading.Event()

        def write(data: bytes) -> None:
            with lock:
                if not stopped.is_set():
                    write_atomically(path, data)

        async def step() -> None:
            await asyncio.to_thread(write, self.render_textfile())

        try:
            await every(config.textfile_interval_s, step)
        finally:
            # Cancellation is under way, so no awaiting: wait (briefly, one small file) for
            # a write in flight, then remove the file.
            with lock:
                stopped.set()
                with contextlib.suppress(OSError):
                    os.unlink(path)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``.

    The temporary name does not end in ``.prom`` so node_exporter never reads it, and the
    rename is atomic on one file system, so a reader sees the old file or the new one. The
    mode is set explicitly: the service's ``UMask=0027`` would otherwise hide the file from
    node_exporter's user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
