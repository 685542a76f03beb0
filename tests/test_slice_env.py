"""Golden slice environments per vendor: the exact variables, in the forms the driver-level
mechanisms and the frameworks read (agent/core/slice_env.py, docs/enforcement.md)."""

from __future__ import annotations

from agent.core.slice_env import slice_environment
from agent.model import Device, Slice, SliceState, Vendor

SLICE = Slice(
    id="s-0123456789ab",
    device="nvidia-GPU-4b2e",
    memory_mib=20480,
    compute_pct=30,
    owner_uid=1000,
    state=SliceState.ACTIVE,
    created_at=0.0,
    token="tok",
)
H100 = Device(
    id="nvidia-GPU-4b2e",
    backend="nvml",
    vendor=Vendor.NVIDIA,
    model="NVIDIA H100 80GB HBM3",
    index=3,
    memory_total_mib=81920,
    uuid="GPU-4b2e0d3c-1111-2222-3333-444455556666",
)
COMMON = {
    "XPU_SLICE_ID": "s-0123456789ab",
    "XPU_SLICE_TOKEN": "tok",
    "XPU_MEMORY_LIMIT_MIB": "20480",
    "XPU_COMPUTE_PCT": "30",
    "XPU_MEMORY_FRACTION": "0.25",
}


def test_nvidia_slice_environment() -> None:
    assert slice_environment(SLICE, H100) == COMMON | {
        "XPU_DEVICE": "nvidia-GPU-4b2e",
        "CUDA_VISIBLE_DEVICES": "GPU-4b2e0d3c-1111-2222-3333-444455556666",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
        # By index: the client sees its one visible card as device 0 (not index 3, and not
        # the UUID, whose limits NVIDIA's device plugin found not applied).
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M",
        "CUDA_DEVICE_MEMORY_LIMIT": "20480m",
        "CUDA_DEVICE_SM_LIMIT": "30",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }


def test_hami_core_is_preloaded_where_configured() -> None:
    env = slice_environment(SLICE, H100, hami_core="/opt/hami/libvgpu.so")
    assert env["LD_PRELOAD"] == "/opt/hami/libvgpu.so"
    assert "LD_PRELOAD" not in slice_environment(SLICE, H100)
    moved = slice_environment(SLICE, H100, mps_pipe_directory="/run/mps/card3")
    assert moved["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps/card3"


def test_ascend_and_mock_slice_environments() -> None:
    ascend = Device(
        id="ascend-0",
        backend="npu-smi",
        vendor=Vendor.ASCEND,
        model="Ascend910B3",
        index=5,
        memory_total_mib=65536,
        attributes={"logic_id": "2"},
    )
    npu_slice = Slice(**{**_fields(SLICE), "device": "ascend-0", "memory_mib": 16384})
    assert slice_environment(npu_slice, ascend, hami_core="/opt/hami/libvgpu.so") == {
        **COMMON,
        "XPU_MEMORY_LIMIT_MIB": "16384",
        "XPU_DEVICE": "ascend-0",
        "ASCEND_RT_VISIBLE_DEVICES": "2",
        "ASCEND_VISIBLE_DEVICES": "2",
    }
    mock = Device(
        id="mock-0",
        backend="mock",
        vendor=Vendor.MOCK,
        model="MockA100-80G",
        index=0,
        memory_total_mib=81920,
    )
    mock_slice = Slice(**{**_fields(SLICE), "device": "mock-0"})
    assert slice_environment(mock_slice, mock) == COMMON | {"XPU_DEVICE": "mock-0"}


def _fields(slice_: Slice) -> dict[str, object]:
    return {name: getattr(slice_, name) for name in Slice.__dataclass_fields__}
