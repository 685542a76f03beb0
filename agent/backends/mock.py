"""Mock cards that behave like accelerators on real processes (DESIGN.md §5).

A process's memory on a mock card is its resident memory (RSS); its utilisation is its CPU
time share over the last sample, as a percentage of one core. A process is on a mock card
when it is bound to a slice there or its environment carries ``XPU_DEVICE=<card id>``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

from agent.backends.base import Backend
from agent.model import Device, DeviceSample, ProcessUsage, Vendor

MIB = 1024 * 1024


@dataclass(slots=True)
class _CpuMark:
    cpu_s: float
    at: float


class MockBackend(Backend):
    name = "mock"

    def __init__(self, cards: Sequence[tuple[str, int]], node: str = "local") -> None:
        self._devices = [
            Device(
                id=f"mock-{i}",
                backend=self.name,
                vendor=Vendor.MOCK,
                model=model,
                index=i,
                memory_total_mib=memory_mib,
                uuid=f"MOCK-{node}-{i}",
                pci_bus_id=f"0000:{0x10 + i:02x}:00.0",
            )
            for i, (model, memory_mib) in enumerate(cards)
        ]
        self._ids = {d.id for d in self._devices}
        # (pid, start time) -> device named by XPU_DEVICE, or None; environ never changes
        # after exec, so it is read once per process.
        self._env_device: dict[tuple[int, float], str | None] = {}
        self._cpu: dict[tuple[int, float], _CpuMark] = {}

    async def discover(self) -> Sequence[Device]:
        return list(self._devices)

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        return await asyncio.to_thread(self._sample_sync, bound)

    def _device_from_environ(self, proc: psutil.Process, key: tuple[int, float]) -> str | None:
        if key in self._env_device:
            return self._env_device[key]
        try:
            device = proc.environ().get("XPU_DEVICE")
        except (psutil.Error, OSError):
            device = None
        found = device if device in self._ids else None
        self._env_device[key] = found
        return found

    def _sample_sync(self, bound: Mapping[str, frozenset[int]]) -> list[DeviceSample]:
        now = time.monotonic()
        on_device: dict[str, list[ProcessUsage]] = {d.id: [] for d in self._devices}
        pid_to_device = {pid: dev for dev, pids in bound.items() for pid in pids}
        seen: set[tuple[int, float]] = set()
        alive: set[tuple[int, float]] = set()
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "create_time"]):
            pid = proc.info["pid"]
            if pid == me:
                continue
            key = (pid, proc.info["create_time"] or 0.0)
            alive.add(key)
            card = pid_to_device.get(pid) or self._device_from_environ(proc, key)
            if card is None or card not in on_device:
                continue
            seen.add(key)
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            cpu_s = times.user + times.system
            mark = self._cpu.get(key)
            util = None
            if mark is not None and now > mark.at:
                util = max(0.0, 100.0 * (cpu_s - mark.cpu_s) / (now - mark.at))
            self._cpu[key] = _CpuMark(cpu_s, now)
            on_device[card].append(
                ProcessUsage(pid=pid, memory_mib=rss / MIB, utilisation_pct=util, start_time=key[1])
            )
        for stale in set(self._cpu) - seen:
            del self._cpu[stale]
        for gone in set(self._env_device) - alive:
            del self._env_device[gone]
        samples = []
        for device in self._devices:
            procs = tuple(on_device[device.id])
            used = sum(p.memory_mib or 0.0 for p in procs)
            util = min(100.0, sum(p.utilisation_pct or 0.0 for p in procs))
            samples.append(
                DeviceSample(
                    device_id=device.id,
                    memory_used_mib=used,
                    utilisation_pct=util,
                    temperature_c=None,
                    power_w=None,
                    processes=procs,
                )
            )
        return samples
