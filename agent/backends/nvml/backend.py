"""NVIDIA GPUs through NVML.

Every NVML call runs on one dedicated worker thread (NVML handles are best used from the
thread that made them, and the event loop must never block); the health thread in
:mod:`agent.backends.nvml.health` is the one exception, because its wait blocks. State that
the worker thread needs is passed to it as arguments or touched only by it; health state
lives on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from agent import processes
from agent.backends.base import Backend, BackendAbsent, DriverMemoryLimit
from agent.backends.nvml.binding import (
    MIB,
    Binding,
    ErrorKind,
    GpuLostError,
    Handle,
    LibraryAbsentError,
    MemoryInfo,
    MigInstance,
    MigMode,
    NvmlError,
    ProcessMemory,
    ProcessUtilSample,
)
from agent.backends.nvml.health import APPLICATION_XIDS, HealthWatcher
from agent.config import NvmlConfig
from agent.errors import BackendError
from agent.model import Device, DeviceSample, Health, ProcessUsage, Vendor

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: How far back the first per-process utilisation query of a card looks.
_FIRST_UTIL_WINDOW_US = 1_000_000


@dataclass(frozen=True, slots=True)
class _Found:
    """One GPU as the worker thread saw it during discovery."""

    index: int
    handle: Handle
    uuid: str
    name: str
    pci_bus_id: str | None
    memory_total_bytes: int
    mig: MigMode | None
    mig_instances: tuple[MigInstance, ...]


@dataclass(frozen=True, slots=True)
class _LostAt:
    """An NVML index whose GPU answered "lost" during discovery."""

    index: int
    handle: Handle | None
    reason: str


@dataclass(frozen=True, slots=True)
class _Reading:
    """One card's telemetry as the worker thread read it."""

    uuid: str
    memory: MemoryInfo | None = None
    gpu_pct: int | None = None
    temperature_c: int | None = None
    power_mw: int | None = None
    processes: tuple[ProcessUsage, ...] = ()
    lost_reason: str | None = None


class NvmlBackend(Backend):
    """Devices keyed by GPU UUID; MIG instances listed as fixed hardware partitions."""

    name = "nvml"

    def __init__(
        self,
        binding: Binding,
        executor: ThreadPoolExecutor,
        *,
        event_timeout_ms: int = 1000,
        call_timeout_s: float = 10.0,
        application_xids: frozenset[int] = APPLICATION_XIDS,
    ) -> None:
        self._binding = binding
        self._executor = executor
        self._event_timeout_ms = event_timeout_ms
        self._call_timeout_s = call_timeout_s
        self._application_xids = application_xids
        # Event-loop state.
        self._devices: dict[str, Device] = {}
        self._by_index: dict[int, Device] = {}
        self._handles: dict[str, Handle] = {}
        self._health: dict[str, tuple[Health, str]] = {}
        self._watcher: HealthWatcher | None = None
        self._rescan = False
        self._closed = False
        self._driver_version: str | None = None
        # Worker-thread state (only ever touched inside ``_run`` calls).
        self._util_since_us: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the NVML worker thread, with a timeout."""
        if self._closed:
            raise BackendError("nvml backend is closed")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(future, self._call_timeout_s)
        except TimeoutError as exc:
            raise BackendError(
                f"NVML did not answer within {self._call_timeout_s} s", backend=self.name
            ) from exc

    def _warn_once(self, uuid: str, what: str, exc: NvmlError) -> None:
        """Log a failing reading once per card and reading; worker thread only."""
        if (uuid, what) not in self._warned:
            self._warned.add((uuid, what))
            log.warning("nvml reading failed", uuid=uuid, reading=what, error=str(exc))

    def _set_health(self, uuid: str, health: Health, reason: str) -> None:
        """Record a health finding; event loop only. LOST outranks UNHEALTHY."""
        current = self._health.get(uuid)
        if current is not None and current[0] is Health.LOST and health is not Health.LOST:
            return
        if current != (health, reason):
            log.warning("gpu health changed", uuid=uuid, health=health.value, reason=reason)
        self._health[uuid] = (health, reason)

    def request_rescan(self) -> None:
        """Re-initialise NVML at the next :meth:`discover` (it enumerates GPUs only at init).

        Call this on a PCI hot-plug event for an NVIDIA device.
        """
        self._rescan = True

    # -- discovery ------------------------------------------------------------------------

    def _discover_sync(self, reinit: bool) -> tuple[str | None, list[_Found | _LostAt]]:
        b = self._binding
        try:
            if reinit:
                try:
                    b.shutdown()
                except NvmlError as exc:
                    log.debug("nvml shutdown before rescan failed", error=str(exc))
                b.init()
            count = b.device_count()
            driver = b.driver_version()
        except NvmlError as exc:
            raise BackendError(f"NVML cannot list devices: {exc}", backend=self.name) from exc
        found: list[_Found | _LostAt] = []
        for index in range(count):
            handle: Handle | None = None
            try:
                handle = b.handle_by_index(index)
                uuid = b.uuid(handle)
                mig = b.mig_mode(handle)
                found.append(
                    _Found(
                        index=index,
                        handle=handle,
                        uuid=uuid,
                        name=b.name(handle),
                        pci_bus_id=b.pci_bus_id(handle),
                        memory_total_bytes=b.memory(handle).total_bytes,
                        mig=mig,
                        mig_instances=b.mig_instances(handle) if mig and mig.enabled else (),
                    )
                )
            except GpuLostError as exc:
                found.append(_LostAt(index=index, handle=handle, reason=exc.message))
            except NvmlError as exc:
                log.warning("nvml device unreadable", index=index, error=str(exc))
        return driver, found

    async def discover(self) -> Sequence[Device]:
        reinit, self._rescan = self._rescan, False
        if reinit:
            await self._stop_watcher()
        try:
            driver, found = await self._run(self._discover_sync, reinit)
        except BackendError:
            self._rescan = self._rescan or reinit  # try the re-initialisation again next time
            raise
        self._driver_version = driver
        devices: dict[str, Device] = {}
        handles: dict[str, Handle] = {}
        for item in found:
            if isinstance(item, _LostAt):
                self._discovered_lost(item, devices, handles)
                continue
            if self._health.get(item.uuid, (Health.OK, ""))[0] is Health.LOST:
                # It answered every discovery query: it came back (e.g. after a reset).
                del self._health[item.uuid]
                log.info("gpu answers again", uuid=item.uuid)
            handles[item.uuid] = item.handle
            devices[item.uuid] = self._describe(item)
        self._devices = devices
        self._by_index = {d.index: d for d in devices.values()}
        if self._watcher is None or handles.keys() != self._handles.keys():
            await self._stop_watcher()
            self._start_watcher(handles)
        self._handles = handles
        return list(devices.values())

    def _discovered_lost(
        self, item: _LostAt, devices: dict[str, Device], handles: dict[str, Handle]
    ) -> None:
        """A lost GPU is reported under its last known identity, if we ever had one."""
        known = self._by_index.get(item.index)
        if known is None:
            log.warning("lost gpu at unknown index", index=item.index, reason=item.reason)
            return
        self._set_health(known.id, Health.LOST, item.reason)
        if item.handle is not None:
            handles[known.id] = item.handle
        elif known.id in self._handles:
            handles[known.id] = self._handles[known.id]
        devices[known.id] = self._with_health(known)

    def _with_health(self, device: Device) -> Device:
        health, reason = self._health.get(device.id, (Health.OK, None))
        return dataclasses.replace(device, health=health, health_reason=reason)

    def _describe(self, item: _Found) -> Device:
        attributes = {}
        if self._driver_version is not None:
            attributes["driver_version"] = self._driver_version
        if item.mig is not None:
            attributes["mig_mode"] = "enabled" if item.mig.enabled else "disabled"
            if item.mig.pending_enabled != item.mig.enabled:
                attributes["mig_mode_pending"] = (
                    "enabled" if item.mig.pending_enabled else "disabled"
                )
        return self._with_health(
            Device(
                id=item.uuid,
                backend=self.name,
                vendor=Vendor.NVIDIA,
                model=item.name,
                index=item.index,
                memory_total_mib=item.memory_total_bytes // MIB,
                uuid=item.uuid,
                pci_bus_id=item.pci_bus_id,
                # MIG UUIDs: what CUDA_VISIBLE_DEVICES takes to select one instance.
                hardware_partitions=tuple(m.uuid for m in item.mig_instances),
                attributes=attributes,
            )
        )

    # -- health thread --------------------------------------------------------------------

    def _start_watcher(self, handles: Mapping[str, Handle]) -> None:
        if not handles:
            return
        self._watcher = HealthWatcher(
            self._binding,
            asyncio.get_running_loop(),
            self._set_health,
            timeout_ms=self._event_timeout_ms,
            application_xids=self._application_xids,
        )
        self._watcher.start(handles)

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)

    # -- sampling -------------------------------------------------------------------------

    def _processes_sync(self, uuid: str, handle: Handle) -> tuple[ProcessUsage, ...]:
        b = self._binding
        try:
            procs = b.compute_processes(handle)
        except GpuLostError:
            raise
        except NvmlError as exc:
            self._warn_once(uuid, "processes", exc)
            return ()
        since = self._util_since_us.get(uuid)
        if since is None:
            since = int(time.time() * 1_000_000) - _FIRST_UTIL_WINDOW_US
        samples: tuple[ProcessUtilSample, ...] | None
        try:
            samples = b.process_utilisation(handle, since)
        except GpuLostError:
            raise
        except NvmlError as exc:
            self._warn_once(uuid, "process utilisation", exc)
            samples = None
        util_by_pid: dict[int, list[int]] = {}
        for s in samples or ():
            util_by_pid.setdefault(s.pid, []).append(s.sm_pct)
            since = max(since, s.timestamp_us)
        self._util_since_us[uuid] = since
        return _process_usages(procs, samples is not None, util_by_pid)

    def _sample_sync(self, handles: Mapping[str, Handle]) -> list[_Reading]:
        b = self._binding
        readings = []
        for uuid, handle in handles.items():
            try:
                memory: MemoryInfo | None
                try:
                    memory = b.memory(handle)
                except GpuLostError:
                    raise
                except NvmlError as exc:
                    self._warn_once(uuid, "memory", exc)
                    memory = None
                util = b.utilisation(handle)
                readings.append(
                    _Reading(
                        uuid=uuid,
                        memory=memory,
                        gpu_pct=None if util is None else util.gpu_pct,
                        temperature_c=b.temperature_c(handle),
                        power_mw=b.power_mw(handle),
                        processes=self._processes_sync(uuid, handle),
                    )
                )
            except GpuLostError as exc:
                readings.append(_Reading(uuid=uuid, lost_reason=exc.message))
            except NvmlError as exc:
                self._warn_once(uuid, "sample", exc)
                readings.append(_Reading(uuid=uuid))
        return readings

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        """Telemetry per GPU; NVML sees device processes itself, so ``bound`` is unused."""
        if not self._devices and not self._handles:
            await self.discover()
        readings = await self._run(self._sample_sync, dict(self._handles))
        samples = []
        for r in readings:
            if r.lost_reason is not None:
                self._set_health(r.uuid, Health.LOST, r.lost_reason)
            health, reason = self._health.get(r.uuid, (Health.OK, None))
            samples.append(
                DeviceSample(
                    device_id=r.uuid,
                    memory_used_mib=None if r.memory is None else r.memory.used_bytes / MIB,
                    utilisation_pct=None if r.gpu_pct is None else float(r.gpu_pct),
                    temperature_c=None if r.temperature_c is None else float(r.temperature_c),
                    power_w=None if r.power_mw is None else r.power_mw / 1000,
                    processes=r.processes,
                    health=health,
                    health_reason=reason,
                )
            )
        return samples

    # -- kernel-enforced memory limits ----------------------------------------------------

    async def memory_limits_refused(self, device_id: str, namespace: str) -> str | None:
        handle = self._handles.get(device_id)
        if handle is None:
            return "not an NVML device (or lost)"
        try:
            await self._run(self._binding.memory_limits, handle, namespace)
        except NvmlError as exc:
            version = self._driver_version or "?"
            if exc.kind is ErrorKind.FUNCTION_NOT_FOUND:
                return f"driver {version} has no memory limits ({exc.function})"
            if exc.kind is ErrorKind.NOT_SUPPORTED:
                return f"driver {version} does not support memory limits on this card"
            if exc.kind is ErrorKind.NO_PERMISSION:
                return "not permitted (setting memory limits needs root)"
            return f"memory limits failed: {exc.message}"
        except BackendError as exc:
            return str(exc)
        return None

    async def set_memory_limit(
        self, device_id: str, namespace: str, mib: int | None
    ) -> DriverMemoryLimit:
        handle = self._handles.get(device_id)
        if handle is None:
            raise BackendError(f"no NVML device {device_id}", backend=self.name)

        def apply() -> DriverMemoryLimit:
            self._binding.set_memory_limits(handle, namespace, mib)
            read = self._binding.memory_limits(handle, namespace)
            return DriverMemoryLimit(read.hard_mib, read.used_mib)

        try:
            return await self._run(apply)
        except NvmlError as exc:
            raise BackendError(f"{exc.function}: {exc.message}", backend=self.name) from exc

    async def close(self) -> None:
        if self._closed:
            return
        await self._stop_watcher()
        try:
            await self._run(self._binding.shutdown)
        except (NvmlError, BackendError) as exc:
            log.debug("nvml shutdown failed", error=str(exc))
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)


def _process_usages(
    procs: Sequence[ProcessMemory], util_known: bool, util_by_pid: Mapping[int, list[int]]
) -> tuple[ProcessUsage, ...]:
    """Merge memory and utilisation per pid (NVML lists a pid once per context).

    NVML only keeps samples for processes that ran kernels, so where per-process
    utilisation is supported a listed process without samples was idle: 0 %, not unknown.
    """
    memory_by_pid: dict[int, int | None] = {}
    for p in procs:
        if p.pid in memory_by_pid:
            previous = memory_by_pid[p.pid]
            used = p.used_memory_bytes
            memory_by_pid[p.pid] = None if previous is None or used is None else previous + used
        else:
            memory_by_pid[p.pid] = p.used_memory_bytes
    usages = []
    for pid, used_bytes in memory_by_pid.items():
        util: float | None = None
        if util_known:
            sms = util_by_pid.get(pid)
            util = sum(sms) / len(sms) if sms else 0.0
        usages.append(
            ProcessUsage(
                pid=pid,
                memory_mib=None if used_bytes is None else used_bytes / MIB,
                utilisation_pct=util,
                start_time=processes.start_time(pid),
            )
        )
    return tuple(usages)


def create(
    config: NvmlConfig,
    *,
    nvml_module: object = None,
    call_timeout_s: float = 10.0,
) -> Backend:
    """Initialise NVML and return the backend; :class:`BackendAbsent` where NVML is not.

    ``nvmlInit`` can take seconds on a node without persistence mode: it runs on the
    backend's worker thread, but this function waits for it, so call it from the event
    loop through ``asyncio.to_thread``. ``nvml_module`` replaces ``pynvml`` (tests).
    """
    binding = Binding(nvml_module)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
    try:
        executor.submit(binding.init).result(timeout=call_timeout_s)
    except LibraryAbsentError as exc:
        executor.shutdown(wait=False)
        raise BackendAbsent(f"NVIDIA driver not available: {exc.message}") from exc
    except NvmlError as exc:
        executor.shutdown(wait=False)
        raise BackendError(f"NVML failed to initialise: {exc}", backend="nvml") from exc
    except TimeoutError as exc:
        executor.shutdown(wait=False)
        raise BackendError(
            f"NVML did not initialise within {call_timeout_s} s", backend="nvml"
        ) from exc
    return NvmlBackend(
        binding,
        executor,
        event_timeout_ms=config.event_timeout_ms,
        call_timeout_s=call_timeout_s,
    )
