"""Which slice a sampled process belongs to: one rule for the usage figures and the enforcer.

A process belongs to a slice when its pid is bound to the slice *and* its start time is the
one recorded at binding: a recycled pid is another process, hence unsliced. A backend that
reports no start time (a fake, an old driver) is trusted on the pid alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.model import DeviceSample, ProcessRef, ProcessUsage, Slice

#: Start times are read from /proc in clock ticks: equal within this many seconds.
START_TIME_TOLERANCE_S = 0.01


@dataclass(frozen=True, slots=True)
class Matched:
    """One sampled process and the slice it belongs to (None: unsliced), with the binding."""

    process: ProcessUsage
    slice: Slice | None
    ref: ProcessRef | None


def same_process(ref: ProcessRef, start_time: float | None) -> bool:
    return start_time is None or abs(start_time - ref.start_time) < START_TIME_TOLERANCE_S


def match(
    slices: Iterable[Slice], samples: Mapping[str, DeviceSample]
) -> dict[str, tuple[Matched, ...]]:
    """Every sampled process of every card, matched to its slice."""
    owner: dict[int, tuple[Slice, ProcessRef]] = {}
    for s in slices:
        for ref in s.processes:
            owner[ref.pid] = (s, ref)
    out: dict[str, tuple[Matched, ...]] = {}
    for device_id, sample in samples.items():
        found = []
        for proc in sample.processes:
            bound = owner.get(proc.pid)
            if bound is not None and same_process(bound[1], proc.start_time):
                found.append(Matched(proc, bound[0], bound[1]))
            else:
                found.append(Matched(proc, None, None))
        out[device_id] = tuple(found)
    return out
