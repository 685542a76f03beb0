"""The whole daemon on a faithful Ascend node: the fake npu-smi answers from captures."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness import REPO, AgentProcess, json_out

FAKE = REPO / "tests" / "fake_npu_smi.py"


def test_xpuctl_devices_shows_captured_chips(agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory(
        config=f'[backends]\nenabled = ["npu-smi"]\n[backends.npu_smi]\npath = "{FAKE}"\n'
    )
    devices = json_out(agent.xpuctl("--json", "devices"))
    # Capture 04 (Atlas 800 9010, 8 x 910A, 32 GiB HBM each) with its Warning chips.
    assert len(devices) == 8
    assert {d["backend"] for d in devices} == {"npu-smi"}
    assert all(d["memory_total_mib"] == 32768 for d in devices)
    assert devices[0]["id"] == "npu-0-0"
    assert all(d["vendor"] == "ascend" for d in devices)
    table = agent.xpuctl("devices")
    assert "npu-7-0" in table.stdout and "32.0GiB" in table.stdout
    # A slice there carries the Ascend variables.
    alloc = json_out(agent.xpuctl("--json", "alloc", "--memory", "8GiB", "--compute", "50"))
    assert alloc["device"].startswith("npu-")
    assert alloc["env"]["ASCEND_RT_VISIBLE_DEVICES"] == alloc["env"]["ASCEND_VISIBLE_DEVICES"]
    assert alloc["env"]["XPU_MEMORY_FRACTION"] == "0.25"
