"""Process-level memory policy: large transient buffers go back to the OS.

Peers can send the agent MQTT packets up to the broker's ``max_packet_size`` (it drops
the oversized ones itself, see agent.bus.connection). glibc serves such buffers with
``mmap`` at first, but its *dynamic* threshold rises after each free to the largest size
freed, after which 700 KB buffers come from the heap and fragment it: 11,000 adversarial
messages grew the agent from 52 to 452 MiB RSS, most of it freed but not returned. A fixed
threshold (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_`` sets) keeps every
buffer over 128 KiB in its own mapping, returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger(__name__)

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
