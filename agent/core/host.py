"""Host CPU and memory for slices: how much there is, and whether limits can be enforced.

A slice may hold host CPU (milli-CPUs) and memory besides its card share. They are always
accounted against the node's capacity less the system reserve (``[host]``); they are
*enforced* only where the agent owns a delegated cgroup v2 tree
(``enforcement.cgroup_root``) whose parent grants it the ``cpu`` and ``memory`` controllers:
each such slice's cgroup then carries ``cpu.max`` and ``memory.max``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.config import Config
from agent.ledger.store import HostCapacity
from agent.units import parse_size_mib

#: The controllers host limits need in the delegated tree.
CONTROLLERS = ("cpu", "memory")


@dataclass(frozen=True, slots=True)
class HostLimits:
    enforced: bool
    why: str


def host_capacity(config: Config) -> HostCapacity:
    """Host CPU and memory slices may hold: the node's (``host.cpus`` / ``host.memory``, else
    detected) less ``host.reserved_cpus`` / ``host.reserved_memory``."""
    host = config.host
    cpus = host.cpus or os.cpu_count() or 1
    memory = (
        parse_size_mib(host.memory)
        if host.memory != ""
        else psutil.virtual_memory().total // (1024 * 1024)
    )
    reserved = 0 if host.reserved_memory in ("", 0, "0") else parse_size_mib(host.reserved_memory)
    return HostCapacity(
        max(0, round((cpus - host.reserved_cpus) * 1000)), max(0, memory - reserved)
    )


def host_limits(cgroup_root: str) -> HostLimits:
    """Whether slices' host CPU and memory can be enforced here, and why (not)."""
    if not cgroup_root:
        return HostLimits(False, "accounted only: no enforcement.cgroup_root")
    root = Path(cgroup_root)
    try:
        available = set((root / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return HostLimits(
            False, f"accounted only: {root} is not a cgroup v2 directory ({exc.strerror})"
        )
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return HostLimits(
            False,
            f"accounted only: {root} lacks the {' and '.join(missing)} controller(s)"
            " (delegate them to the agent: Delegate=cpu memory)",
        )
    if not os.access(root / "cgroup.subtree_control", os.W_OK):
        return HostLimits(False, f"accounted only: {root} is not writable by the agent")
    return HostLimits(True, f"enforced: cpu.max and memory.max under {root}")
