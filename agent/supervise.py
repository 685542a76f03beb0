"""Named background tasks that restart with jittered exponential backoff.

A failing subsystem is logged and restarted; it never takes the API (or the other
subsystems) down with it. Cancellation passes straight through.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


async def supervised(
    name: str,
    factory: Callable[[], Awaitable[None]],
    restarts: dict[str, int] | None = None,
) -> None:
    delay = BACKOFF_MIN_S
    while True:
        started = time.monotonic()
        try:
            await factory()
            log.debug("task finished", task=name)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task failed; restarting", task=name, retry_in_s=round(delay, 2))
        if restarts is not None:
            restarts[name] = restarts.get(name, 0) + 1
        if time.monotonic() - started > HEALTHY_AFTER_S:
            delay = BACKOFF_MIN_S
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, BACKOFF_MAX_S)


async def every(interval_s: float, step: Callable[[], Awaitable[object]]) -> None:
    """Run ``step`` on a fixed cadence (no drift; a slow step skips missed ticks)."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await step()
        next_at += interval_s
        now = loop.time()
        if next_at < now:
            next_at = now + interval_s
        await asyncio.sleep(next_at - now)
