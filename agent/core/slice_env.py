"""The environment a workload in a slice needs (DESIGN.md §4)."""

from __future__ import annotations

from agent.model import Device, Slice, Vendor


def slice_environment(slice_: Slice, device: Device | None) -> dict[str, str]:
    card_mib = device.memory_total_mib if device else 0
    fraction = slice_.memory_mib / card_mib if card_mib else 1.0
    env = {
        "XPU_SLICE_ID": slice_.id,
        "XPU_SLICE_TOKEN": slice_.token,
        "XPU_DEVICE": slice_.device,
        "XPU_MEMORY_LIMIT_MIB": str(slice_.memory_mib),
        "XPU_COMPUTE_PCT": str(slice_.compute_pct),
        "XPU_MEMORY_FRACTION": f"{min(fraction, 1.0):.4f}".rstrip("0").rstrip("."),
    }
    if device is None:
        return env
    if device.vendor is Vendor.NVIDIA:
        env |= {
            "CUDA_VISIBLE_DEVICES": device.uuid or str(device.index),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(slice_.compute_pct),
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"{device.uuid or device.index}="
            f"{slice_.memory_mib}M",
            "CUDA_DEVICE_MEMORY_LIMIT": f"{slice_.memory_mib}m",
            "CUDA_DEVICE_SM_LIMIT": str(slice_.compute_pct),
        }
    elif device.vendor is Vendor.ASCEND:
        logical = device.attributes.get("logic_id", str(device.index))
        env |= {"ASCEND_RT_VISIBLE_DEVICES": logical, "ASCEND_VISIBLE_DEVICES": logical}
    return env
