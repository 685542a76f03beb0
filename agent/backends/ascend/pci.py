"""Ascend card family from the PCI device id in sysfs.

``npu-smi`` names chips inconsistently (a 910C prints "Ascend910", a 910A ProB prints
"910B", documentation masks names as "xxx"), while the PCI id the kernel reports is
exact. The sysfs root is a parameter so tests can point it at a temporary directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HUAWEI_PCI_VENDOR = 0x19E5

#: Huawei PCI device id → Ascend family.
CARD_TYPES: dict[int, str] = {
    0xD100: "310",
    0xD500: "310P",
    0xD801: "910",
    0xD802: "910B",
    0xD803: "910C",
}


@dataclass(frozen=True, slots=True)
class PciId:
    vendor_id: int
    device_id: int

    @property
    def card_type(self) -> str | None:
        """The Ascend family, or None for a device that is not a known Ascend NPU."""
        if self.vendor_id != HUAWEI_PCI_VENDOR:
            return None
        return CARD_TYPES.get(self.device_id)


def sysfs_bus_id(bus_id: str) -> str:
    """``0000:C1:00.0`` (as npu-smi prints) → ``0000:c1:00.0`` (as sysfs names it).

    An 8-digit domain (``00000000:C1:00.0``, NVML style) is shortened to 4 digits.
    """
    domain, _, rest = bus_id.strip().lower().partition(":")
    if len(domain) == 8 and domain.startswith("0000"):
        domain = domain[4:]
    return f"{domain}:{rest}"


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip(), 16)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_pci_id(bus_id: str, sysfs_root: Path = Path("/sys")) -> PciId | None:
    """Read the vendor and device ids of ``bus_id``; None where sysfs does not show it
    (containers without /sys/bus/pci, a bus id npu-smi printed as NA)."""
    device_dir = sysfs_root / "bus" / "pci" / "devices" / sysfs_bus_id(bus_id)
    vendor = _read_hex(device_dir / "vendor")
    device = _read_hex(device_dir / "device")
    if vendor is None or device is None:
        return None
    return PciId(vendor_id=vendor, device_id=device)
