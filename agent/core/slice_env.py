"""The environment a workload in a slice needs (DESIGN.md §4).

On NVIDIA cards it carries the limits in the forms the driver-level mechanisms read
(docs/enforcement.md): MPS (``CUDA_MPS_*``; the memory limit by device *index*, ``0``,
since ``CUDA_VISIBLE_DEVICES`` names the one card — NVIDIA's device plugin moved to
indices because limits given by UUID were not applied), HAMi-core (``CUDA_DEVICE_*``,
and ``LD_PRELOAD`` when the operator configured its library), and the frameworks' own
budget switches (JAX's preallocation fraction, TensorFlow's growth flag).

MPS applies its memory limit to each client process, not to the slice: the limit is
the slice's whole memory, so one process may use all of it, and the agent's sampling
enforcement (which sums a slice's processes) is what holds a slice of several processes
to its size.
"""

from __future__ import annotations

from agent.model import Device, Slice, Vendor


def _fraction_text(value: float) -> str:
    return f"{min(value, 1.0):.4f}".rstrip("0").rstrip(".")


def slice_environment(
    slice_: Slice, device: Device | None, hami_core: str = "", mps_pipe_directory: str = ""
) -> dict[str, str]:
    """``hami_core``: the library to preload; ``mps_pipe_directory``: where the operator's
    MPS daemon listens, when not MPS's default."""
    card_mib = device.memory_total_mib if device else 0
    fraction = slice_.memory_mib / card_mib if card_mib else 1.0
    env = {
        "XPU_SLICE_ID": slice_.id,
        "XPU_SLICE_TOKEN": slice_.token,
        "XPU_DEVICE": slice_.device,
        "XPU_MEMORY_LIMIT_MIB": str(slice_.memory_mib),
        "XPU_COMPUTE_PCT": str(slice_.compute_pct),
        "XPU_MEMORY_FRACTION": _fraction_text(fraction),
    }
    if device is None:
        return env
    if device.vendor is Vendor.NVIDIA:
        env |= {
            "CUDA_VISIBLE_DEVICES": device.uuid or str(device.index),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(slice_.compute_pct),
            # Index 0: the one card CUDA_VISIBLE_DEVICES leaves the client.
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={slice_.memory_mib}M",
            "CUDA_DEVICE_MEMORY_LIMIT": f"{slice_.memory_mib}m",
            "CUDA_DEVICE_SM_LIMIT": str(slice_.compute_pct),
            # JAX preallocates this fraction of the card (default 0.75: more than a slice).
            "XLA_PYTHON_CLIENT_MEM_FRACTION": _fraction_text(fraction),
            # TensorFlow otherwise maps nearly all of the card's memory at start.
            "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        }
        if hami_core:
            env["LD_PRELOAD"] = hami_core
        if mps_pipe_directory:
            env["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_directory
    elif device.vendor is Vendor.ASCEND:
        logical = device.attributes.get("logic_id", str(device.index))
        env |= {"ASCEND_RT_VISIBLE_DEVICES": logical, "ASCEND_VISIBLE_DEVICES": logical}
    return env
