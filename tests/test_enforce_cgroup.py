"""Compute enforcement through a cgroup v2 freezer delegated to the agent
(``enforcement.cgroup_root``), where the host allows it (root, a writable cgroup v2 tree)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.backends.base import Backend, DriverMemoryLimit
from agent.core import ladder
from agent.core.caller import Caller
from agent.core.events import EventHub
from agent.core.inventory import Inventory
from agent.core.service import NodeService
from agent.enforce.actions import CgroupTree
from agent.enforce.loop import Enforcer
from agent.errors import ConfigError
from agent.ledger.store import Ledger
from agent.model import Device, DeviceSample, SliceRequest, Vendor
from tests.enforce_support import BUSY, cpu_priority, events, proc_state, running, shares
from tests.harness import AgentProcess, json_out, wait_for

__all__ = ["cpu_priority"]  # a fixture, used by name below


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.startswith("cgroup2 "):
                return Path(left.split()[4])
    return None


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    root = mount / f"xpu-test-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir()
    except OSError as exc:
        pytest.skip(f"cgroup v2 tree not writable here: {exc.strerror}")
    if not (root / "cgroup.freeze").exists():
        root.rmdir()
        pytest.skip("kernel without the cgroup v2 freezer")
    yield root
    # Whatever is left (a failed test): thaw, then remove the leaves and the root.
    for child in sorted(root.iterdir()):
        if child.is_dir():
            with contextlib.suppress(OSError):
                (child / "cgroup.freeze").write_text("0")
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as fh:
        return next(line[3:].strip() for line in fh if line.startswith("0::"))


def frozen(where: Path) -> bool:
    return "frozen 1" in (where / "cgroup.events").read_text()


def test_relative_cgroup_root_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"enforcement\.cgroup_root"):
        config_mod.from_mapping({"version": 1, "enforcement": {"cgroup_root": "xpu"}})


def test_a_throttled_run_child_is_frozen_in_its_slice_cgroup(
    agent_factory: Callable[..., AgentProcess], cgroup_root: Path, cpu_priority: None
) -> None:
    agent = agent_factory(
        config=f'[enforcement]\ncompute_policy = "hard"\ncgroup_root = "{cgroup_root}"\n'
    )
    with running(agent, "--memory", "256MiB", "--compute", "30", code=BUSY) as (run, pid):
        wait_for(lambda: cgroup_of(pid) != cgroup_of(run.pid), 5)
        slice_id = cgroup_of(pid).rsplit("/", 1)[1]
        assert slice_id.startswith("s-") and (cgroup_root / slice_id).is_dir()
        time.sleep(2.5)
        states = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            states.add(proc_state(pid))
            time.sleep(0.003)
        assert "T" not in states  # frozen, not job-control stopped
        (got,) = shares([pid], 5.0)
        assert abs(got - 30) <= 7, got
    # The slice ended with xpuctl: its cgroup is gone.
    wait_for(lambda: not (cgroup_root / slice_id).exists(), 5)


def test_a_cgroup_left_frozen_by_a_crash_is_thawed_at_start(
    agent_factory: Callable[..., AgentProcess], cgroup_root: Path, cpu_priority: None
) -> None:
    agent = agent_factory(
        config=f'[enforcement]\ncompute_policy = "hard"\ncgroup_root = "{cgroup_root}"\n'
    )
    with running(agent, "--memory", "256MiB", "--compute", "10", code=BUSY) as (_, pid):
        wait_for(lambda: cgroup_of(pid).startswith(f"/{cgroup_root.name}/"), 5)
        where = cgroup_root / cgroup_of(pid).rsplit("/", 1)[1]
        for _attempt in range(10):
            wait_for(lambda: frozen(where), 5, interval_s=0.002)
            agent.kill9()
            if frozen(where):
                break
            agent.start()
        else:
            pytest.fail("never caught the cgroup frozen")
        time.sleep(0.5)
        assert frozen(where)
        agent.config_path.write_text(agent.config_path.read_text().replace('"hard"', '"off"'))
        agent.start()
        assert not frozen(where)
        (ran,) = shares([pid], 1.0)
        assert ran > 50, ran
        (recovered,) = events(agent, "enforce.recovered")
        assert recovered["data"]["cgroups"] == [where.name]


def test_without_a_usable_cgroup_root_signals_are_used(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    missing = f"/nonexistent-{uuid.uuid4().hex[:6]}/xpu"
    agent = agent_factory(
        config=f'[enforcement]\ncompute_policy = "hard"\ncgroup_root = "{missing}"\n'
    )
    assert "cgroup_root unusable; using signals" in agent.log()
    with running(agent, "--memory", "256MiB", "--compute", "10", code=BUSY) as (_, pid):
        wait_for(lambda: proc_state(pid) == "T", 5, interval_s=0.002)


def test_host_limits_are_set_on_the_slice_cgroup(
    agent_factory: Callable[..., AgentProcess], cgroup_root: Path
) -> None:
    """A slice holding host CPU and memory runs in its cgroup with cpu.max and memory.max,
    where the tree has those controllers; elsewhere ``status`` says they are accounted only."""
    available = set((cgroup_root / "cgroup.controllers").read_text().split())
    agent = agent_factory(config=f'[enforcement]\ncgroup_root = "{cgroup_root}"\n')
    host = json_out(agent.xpuctl("--json", "status"))["host"]
    if not {"cpu", "memory"} <= available:
        assert host["enforced"] is False
        assert "lacks the" in host["limits"] and "controller" in host["limits"]
        pytest.skip(f"the cgroup v2 tree here has only {sorted(available)}: no cpu/memory")
    assert host["enforced"] is True
    args = ("--memory", "256MiB", "--compute", "10", "--cpus", "0.5", "--host-memory", "256MiB")
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(30)"
    with running(agent, *args, code=code) as (run, pid):
        wait_for(lambda: cgroup_of(pid) != cgroup_of(run.pid), 5)
        where = cgroup_root / cgroup_of(pid).rsplit("/", 1)[1]
        assert (where / "cpu.max").read_text().split() == ["50000", "100000"]
        assert int((where / "memory.max").read_text()) == 256 * 1024 * 1024
    wait_for(lambda: not where.exists(), 5)


# -- the ladder's strongest rung: the driver limits a slice's cgroup ---------------------


class _LimitingCards(Backend):
    """One NVIDIA card whose driver takes cgroup memory limits (and records them)."""

    name = "limits"

    def __init__(self, device: Device) -> None:
        self.device = device
        self.calls: list[tuple[str, str, int | None]] = []

    async def discover(self) -> Sequence[Device]:
        return [self.device]

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        return []

    async def set_memory_limit(
        self, device_id: str, namespace: str, mib: int | None
    ) -> DriverMemoryLimit:
        self.calls.append((device_id, namespace, mib))
        return DriverMemoryLimit(mib, 0)


async def test_a_kernel_limited_cards_slice_gets_its_cgroup_and_driver_limit(
    cgroup_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = Device("nvidia-GPU-1", "limits", Vendor.NVIDIA, "NVIDIA H100", 0, 81920, uuid="GPU-1")
    backend = _LimitingCards(gpu)
    config = config_mod.from_mapping(
        {
            "version": 1,
            "enforcement": {"cgroup_root": str(cgroup_root)},
            "paths": {"state_dir": str(tmp_path), "runtime_dir": str(tmp_path / "run")},
        }
    )
    inventory = Inventory([backend])
    await inventory.discover()
    service = NodeService(config, inventory, Ledger(tmp_path / "l.sqlite"), EventHub())
    await service.open()
    # This host's kernel has no dmem controller, so the probe refuses the rung (its
    # refusal is tested in tests/test_ladder.py): the rung is given, and the slice's cgroup
    # is made without enabling dmem. The rest — which slices, which cgroup, the limit
    # set, read back, recorded, cleared at the end — is the agent's own code.
    service.rungs[gpu.id] = ladder.Rung(ladder.NVML_LIMITS)
    monkeypatch.setattr(
        CgroupTree, "device_memory_cgroup", lambda self, slice_id: _mkdir(self.root / slice_id)
    )
    enforcer = Enforcer(service)
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        root = Caller(uid=0, gid=0, pid=os.getpid(), admin=True)
        made, _ = await service.allocate(
            root, SliceRequest(memory_mib=2048, compute_pct=10, owner_uid=0)
        )
        await enforcer.step({})
        assert backend.calls == []  # no process yet: nothing to limit
        await service.bind(root, made.id, sleeper.pid)
        await enforcer.step({})
        where = cgroup_root / made.id
        assert backend.calls == [(gpu.id, str(where), 2048)]
        assert str(sleeper.pid) in (where / "cgroup.procs").read_text().split()
        await enforcer.step({})
        assert len(backend.calls) == 1  # set once, not at every sample
        recorded = [e for e in await service.events() if e.kind == "enforce.driver_limit"]
        assert [(e.data["ok"], e.data["read_back_mib"]) for e in recorded] == [(True, 2048)]
        await service.release(root, made.id)
        await enforcer.step({})
        assert backend.calls[-1] == (gpu.id, str(where), None)  # cleared...
        assert not where.exists()  # ...and the cgroup gone with the slice
    finally:
        sleeper.kill()
        sleeper.wait()
        await service.close()


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path
