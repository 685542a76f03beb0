"""The enforcement ladder: which mechanism holds each card's slices to their memory.

Strongest first (issue #14, docs/enforcement.md): ``nvml-limits`` — the driver fails an
allocation beyond the slice, per cgroup (``nvmlDeviceSetMemoryLimits_v1`` over the kernel's
``dmem`` controller); ``mps`` — an MPS control daemon the operator runs, which caps each
client by the slice environment's limits; ``hami-core`` — the ``LD_PRELOAD`` hook the
operator configured; ``sampling`` — the agent's own enforcement after the fact
(``term``/``kill``), always on as the backstop under every rung. A card gets the strongest
rung that is allowed (``enforcement.nvidia.rungs``) and whose probe succeeded; the stronger
ones are reported with the reason they were refused. Only NVIDIA cards have rungs above
``sampling``.

MPS is ``external`` (the operator runs the control daemon) or ``managed``
(:mod:`agent.enforce.mps` runs one per card).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends.base import Backend
from agent.config import Config
from agent.model import Device, Vendor

RUNGS = ("nvml-limits", "mps", "hami-core", "sampling")
NVML_LIMITS, MPS, HAMI_CORE, SAMPLING = RUNGS


@dataclass(frozen=True, slots=True)
class Rung:
    """The rung holding a card, and why each stronger one was refused."""

    name: str
    refused: Mapping[str, str] = field(default_factory=dict)


def choose(refused: Mapping[str, str]) -> Rung:
    """The strongest rung not refused (``sampling`` cannot be)."""
    for index, name in enumerate(RUNGS):
        if name not in refused or name == SAMPLING:
            return Rung(name, {r: refused[r] for r in RUNGS[:index]})
    raise AssertionError("unreachable: sampling is never refused")


def dmem_refused(cgroup_root: str) -> str | None:
    """Why the delegated cgroup tree cannot carry device-memory limits (``None``: it can)."""
    if not cgroup_root:
        return "no delegated cgroup tree (enforcement.cgroup_root is empty)"
    try:
        controllers = (Path(cgroup_root) / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"cannot read {cgroup_root}/cgroup.controllers: {exc.strerror}"
    if "dmem" not in controllers:
        return f"no dmem controller in {cgroup_root} (Linux 6.14 or later, delegated)"
    return None


def mps_pipe_dir(runtime_dir: str | Path, device_id: str) -> Path:
    """Where the agent-managed MPS daemon of ``device_id`` listens (its clients connect
    there: ``CUDA_MPS_PIPE_DIRECTORY``); its log directory is beside it."""
    return Path(runtime_dir) / "mps" / device_id / "pipe"


def mps_refused(config: Config) -> str | None:
    nvidia = config.enforcement.nvidia
    if nvidia.mps == "off":
        return "enforcement.nvidia.mps is off"
    if nvidia.mps == "managed":
        if shutil.which("nvidia-cuda-mps-control") is None:
            return "nvidia-cuda-mps-control is not on PATH"
        return None
    control = Path(nvidia.mps_pipe_directory) / "control"
    if not control.exists():
        return f"no MPS control daemon at {nvidia.mps_pipe_directory}"
    return None


def hami_refused(config: Config) -> str | None:
    path = config.enforcement.nvidia.hami_core
    if not path:
        return "enforcement.nvidia.hami_core is not set"
    if not Path(path).is_file():
        return f"{path} does not exist"
    return None


async def probe(device: Device, backend: Backend | None, config: Config) -> Rung:
    """Probe what ``device`` and its driver support, and choose its rung."""
    if device.vendor is not Vendor.NVIDIA:
        return Rung(SAMPLING)
    allowed = set(config.enforcement.nvidia.rungs)
    refused: dict[str, str] = {
        r: "not in enforcement.nvidia.rungs" for r in RUNGS if r not in allowed and r != SAMPLING
    }
    if NVML_LIMITS not in refused:
        if device.hardware_partitions:
            refused[NVML_LIMITS] = "MIG mode: memory limits do not apply to MIG devices"
        else:
            why = dmem_refused(config.enforcement.cgroup_root)
            if why is None and backend is not None:
                why = await backend.memory_limits_refused(device.id, config.enforcement.cgroup_root)
            if why is not None:
                refused[NVML_LIMITS] = why
    if MPS not in refused and (why := mps_refused(config)) is not None:
        refused[MPS] = why
    if HAMI_CORE not in refused and (why := hami_refused(config)) is not None:
        refused[HAMI_CORE] = why
    return choose(refused)
