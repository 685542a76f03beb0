"""The daemon's memory policy, on real allocations in a child process (its own heap)."""

from __future__ import annotations

import json
import subprocess

from tests.harness import PY

CHILD = """
import json, os, psutil
from agent.memory import trim
process = psutil.Process()
blocks = [bytes(2000) + os.urandom(8) for _ in range(100_000)]  # ~200 MB, malloc'd
pinned = blocks[::50]  # what stays alive keeps the freed pages between them in the heap
before = process.memory_info().rss
del blocks
freed = process.memory_info().rss
trimmed = trim()
after = process.memory_info().rss
print(json.dumps({"before": before, "freed": freed, "after": after, "trimmed": trimmed}))
"""


def test_trim_gives_freed_heap_pages_back() -> None:
    """A burst of messages read and dropped leaves its freed pages in the heap (RSS stays
    up) until the agent's periodic ``trim`` returns them."""
    out = subprocess.run([PY, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    mib = 2**20
    assert got["before"] > 150 * mib
    assert got["freed"] > got["before"] - 50 * mib  # free alone returns little
    assert got["trimmed"] is True
    assert got["after"] < got["freed"] - 100 * mib, got
