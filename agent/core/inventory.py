"""The node's devices: discovery across backends, live samples, loss and return.

A device that disappears keeps its last known description with health ``lost`` so that
its slices stay visible; when it comes back healthy it is usable again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from agent.backends.base import Backend
from agent.model import Device, DeviceSample, Health

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class InventoryChange:
    lost: tuple[str, ...]
    returned: tuple[str, ...]
    added: tuple[str, ...]


#: Samples of a backend that may fail in a row before its devices are unhealthy.
FAILED_SAMPLES_UNHEALTHY = 3


class Inventory:
    def __init__(
        self,
        backends: Sequence[Backend],
        sample_timeout_s: float = 15.0,
        failed_samples_unhealthy: int = FAILED_SAMPLES_UNHEALTHY,
    ) -> None:
        self.backends = list(backends)
        self._devices: dict[str, Device] = {}
        self._samples: dict[str, DeviceSample] = {}
        self._timeout_s = sample_timeout_s
        self._failed_limit = failed_samples_unhealthy
        #: Consecutive failed samples per backend.
        self.failed_samples: dict[str, int] = {}
        self.discovered = False

    @property
    def devices(self) -> Mapping[str, Device]:
        return self._devices

    @property
    def samples(self) -> Mapping[str, DeviceSample]:
        return self._samples

    def backend_of(self, device_id: str) -> Backend | None:
        device = self._devices.get(device_id)
        if device is None:
            return None
        return next((b for b in self.backends if b.name == device.backend), None)

    def usable(self, device_id: str) -> bool:
        device = self._devices.get(device_id)
        return device is not None and device.health is Health.OK

    async def discover(self) -> InventoryChange:
        seen: dict[str, Device] = {}
        failed_backends: set[str] = set()
        for backend in self.backends:
            try:
                found = await asyncio.wait_for(backend.discover(), self._timeout_s)
            except Exception as exc:
                log.warning("discovery failed", backend=backend.name, error=str(exc))
                failed_backends.add(backend.name)
                continue
            seen.update((d.id, d) for d in found)
        before = {i for i, d in self._devices.items() if d.health is Health.OK}
        added = tuple(sorted(set(seen) - set(self._devices)))
        for device_id, device in self._devices.items():
            if device_id not in seen:
                keep_unknown = device.backend in failed_backends
                seen[device_id] = dataclasses.replace(
                    device,
                    health=Health.UNKNOWN if keep_unknown else Health.LOST,
                    health_reason="backend failed" if keep_unknown else "device disappeared",
                )
        self._devices = dict(sorted(seen.items(), key=lambda kv: (kv[1].backend, kv[1].index)))
        after = {i for i, d in self._devices.items() if d.health is Health.OK}
        self.discovered = True
        return InventoryChange(
            lost=tuple(sorted(before - after)),
            returned=tuple(sorted((after - before) - set(added))),
            added=added,
        )

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> InventoryChange:
        """Refresh live telemetry; a sample's health overrides the discovered one."""
        before = {i for i, d in self._devices.items() if d.health is Health.OK}
        for backend in self.backends:
            try:
                samples = await asyncio.wait_for(backend.sample(bound), self._timeout_s)
            except Exception as exc:
                failed = self.failed_samples.get(backend.name, 0) + 1
                self.failed_samples[backend.name] = failed
                log.warning("sampling failed", backend=backend.name, error=str(exc), failed=failed)
                if failed >= self._failed_limit:
                    self._unhealthy(backend.name, f"{failed} samples failed in a row: {exc}")
                continue
            self.failed_samples[backend.name] = 0
            for sample in samples:
                self._samples[sample.device_id] = sample
                device = self._devices.get(sample.device_id)
                if device is not None and device.health is not sample.health:
                    self._devices[device.id] = dataclasses.replace(
                        device, health=sample.health, health_reason=sample.health_reason
                    )
        after = {i for i, d in self._devices.items() if d.health is Health.OK}
        return InventoryChange(
            lost=tuple(sorted(before - after)), returned=tuple(sorted(after - before)), added=()
        )

    def _unhealthy(self, backend: str, reason: str) -> None:
        """A backend that cannot be sampled cannot enforce or report: its devices are not
        placeable until a sample succeeds again (then each sample's health is taken)."""
        for device_id, device in list(self._devices.items()):
            if device.backend == backend and device.health is Health.OK:
                self._devices[device_id] = dataclasses.replace(
                    device, health=Health.UNKNOWN, health_reason=reason[:300]
                )
            self._samples.pop(device_id, None)

    async def close(self) -> None:
        for backend in self.backends:
            try:
                await backend.close()
            except Exception as exc:
                log.warning("backend close failed", backend=backend.name, error=str(exc))
