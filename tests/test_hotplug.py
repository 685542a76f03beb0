"""PCI hot-plug: udev event filtering, event-loop integration, clean degradation."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.backends.hotplug import (
    HUAWEI_VENDOR_ID,
    NVIDIA_VENDOR_ID,
    HotplugWatcher,
    PciChange,
    translate,
)


@dataclass
class UdevEvent:
    """Shaped like the pyudev.Device a monitor hands out."""

    action: str | None
    properties: Mapping[str, str] = field(default_factory=dict)


def pci(action: str | None, pci_id: str, slot: str = "0000:3b:00.0") -> UdevEvent:
    return UdevEvent(action, {"SUBSYSTEM": "pci", "PCI_ID": pci_id, "PCI_SLOT_NAME": slot})


class FakeMonitor:
    """A udev monitor over a real pipe, so that loop.add_reader really fires."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self.events: deque[UdevEvent | OSError] = deque()

    def push(self, *events: UdevEvent | OSError) -> None:
        for event in events:
            self.events.append(event)
            os.write(self._write, b"x")

    def fileno(self) -> int:
        return self._read

    def poll(self, timeout: float | None = None) -> UdevEvent | None:
        assert timeout == 0  # never block the loop
        if not self.events:
            return None
        os.read(self._read, 1)
        event = self.events.popleft()
        if isinstance(event, OSError):
            raise event
        return event

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def monitor() -> Iterator[FakeMonitor]:
    m = FakeMonitor()
    yield m
    m.close()


async def take(watcher: HotplugWatcher, n: int) -> list[PciChange]:
    got: list[PciChange] = []
    async with asyncio.timeout(5):
        async for change in watcher.changes():
            got.append(change)
            if len(got) == n:
                break
    return got


# -- filtering and translation ---------------------------------------------------------------


@pytest.mark.parametrize("action", ["add", "remove", "bind", "unbind"])
def test_nvidia_actions_are_changes(action: str) -> None:
    assert translate(pci(action, "10DE:2330", "0000:3B:00.0")) == PciChange(
        action=action,  # type: ignore[arg-type]
        vendor_id=NVIDIA_VENDOR_ID,
        device_id=0x2330,
        pci_slot="0000:3b:00.0",
    )


def test_huawei_is_a_change() -> None:
    change = translate(pci("remove", "19E5:D802", "0000:c1:00.0"))
    assert change == PciChange("remove", HUAWEI_VENDOR_ID, 0xD802, "0000:c1:00.0")


@pytest.mark.parametrize(
    "event",
    [
        pci("add", "8086:0D57"),  # another vendor
        pci("change", "10DE:2330"),  # not an action we act on
        pci(None, "10DE:2330"),  # read from sysfs, not from a monitor
        UdevEvent("add", {"PCI_SLOT_NAME": "0000:3b:00.0"}),  # no PCI_ID
        UdevEvent("add", {"PCI_ID": "10DE:2330"}),  # no slot
        pci("add", "garbage"),
    ],
)
def test_other_events_are_ignored(event: UdevEvent) -> None:
    assert translate(event) is None


def test_vendor_filter_is_configurable() -> None:
    assert translate(pci("add", "19E5:D802"), frozenset({NVIDIA_VENDOR_ID})) is None


def test_real_udev_properties_have_the_names_we_read() -> None:
    """pyudev on this machine names a PCI device's id and slot as translate() expects."""
    pyudev = pytest.importorskip("pyudev")
    paths = sorted(Path("/sys/bus/pci/devices").glob("*"))
    if not paths:
        pytest.skip("no PCI devices visible")
    try:
        device = pyudev.Devices.from_sys_path(pyudev.Context(), str(paths[0]))
    except (ImportError, OSError) as exc:
        pytest.skip(f"udev not usable here: {exc}")
    props = device.properties
    vendor = int(props["PCI_ID"].split(":")[0], 16)
    change = translate(UdevEvent("add", props), frozenset({vendor}))
    assert change is not None
    assert change.pci_slot == paths[0].name


# -- the watcher on the event loop ---------------------------------------------------------


async def test_watcher_delivers_matching_events(monitor: FakeMonitor) -> None:
    async with HotplugWatcher(monitor_factory=lambda: monitor) as watcher:
        assert watcher.available
        monitor.push(
            pci("add", "10DE:2330", "0000:3b:00.0"),
            pci("add", "8086:1572", "0000:5e:00.0"),
            pci("unbind", "19E5:D802", "0000:c1:00.0"),
        )
        got = await take(watcher, 2)
    assert [(c.action, c.vendor_id, c.pci_slot) for c in got] == [
        ("add", NVIDIA_VENDOR_ID, "0000:3b:00.0"),
        ("unbind", HUAWEI_VENDOR_ID, "0000:c1:00.0"),
    ]


async def test_close_ends_the_iteration(monitor: FakeMonitor) -> None:
    watcher = HotplugWatcher(monitor_factory=lambda: monitor)
    assert watcher.start()

    async def consume() -> list[PciChange]:
        return [c async for c in watcher.changes()]

    task = asyncio.create_task(consume())
    monitor.push(pci("remove", "10DE:2330"))
    await asyncio.sleep(0.05)
    watcher.close()
    watcher.close()  # idempotent
    async with asyncio.timeout(5):
        got = await task
    assert [c.action for c in got] == ["remove"]
    assert not watcher.available


async def test_receive_errors_do_not_stop_the_watcher(monitor: FakeMonitor) -> None:
    async with HotplugWatcher(monitor_factory=lambda: monitor) as watcher:
        monitor.push(OSError(105, "No buffer space available"))
        await asyncio.sleep(0.05)
        monitor.push(pci("add", "10DE:2330"))
        (change,) = await take(watcher, 1)
    assert change.action == "add"


async def test_unread_events_are_dropped_not_piled_up(monitor: FakeMonitor) -> None:
    async with HotplugWatcher(monitor_factory=lambda: monitor, max_pending=1) as watcher:
        monitor.push(*(pci("add", "10DE:2330", f"0000:{i:02x}:00.0") for i in range(3)))
        await asyncio.sleep(0.05)
        (change,) = await take(watcher, 1)
    assert change.pci_slot == "0000:00:00.0"


@pytest.mark.parametrize("error", [OSError("netlink: permission denied"), ImportError("libudev")])
async def test_unavailable_udev_degrades_to_nothing(error: Exception) -> None:
    def broken() -> object:
        raise error

    watcher = HotplugWatcher(monitor_factory=broken)
    assert watcher.start() is False
    assert not watcher.available
    async with asyncio.timeout(1):
        assert [c async for c in watcher.changes()] == []
        assert [c async for c in watcher.changes()] == []  # and again
    watcher.close()


async def test_real_udev_starts_or_degrades_cleanly() -> None:
    """In this sandbox netlink may or may not be allowed; neither may raise."""
    async with HotplugWatcher() as watcher:
        started = watcher.available
    assert not watcher.available
    if not started:
        async with asyncio.timeout(1):
            assert [c async for c in watcher.changes()] == []
