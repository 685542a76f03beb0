"""The lender's inbox: fair to every requester, its own decisions first."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.bus import payloads
from agent.model import Slice

#: Requests waiting for the lender task; more are dropped (and counted).
INBOX_MAX = 256


@dataclass(frozen=True, slots=True)
class Job:
    request: payloads.AnyRequest
    reply_to: str
    correlation: bytes


@dataclass(frozen=True, slots=True)
class Reclaim:
    """The borrower went away: its leases are kept ``pool.borrower_grace_s`` at most."""

    borrower: str
    why: str


@dataclass(frozen=True, slots=True)
class Ended:
    """A lent slice ended without the borrower's word: tell the borrower why."""

    slice: Slice


Urgent = Reclaim | Ended


#: Requests one requester may have waiting in a lender's inbox; more are dropped.
PER_REQUESTER_MAX = 16
#: Requests one requester may have answered per second (a token bucket of
#: PER_REQUESTER_MAX): a lender that refuses as fast as a flood arrives must still not queue
#: thousands of replies ahead of a real peer's.
PER_REQUESTER_RATE = 20.0


class FairInbox:
    """The lender's inbox: one bounded queue per requester, served round-robin, and a
    per-requester rate (a token bucket), so that a node sending thousands of requests delays
    only itself — also when the lender refuses them as fast as they come, which would
    otherwise queue thousands of replies ahead of a real peer's; reclaims (the lender's own
    decisions) go first."""

    def __init__(
        self,
        per_requester: int = PER_REQUESTER_MAX,
        total: int = INBOX_MAX,
        rate_per_s: float = PER_REQUESTER_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per = per_requester
        self._total = total
        self._rate = rate_per_s
        self._clock = clock
        #: requester -> (tokens, when last refilled)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._queues: dict[str, collections.deque[Job]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self._urgent: collections.deque[Urgent] = collections.deque()
        self._ready = asyncio.Event()
        self._size = 0

    def put(self, requester: str, item: Job | Urgent) -> bool:
        if isinstance(item, Reclaim | Ended):
            self._urgent.append(item)
            self._ready.set()
            return True
        queue = self._queues.get(requester)
        if self._size >= self._total or (queue is not None and len(queue) >= self._per):
            return False
        now = self._clock()
        tokens, then = self._buckets.get(requester, (float(self._per), now))
        tokens = min(float(self._per), tokens + (now - then) * self._rate)
        if tokens < 1.0:
            self._buckets[requester] = (tokens, now)
            return False
        self._buckets[requester] = (tokens - 1.0, now)
        if len(self._buckets) > 4 * self._total:  # forget requesters with full buckets
            full = [r for r, (t, _) in self._buckets.items() if t >= self._per - 1]
            for r in full:
                del self._buckets[r]
        if queue is None:
            queue = self._queues[requester] = collections.deque()
            self._turns.append(requester)
        queue.append(item)
        self._size += 1
        self._ready.set()
        return True

    async def get(self) -> Job | Urgent:
        while not self._urgent and not self._turns:
            self._ready.clear()
            await self._ready.wait()
        if self._urgent:
            return self._urgent.popleft()
        requester = self._turns.popleft()
        queue = self._queues[requester]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._turns.append(requester)  # back of the line: the others go first
        else:
            del self._queues[requester]
        return item
