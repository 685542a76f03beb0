"""Everything received from the bus is untrusted: size-capped, validated, counted.

A bad message is dropped, counted by reason, and logged with a rate limit (one warning per
reason per window, with how many were suppressed) — never a crash, never a flood.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Why a message was dropped (the keys of :attr:`Guard.dropped`).
OVERSIZED = "oversized"
MALFORMED = "malformed"
SPOOFED = "spoofed"
STALE = "stale"
UNEXPECTED = "unexpected"
OVERLOADED = "overloaded"
REASONS = (OVERSIZED, MALFORMED, SPOOFED, STALE, UNEXPECTED, OVERLOADED)

WARN_EVERY_S = 10.0


class Guard:
    def __init__(
        self,
        max_payload_bytes: int,
        warn_every_s: float = WARN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.warn_every_s = warn_every_s
        self._clock = clock
        self.dropped: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._warned_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def drop(self, reason: str, topic: str, detail: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        now = self._clock()
        last = self._warned_at.get(reason)
        if last is not None and now - last < self.warn_every_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._warned_at[reason] = now
        log.warning(
            "dropped mqtt message",
            reason=reason,
            topic=topic,
            detail=detail[:200],
            suppressed=self._suppressed.pop(reason, 0),
            total=self.dropped[reason],
        )

    def decode(self, raw: bytes, kind: Any, topic: str) -> Any:
        """``raw`` as ``kind`` (a struct or a tagged union), or ``None`` (dropped)."""
        if len(raw) > self.max_payload_bytes:
            self.drop(OVERSIZED, topic, f"{len(raw)} bytes > {self.max_payload_bytes}")
            return None
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.drop(MALFORMED, topic, str(exc))
            return None
        except RecursionError:
            self.drop(MALFORMED, topic, "nested too deeply")
            return None
