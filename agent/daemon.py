"""Composition root: config → backends → ledger → core → enforcement → API, bus.

One asyncio process; every subsystem is a named task of one task group, supervised so
that a failure restarts it with backoff and never takes the local API down.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from agent import __version__
from agent import config as config_mod
from agent.api.metrics import Metrics
from agent.api.server import ApiServer, build_app
from agent.backends.hotplug import HotplugWatcher
from agent.backends.registry import create_backends
from agent.bus.node import Bus
from agent.config import Config
from agent.core.events import EventHub
from agent.core.inventory import Inventory
from agent.core.pool import Pool, StandalonePool
from agent.core.service import NodeService
from agent.enforce.loop import Enforcer
from agent.enforce.mps import MpsDaemons
from agent.errors import ConfigError, LedgerUnavailable, StorageFull
from agent.instance import StateLock
from agent.ledger.store import Ledger
from agent.memory import collect_less_often, return_large_buffers
from agent.supervise import every, supervised
from agent.systemd import Notifier, listen_fds

log = structlog.get_logger(__name__)

#: Seconds between write probes while the ledger cannot commit.
LEDGER_PROBE_S = 2.0


class _Stop(Exception):
    pass


class Daemon:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.restarts: dict[str, int] = {}
        self._last_sample = time.monotonic()
        self.service: NodeService | None = None
        self.pool: Pool = StandalonePool()
        self.enforcer: Enforcer | None = None

    # -- subsystems -----------------------------------------------------------------------

    async def _sample_once(self, service: NodeService) -> None:
        change = await service.inventory.sample(service.bound_pids())
        # What the ledger records of a sample (lost cards, exited processes) waits while it
        # cannot commit; enforcement, which needs no ledger write, goes on regardless.
        try:
            if change.lost or change.returned:
                await service.observe_inventory(change)
            await service.observe_samples(service.inventory.samples)
        except (StorageFull, LedgerUnavailable) as exc:
            log.warning("sample not recorded; enforcing anyway", error=exc.detail)
        if self.enforcer is not None:
            await self.enforcer.step(service.inventory.samples)
        self._last_sample = time.monotonic()

    async def _ledger_probe(self, service: NodeService) -> None:
        """While the ledger cannot commit (a full disk), try a tiny write every few seconds:
        health and writes come back by themselves when space does."""

        async def step() -> None:
            if service.ledger_writable:
                return
            if await service.probe_ledger():
                log.info("the ledger commits again")

        await every(LEDGER_PROBE_S, step)

    async def _sampler(self, service: NodeService) -> None:
        await every(self.config.enforcement.interval_ms / 1000, lambda: self._sample_once(service))

    async def _rediscover(self, service: NodeService) -> None:
        async def step() -> None:
            change = await service.inventory.discover()
            await service.observe_inventory(change)

        await asyncio.sleep(self.config.backends.rediscover_s)
        await every(self.config.backends.rediscover_s, step)

    async def _hotplug(self, service: NodeService) -> None:
        """PCI add/remove/bind/unbind of NVIDIA/Ascend devices → re-discover now. Where udev
        is unavailable (containers) this ends at once and periodic re-discovery covers it."""
        async with HotplugWatcher() as watcher:
            async for change in watcher.changes():
                log.info("pci change", action=change.action, slot=change.pci_slot)
                for backend in service.inventory.backends:
                    backend.request_rescan()
                await service.observe_inventory(await service.inventory.discover())

    async def _expiry(self, service: NodeService) -> None:
        async def step() -> None:
            try:
                for slice_id in await service.expire_due():
                    log.info("slice expired", slice=slice_id)
                await service.forget_history()
            except (StorageFull, LedgerUnavailable) as exc:
                # Expiry is a write: it waits for the ledger (the slices end late, not never).
                log.warning("expiry deferred", error=exc.detail)

        await every(1.0, step)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop, only while it is healthy: the loop runs (this
        task is scheduled on time) and sampling is not stuck."""
        period = (self.notifier.watchdog_s or 0) / 3
        if period <= 0:
            return
        stuck_after = max(30.0, 20 * self.config.enforcement.interval_ms / 1000)
        while True:
            await asyncio.sleep(period)
            if time.monotonic() - self._last_sample < stuck_after:
                self.notifier.watchdog()
            else:
                log.error("sampling stuck; withholding watchdog")

    async def _stop_waiter(self) -> None:
        await self.stop_requested.wait()
        raise _Stop

    def _status_line(self, service: NodeService) -> str:
        capacity, allocated = service.totals()
        return (
            f"{len(service.inventory.devices)} device(s), {allocated.slices} slice(s), "
            f"{allocated.compute_pct}/{capacity.compute_pct} % compute allocated"
        )

    async def _status(self, service: NodeService) -> None:
        async def step() -> None:
            self.notifier.status(self._status_line(service))

        await every(10.0, step)

    # -- signals --------------------------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            if self._reload_config is not None:
                new = self._reload_config()
                restart_needed = [
                    key
                    for key in ("paths", "backends", "mqtt", "api", "node", "metrics")
                    if getattr(new, key) != getattr(self.config, key)
                ]
                if restart_needed:
                    log.warning("reload: these sections need a restart", sections=restart_needed)
                self.config = new
                if self.service is not None:
                    self.service.config = new
                log.info("configuration reloaded")
        except ConfigError as exc:
            log.error("reload refused; keeping the running configuration", error=str(exc))
        finally:
            self.notifier.ready(status="reloaded")

    # -- main -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        config = self.config
        # One agent per state directory: a second one refuses before touching anything.
        state_lock = StateLock(Path(config.paths.state_dir))
        try:
            return await self._run_locked(config)
        finally:
            state_lock.release()

    async def _run_locked(self, config: Config) -> int:
        # Backend start-up may block (nvmlInit, probing npu-smi): keep it off the loop.
        backends = await asyncio.to_thread(create_backends, config)
        # A first npu-smi discovery may take two calls, each up to its own timeout.
        inventory = Inventory(backends, sample_timeout_s=2 * config.backends.npu_smi.timeout_s + 5)
        ledger = await asyncio.to_thread(Ledger, config.ledger_path)
        service = NodeService(config, inventory, ledger, EventHub())
        self.service = service
        await service.open()
        # Whether the ledger commits is known now, not at the first write (a full disk).
        if not await service.probe_ledger():
            log.warning(
                "the ledger cannot commit; serving reads", reason=service.degraded_reasons()
            )
        # The bus (when mqtt.url is set): publish, keep the peer pool, lend and borrow.
        bus = Bus(config, service) if config.mqtt.url else None
        if bus is not None:
            self.pool = bus.pool
        metrics = Metrics(service, self.pool, self.restarts)
        app = build_app(service, self.pool, metrics=metrics.render)
        server = ApiServer(app)
        inherited = listen_fds().get("api")
        # The API answers before discovery: a hung tool (npu-smi can take its whole timeout,
        # twice) must not keep clients waiting; until discovery ends, health says so.
        await server.start(Path(config.paths.socket), config.api.socket_group, inherited)
        change = await inventory.discover()
        await service.observe_inventory(change)
        # Slices whose card is not here at all after a restart are lost until it returns.
        missing = {s.device for s in service.live.values()} - set(inventory.devices)
        if missing:
            log.warning("slices on devices not found", devices=sorted(missing))
        # Before READY: resume whatever a crashed previous run left stopped.
        enforcer = Enforcer(service)
        self.enforcer = enforcer
        await enforcer.recover()
        where = "systemd socket" if inherited is not None else config.paths.socket
        log.info(
            "xpu-agent ready",
            version=__version__,
            node=config.node_name,
            socket=where,
            devices=len(inventory.devices),
            backends=[b.name for b in backends],
        )
        self.notifier.ready(status=self._status_line(service))
        tasks: dict[str, Callable[[], Awaitable[None]]] = {
            "sampler": lambda: self._sampler(service),
            "duty-cycle": enforcer.run_duty,
            "rediscovery": lambda: self._rediscover(service),
            "hotplug": lambda: self._hotplug(service),
            "expiry": lambda: self._expiry(service),
            "ledger-probe": lambda: self._ledger_probe(service),
            "watchdog": self._watchdog,
            "status": lambda: self._status(service),
            "metrics-listener": lambda: metrics.serve_tcp(server.runner),
            "metrics-textfile": metrics.write_textfile_forever,
        }
        if config.enforcement.nvidia.mps == "managed":
            # One MPS control daemon per NVIDIA card, quit (and the cards' compute mode
            # put back) when the task ends.
            tasks["mps"] = MpsDaemons(service).run
        if bus is not None:
            # Cancelling "mqtt" at stop publishes the retained offline status first.
            tasks.update(bus.tasks())
        try:
            async with asyncio.TaskGroup() as group:
                for name, factory in tasks.items():
                    group.create_task(supervised(name, factory, self.restarts), name=name)
                group.create_task(self._stop_waiter(), name="stop")
        except* _Stop:
            pass
        finally:
            self.notifier.stopping()
            log.info("stopping")
            try:
                await enforcer.shutdown()  # resume every process held stopped
            except Exception:
                log.exception("resuming stopped processes failed")
            with contextlib.suppress(Exception):
                await server.stop()
            await inventory.close()
            await service.close()
            self.notifier.close()
        log.info("stopped")
        return 0


def run_daemon(config: Config, config_path: Path | None, dev: bool) -> int:
    def reload() -> Config:
        fresh = config_mod.load(config_path)
        return config_mod.with_dev_paths(fresh) if dev else fresh

    return_large_buffers()
    collect_less_often()
    return asyncio.run(Daemon(config, reload).run())
