"""Process-level memory policy: large transient buffers go back to the OS.

Peers can send the agent MQTT packets up to the broker's ``max_packet_size`` (it drops
the oversized ones itself, see agent.bus.connection). glibc serves such buffers with
``mmap`` at first, but its *dynamic* threshold rises after each free to the largest size
freed, after which 700 KB buffers come from the heap and fragment it: 11,000 adversarial
messages grew the agent from 52 to 452 MiB RSS, most of it freed but not returned. A fixed
threshold (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_`` sets) keeps every
buffer over 128 KiB in its own mapping, returned on free.

The cyclic garbage collector walks every tracked object in a full collection: a pool of
10,000 peers is ~250,000 long-lived objects, ~50-100 ms of the loop per full collection on
a small host, and CPython's default runs one every ten collections of the middle
generation. :func:`collect_less_often` makes that every hundred; cycles are still collected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import structlog

log = structlog.get_logger(__name__)

#: Collections of the middle generation between full collections (CPython's default: 10).
FULL_COLLECTION_EVERY = 100
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold; False (and nothing changed) where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused; keeping glibc's default memory policy")
    return ok


def collect_less_often() -> None:
    """Full garbage collections ten times rarer than CPython's default (see above)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
