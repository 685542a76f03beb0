"""The enforcement ladder (agent/core/ladder.py): each probe outcome selects the expected
rung, a refused rung never breaks the ones below it, and every refusal says why; and what
a user sees of it (``xpuctl devices``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.backends.base import Backend, DriverMemoryLimit
from agent.config import Config, from_mapping
from agent.core import ladder
from agent.model import Device, DeviceSample, Vendor
from tests.harness import AgentProcess, json_out

GPU = Device(
    id="nvidia-GPU-1",
    backend="fake",
    vendor=Vendor.NVIDIA,
    model="NVIDIA H100 80GB HBM3",
    index=0,
    memory_total_mib=81920,
    uuid="GPU-1",
)


class _Driver(Backend):
    """A backend whose driver answers the memory-limit probe as told."""

    name = "fake"

    def __init__(self, refused: str | None = None) -> None:
        self.refused = refused
        self.probed: list[str] = []

    async def discover(self) -> Sequence[Device]:
        return [GPU]

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        return []

    async def memory_limits_refused(self, device_id: str, namespace: str) -> str | None:
        self.probed.append(namespace)
        return self.refused

    async def set_memory_limit(
        self, device_id: str, namespace: str, mib: int | None
    ) -> DriverMemoryLimit:
        return DriverMemoryLimit(mib, 0)


def _config(tmp_path: Path, controllers: str | None = "cpu memory dmem", **nvidia: Any) -> Config:
    root = tmp_path / "xpu"
    root.mkdir(exist_ok=True)
    if controllers is not None:
        (root / "cgroup.controllers").write_text(controllers + "\n")
    return from_mapping({"version": 1, "enforcement": {"cgroup_root": str(root), "nvidia": nvidia}})


def test_choose_takes_the_strongest_rung_not_refused() -> None:
    assert ladder.choose({}) == ladder.Rung("nvml-limits")
    rung = ladder.choose({"nvml-limits": "old driver", "mps": "off"})
    assert rung == ladder.Rung("hami-core", {"nvml-limits": "old driver", "mps": "off"})
    everything = dict.fromkeys(ladder.RUNGS, "no")
    assert ladder.choose(everything).name == "sampling"  # the backstop cannot be refused


async def test_a_driver_with_limits_and_dmem_gets_kernel_limits(tmp_path: Path) -> None:
    driver = _Driver()
    config = _config(tmp_path)
    rung = await ladder.probe(GPU, driver, config)
    assert rung == ladder.Rung("nvml-limits")
    assert driver.probed == [config.enforcement.cgroup_root]  # probed on the delegated tree


@pytest.mark.parametrize(
    ("controllers", "driver_says", "why"),
    [
        ("cpu memory", None, "no dmem controller in"),
        (None, None, "cannot read"),
        ("dmem", "driver 550.54.15 has no memory limits", "driver 550.54.15 has no memory"),
    ],
    ids=["no-dmem", "no-cgroup-files", "old-driver"],
)
async def test_each_refusal_falls_to_the_next_rung_and_says_why(
    tmp_path: Path, controllers: str | None, driver_says: str | None, why: str
) -> None:
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"")
    config = _config(tmp_path, controllers, hami_core=str(lib))
    rung = await ladder.probe(GPU, _Driver(driver_says), config)
    assert rung.name == "hami-core"  # MPS is off by default; HAMi-core is configured
    assert why in rung.refused["nvml-limits"]
    assert rung.refused["mps"] == "enforcement.nvidia.mps is off"


async def test_mps_holds_when_its_daemon_runs_and_sampling_is_the_floor(tmp_path: Path) -> None:
    pipes = tmp_path / "mps"
    pipes.mkdir()
    config = _config(tmp_path, "cpu", mps="external", mps_pipe_directory=str(pipes))
    refused = (await ladder.probe(GPU, _Driver(), config)).refused
    assert "no MPS control daemon at" in refused["mps"]
    (pipes / "control").write_text("")  # the control pipe the daemon makes
    assert (await ladder.probe(GPU, _Driver(), config)).name == "mps"
    floor = _config(tmp_path, None, rungs=["sampling"])
    rung = await ladder.probe(GPU, _Driver(), floor)
    assert rung.name == "sampling"
    assert set(rung.refused.values()) == {"not in enforcement.nvidia.rungs"}


async def test_other_vendors_and_mig_have_no_kernel_limits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    npu = Device("npu-0", "fake", Vendor.ASCEND, "Ascend910B3", 0, 65536)
    assert await ladder.probe(npu, _Driver(), config) == ladder.Rung("sampling")
    mig = _replace(GPU, hardware_partitions=("MIG-1",))
    refused = (await ladder.probe(mig, _Driver(), config)).refused
    assert refused["nvml-limits"].startswith("MIG mode")


def test_xpuctl_devices_says_which_rung_holds_each_card(agent: AgentProcess) -> None:
    devices = json_out(agent.xpuctl("--json", "devices"))
    assert {d["enforcement"]["rung"] for d in devices} == {"sampling"}  # mock cards
    table = agent.xpuctl("devices", "--wide").stdout
    assert "ENFORCED BY" in table.splitlines()[0] and "sampling" in table


def _fields(device: Device) -> dict[str, Any]:
    return {name: getattr(device, name) for name in Device.__dataclass_fields__}


def _replace(device: Device, **changes: Any) -> Device:
    return Device(**(_fields(device) | changes))
