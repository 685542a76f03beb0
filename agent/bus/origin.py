"""Who this agent is on the bus: node name, boot id and the per-boot sequence."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any


class Origin:
    """Stamps every payload this agent sends. ``seq`` is one counter for all topics,
    monotonic for the life of the process (a restart is a new ``boot_id``)."""

    def __init__(self, node: str, wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.boot_id = uuid.uuid4().hex
        self.wall = wall
        self.since = wall()
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def stamp(self, seq: int | None = None) -> dict[str, Any]:
        """The envelope fields of a new payload (a fresh seq unless one is given)."""
        return {
            "node": self.node,
            "boot_id": self.boot_id,
            "seq": self.next_seq() if seq is None else seq,
            "ts": self.wall(),
        }
