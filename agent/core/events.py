"""Fan-out of events to live followers (``/v1/events?follow=1``, the MQTT bus).

Events are first written to the ledger (durable); this hub only delivers them to whoever
is listening now. A follower that does not keep up loses events, never the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

from agent.model import Event

FOLLOWER_QUEUE = 1000


class EventHub:
    def __init__(self) -> None:
        self._followers: set[asyncio.Queue[Event]] = set()
        self.dropped = 0

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            for queue in self._followers:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    self.dropped += 1

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(FOLLOWER_QUEUE)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)
