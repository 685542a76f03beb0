"""PCI hot-plug of accelerators through udev, integrated with the event loop.

A netlink udev monitor's socket is watched with ``loop.add_reader`` and drained with
non-blocking ``poll(timeout=0)``, so no thread is needed. Where udev is not reachable
(containers, no netlink permission, no libudev) the watcher logs once and yields nothing:
the daemon's periodic re-discovery covers that case.

Usage::

    async with HotplugWatcher() as watcher:
        async for change in watcher.changes():
            ...  # e.g. nvml_backend.request_rescan(); await inventory.discover()
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import structlog

log = structlog.get_logger(__name__)

NVIDIA_VENDOR_ID = 0x10DE
HUAWEI_VENDOR_ID = 0x19E5
DEFAULT_VENDORS = frozenset({NVIDIA_VENDOR_ID, HUAWEI_VENDOR_ID})

Action = Literal["add", "remove", "bind", "unbind"]
_ACTIONS: dict[str | None, Action] = {
    "add": "add",
    "remove": "remove",
    "bind": "bind",
    "unbind": "unbind",
}


@dataclass(frozen=True, slots=True)
class PciChange:
    """An accelerator's PCI function appeared, went, or gained or lost its driver."""

    action: Action
    vendor_id: int
    device_id: int
    #: e.g. ``0000:3b:00.0``; NVML writes the same address as ``00000000:3B:00.0``.
    pci_slot: str


class UdevDevice(Protocol):
    """The part of ``pyudev.Device`` we read (udev properties survive a removal)."""

    @property
    def action(self) -> str | None: ...

    @property
    def properties(self) -> Mapping[str, str]: ...


def translate(device: UdevDevice, vendors: frozenset[int] = DEFAULT_VENDORS) -> PciChange | None:
    """A udev PCI event as a :class:`PciChange`, or ``None`` if it is not one of ours."""
    action = _ACTIONS.get(device.action)
    if action is None:
        return None
    props = device.properties
    pci_id = props.get("PCI_ID", "")  # "10DE:2330": vendor and device, hexadecimal
    slot = props.get("PCI_SLOT_NAME")
    vendor_hex, _, device_hex = pci_id.partition(":")
    try:
        vendor_id, device_id = int(vendor_hex, 16), int(device_hex, 16)
    except ValueError:
        return None
    if vendor_id not in vendors or not slot:
        return None
    return PciChange(
        action=action,
        vendor_id=vendor_id,
        device_id=device_id,
        pci_slot=slot.lower(),
    )


def _udev_monitor() -> Any:
    """A started netlink monitor for PCI events (pyudev is untyped)."""
    pyudev = importlib.import_module("pyudev")
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by(subsystem="pci")
    monitor.start()
    return monitor


class HotplugWatcher:
    """Yields :class:`PciChange` items for the given vendors while started."""

    def __init__(
        self,
        vendors: frozenset[int] = DEFAULT_VENDORS,
        *,
        monitor_factory: Callable[[], Any] = _udev_monitor,
        max_pending: int = 1024,
    ) -> None:
        self._vendors = vendors
        self._factory = monitor_factory
        self._monitor: Any = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[PciChange | None] = asyncio.Queue(max_pending)
        self._started = False
        self._closed = False

    @property
    def available(self) -> bool:
        """Whether udev events are being received."""
        return self._fd is not None

    def start(self) -> bool:
        """Open the udev monitor; call on the event loop. ``False``: hot-plug unavailable."""
        if self._started:
            return self.available
        self._started = True
        try:
            monitor = self._factory()
            fd = int(monitor.fileno())
            loop = asyncio.get_running_loop()
            loop.add_reader(fd, self._drain)
        except (ImportError, OSError, ValueError, NotImplementedError) as exc:
            # ImportError: no pyudev or libudev; OSError: no netlink (containers, seccomp,
            # RestrictAddressFamilies); NotImplementedError: a loop without add_reader.
            log.info("hot-plug monitoring unavailable; relying on re-discovery", error=str(exc))
            return False
        self._monitor, self._fd, self._loop = monitor, fd, loop
        log.debug("hot-plug monitoring started", vendors=sorted(self._vendors))
        return True

    def _drain(self) -> None:
        """Reader callback: take every pending event without blocking."""
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:  # e.g. ENOBUFS after a burst: events were lost
                log.warning("udev event receive failed", error=str(exc))
                return
            if device is None:
                return
            change = translate(device, self._vendors)
            if change is None:
                continue
            log.info(
                "pci hot-plug",
                action=change.action,
                vendor=f"{change.vendor_id:04x}",
                device=f"{change.device_id:04x}",
                slot=change.pci_slot,
            )
            try:
                self._queue.put_nowait(change)
            except asyncio.QueueFull:
                log.warning("hot-plug events dropped: nobody is reading them")

    def close(self) -> None:
        """Stop watching; :meth:`changes` ends after the events already queued."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._fd is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = None
        self._monitor = None  # pyudev closes the netlink socket when the monitor goes
        # Wake a waiting reader; if the queue is full it is awake anyway.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def changes(self) -> AsyncIterator[PciChange]:
        """Changes as they happen; ends at once when hot-plug is unavailable, or on close."""
        self.start()
        while True:
            if self._fd is None and self._queue.empty():  # unavailable, or closed and drained
                return
            change = await self._queue.get()
            if change is not None:  # None only wakes us to look again
                yield change

    async def __aenter__(self) -> HotplugWatcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
