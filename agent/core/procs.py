"""Process identity and inspection: (pid, start time) so a recycled pid is never mistaken."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from agent import processes
from agent.errors import NotFound
from agent.model import ProcessRef


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    ref: ProcessRef
    uid: int


def inspect(pid: int) -> ProcessInfo:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return ProcessInfo(ProcessRef(pid, proc.create_time()), proc.uids().real)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        raise NotFound(f"no process {pid}") from None
    except psutil.AccessDenied:
        raise NotFound(f"process {pid} cannot be inspected") from None


#: True when ``ref.pid`` is still the process that started at ``ref.start_time``.
still_same = processes.same
#: ``still_same``, and not a zombie.
running = processes.running


def slice_credentials(pid: int) -> tuple[str, str] | None:
    """The (XPU_SLICE_ID, XPU_SLICE_TOKEN) pair in a process's environment, if any."""
    try:
        env = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return None
    slice_id, token = env.get("XPU_SLICE_ID"), env.get("XPU_SLICE_TOKEN")
    if slice_id and token:
        return slice_id, token
    return None
