"""Process identity, read in one place: a process is its pid *and* its start time (as
psutil's ``create_time`` gives it), so that a recycled pid is never mistaken for the
process a slice, a binding or a lease was made for. Backends, the core and the enforcer
all ask here."""

from __future__ import annotations

import psutil

from agent.model import ProcessRef

#: Start times are compared within this (psutil derives them from clock ticks).
SAME_WITHIN_S = 0.01


def start_time(pid: int) -> float | None:
    """``pid``'s start time, ``None`` when there is no such process (or it cannot be read)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def same(ref: ProcessRef) -> bool:
    """Whether ``ref.pid`` is still the process that started at ``ref.start_time``."""
    started = start_time(ref.pid)
    return started is not None and abs(started - ref.start_time) < SAME_WITHIN_S


def running(ref: ProcessRef) -> bool:
    """:func:`same`, and not a zombie (exited, its parent has not reaped it yet)."""
    try:
        proc = psutil.Process(ref.pid)
        with proc.oneshot():
            alike = abs(proc.create_time() - ref.start_time) < SAME_WITHIN_S
            return alike and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False
