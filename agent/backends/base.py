"""The backend seam: every device kind implements :class:`Backend`.

Backends are called from the event loop but must never block it: anything that may block
(NVML, a subprocess, reading /proc for many processes) runs in a thread or has a timeout.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.model import Device, DeviceSample


@dataclass(frozen=True, slots=True)
class DriverMemoryLimit:
    """A cgroup's limit on one card as the driver reads it back (``None``: no limit)."""

    hard_mib: int | None
    used_mib: int


class Backend(abc.ABC):
    """A source of devices and their live telemetry."""

    #: Short stable name used in config (``backends.enabled``) and telemetry.
    name: str

    @abc.abstractmethod
    async def discover(self) -> Sequence[Device]:
        """Return the devices present now. Called at start and on every re-discovery."""

    @abc.abstractmethod
    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        """Return live telemetry for each device.

        ``bound`` maps a device id to the pids the agent has bound to slices on it; backends
        that cannot see device processes by themselves (the mock) use it to find them.
        """

    async def memory_limits_refused(self, device_id: str, namespace: str) -> str | None:
        """Why the driver cannot limit a cgroup's memory on this device (``None``: it can;
        ``namespace`` is a cgroup's sysfs path to probe with)."""
        return f"the {self.name} backend has no driver memory limits"

    async def set_memory_limit(
        self, device_id: str, namespace: str, mib: int | None
    ) -> DriverMemoryLimit:
        """Limit the cgroup at ``namespace`` to ``mib`` on this device (``None``: clear), and
        read the limit back."""
        raise NotImplementedError(f"the {self.name} backend has no driver memory limits")

    def request_rescan(self) -> None:  # noqa: B027 - optional hook
        """Re-enumerate devices on the next ``discover()`` (a PCI device came or went)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release handles (NVML shutdown, threads)."""


class BackendAbsent(Exception):
    """Raised by a backend's factory when its devices or driver are not on this node."""
