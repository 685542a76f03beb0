"""Managed MPS (agent/enforce/mps.py) against a fake ``nvidia-cuda-mps-control`` and
``nvidia-smi`` on PATH (tests/fake_mps/: NVIDIA's documented stdin protocol and getters,
a daemon per pipe directory, every command recorded): the exact command sequence on
start, the slice environment, restart after the daemon dies, clean state after the agent
was killed, and quit with the compute mode put back on stop."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.backends.base import Backend
from agent.core import ladder
from agent.core.caller import Caller
from agent.core.events import EventHub
from agent.core.inventory import Inventory
from agent.core.service import NodeService
from agent.enforce import mps
from agent.ledger.store import Ledger
from agent.model import Device, DeviceSample, SliceRequest, Vendor
from tests.harness import until

FAKES = Path(__file__).resolve().parent / "fake_mps"
GPU = Device("nvidia-GPU-1", "cards", Vendor.NVIDIA, "NVIDIA H100", 2, 81920, uuid="GPU-1111-2222")


class _Cards(Backend):
    name = "cards"

    async def discover(self) -> Sequence[Device]:
        return [GPU]

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        return []


@pytest.fixture
async def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NodeService]:
    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(tmp_path / "record"))
    monkeypatch.setattr(mps, "HEALTH_S", 0.05)
    config = config_mod.from_mapping(
        {
            "version": 1,
            "enforcement": {"nvidia": {"mps": "managed"}},
            "paths": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")},
        }
    )
    inventory = Inventory([_Cards()])
    await inventory.discover()
    node = NodeService(config, inventory, Ledger(tmp_path / "l.sqlite"), EventHub())
    await node.open()
    yield node
    await node.close()


def recorded(tmp_path: Path) -> list[str]:
    path = tmp_path / "record"
    pipes = str(ladder.mps_pipe_dir(tmp_path / "run", GPU.id))
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.replace(pipes, "<pipes>") for line in lines]


async def test_start_slice_environment_restart_and_stop(
    service: NodeService, tmp_path: Path
) -> None:
    daemons = mps.MpsDaemons(service)
    task = asyncio.create_task(daemons.run())
    try:
        await until(lambda: "<pipes> get_server_list" in recorded(tmp_path))
        first = recorded(tmp_path)
        # The card to exclusive-process mode, the daemon, the defaults by index (the whole
        # card: a slice's own limits lower them), then health checks.
        assert first[:4] == [
            "nvidia-smi -i 2 -c EXCLUSIVE_PROCESS",
            "<pipes> -d",
            "<pipes> set_default_active_thread_percentage 100",
            "<pipes> set_default_device_pinned_mem_limit 0 81920M",
        ]
        pipes = ladder.mps_pipe_dir(tmp_path / "run", GPU.id)
        assert (pipes / "control").exists()
        root = Caller(uid=0, gid=0, pid=os.getpid(), admin=True)
        made, _ = await service.allocate(
            root, SliceRequest(memory_mib=20480, compute_pct=30, owner_uid=0)
        )
        env = service.env(made)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipes)
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20480M"
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
        # The daemon dies: the next health check starts it again.
        os.kill(int((pipes / "daemon.pid").read_text()), signal.SIGKILL)
        await until(lambda: recorded(tmp_path).count("<pipes> -d") == 2)
        await until((pipes / "state.json").exists)
        await asyncio.sleep(0.3)  # its defaults set and the event recorded
        kinds = [e.data["action"] for e in await service.events() if e.kind == "enforce.mps"]
        assert kinds[:3] == ["started", "died", "started"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert recorded(tmp_path)[-2:] == ["<pipes> quit", "nvidia-smi -i 2 -c DEFAULT"]
    assert not (ladder.mps_pipe_dir(tmp_path / "run", GPU.id) / "control").exists()


async def test_a_daemon_left_by_a_killed_agent_is_quit_before_a_clean_start(
    service: NodeService, tmp_path: Path
) -> None:
    first = mps.MpsDaemons(service)
    await first.reconcile()  # started; then the agent "dies" without stopping it
    second = mps.MpsDaemons(service)
    await second.reconcile()
    calls = recorded(tmp_path)
    assert calls.count("<pipes> -d") == 2
    assert calls.index("<pipes> quit") > calls.index("<pipes> -d")  # the old one, quit...
    assert calls[-3:-2] == ["<pipes> -d"]  # ...then a fresh start with its defaults
    await second.stop_all()


async def test_a_failing_start_backs_off(
    service: NodeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_FAIL", "start")
    daemons = mps.MpsDaemons(service)
    await daemons.reconcile()
    await daemons.reconcile()  # within the backoff: not tried again
    assert recorded(tmp_path).count("<pipes> -d") == 1
    failed = [e for e in await service.events() if e.kind == "enforce.mps"]
    assert failed[-1].data["action"] == "start failed" and failed[-1].data["retry_in_s"] == 1.0
    await daemons.stop_all()  # nothing running: nothing to quit
    assert "<pipes> quit" not in recorded(tmp_path)


async def test_the_ladder_offers_managed_mps_only_with_the_tool(
    service: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    rung = await ladder.probe(GPU, None, service.config)
    assert rung.name == "mps"  # no cgroup tree: nvml-limits refused, MPS managed here
    monkeypatch.setenv("PATH", "/nonexistent")
    refused = (await ladder.probe(GPU, None, service.config)).refused
    assert refused["mps"] == "nvidia-cuda-mps-control is not on PATH"


async def test_quit_when_the_last_slice_goes(
    service: NodeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvidia = service.config.enforcement.nvidia
    monkeypatch.setattr(nvidia, "mps_quit_when_idle", True)
    daemons = mps.MpsDaemons(service)
    await daemons.reconcile()
    assert recorded(tmp_path) == []  # no slice: no daemon, the card left alone
    root = Caller(uid=0, gid=0, pid=os.getpid(), admin=True)
    made, _ = await service.allocate(
        root, SliceRequest(memory_mib=1024, compute_pct=10, owner_uid=0)
    )
    await daemons.reconcile()
    assert recorded(tmp_path)[:2] == ["nvidia-smi -i 2 -c EXCLUSIVE_PROCESS", "<pipes> -d"]
    await service.release(root, made.id)
    await daemons.reconcile()
    assert recorded(tmp_path)[-2:] == ["<pipes> quit", "nvidia-smi -i 2 -c DEFAULT"]
