"""The backend seam: every device kind implements :class:`Backend`.

Backends are called from the event loop but must never block it: anything that may block
(NVML, a subprocess, reading /proc for many processes) runs in a thread or has a timeout.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

from agent.model import Device, DeviceSample


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

    def request_rescan(self) -> None:  # noqa: B027 - optional hook
        """Re-enumerate devices on the next ``discover()`` (a PCI device came or went)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release handles (NVML shutdown, threads)."""


class BackendAbsent(Exception):
    """Raised by a backend's factory when its devices or driver are not on this node."""
