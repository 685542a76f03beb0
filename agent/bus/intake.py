"""The bus's incoming queue: lossless for retained state, bounded for everything else.

When an agent (re)subscribes, the broker sends every peer's retained ``status``,
``capacity`` and ``idle`` at once — 30,000 messages for a 10,000-node zone — faster than
the agent validates them. A plain bounded queue (aiomqtt's) then discards whatever does
not fit, and those peers stay incomplete until their next heartbeat. But for a retained
state topic only the newest value matters, so this queue keeps *one* entry per state
topic: a newer message replaces the one still waiting (and keeps its place in line). Its
size is bounded by the zone, not by the burst, and nothing a peer last said is lost.
Other messages (the RPC inbox, events) keep their order in a bounded FIFO that is served
first, so a borrow reply never waits behind a zone's worth of state.
"""

from __future__ import annotations

import asyncio
import collections
import time

import aiomqtt

from agent.bus.topics import STATE_KINDS

#: Requests, replies and events waiting at most; more are discarded (aiomqtt logs it).
FIFO_MAX = 10_000
#: Distinct state topics waiting at most (three per peer: 100,000 peers).
STATE_MAX = 300_000


_STATE = frozenset(kind.value for kind in STATE_KINDS)


def is_state(topic: str) -> bool:
    """``…/nodes/<node>/status|capacity|idle``: retained, only the newest value counts."""
    head, _, last = topic.rpartition("/")
    return last in _STATE and "/nodes/" in head


class IntakeStats:
    """Counts shared by every queue of one connection (aiomqtt makes one per session), and
    the queue of the current session, which the receiver drains in batches."""

    def __init__(self) -> None:
        self.coalesced = 0
        #: When the last message was put (monotonic; 0: never).
        self.last_put_at = 0.0
        self.current: Intake | None = None
        #: Set while nothing waits to be read.
        self.drained = asyncio.Event()
        self.drained.set()


class Intake(asyncio.Queue[aiomqtt.Message]):
    """``queue_type`` for :class:`aiomqtt.Client` (which calls ``put_nowait`` from its
    message callback and ``get`` from ``client.messages``). Built on asyncio.Queue's
    extension points (``_init``, ``_put``, ``_get``) and its size predicates. Make one
    subclass per connection with :func:`intake_type`, so that its counts are its own."""

    stats = IntakeStats()

    def _init(self, maxsize: int) -> None:
        self._fifo: collections.deque[aiomqtt.Message] = collections.deque()
        self._state: collections.OrderedDict[str, aiomqtt.Message] = collections.OrderedDict()
        self.stats.current = self
        self.stats.drained.set()  # a new session's queue: what the last one held is gone

    def put_nowait(self, item: aiomqtt.Message) -> None:
        topic = str(item.topic)
        if is_state(topic):
            if topic not in self._state and len(self._state) >= STATE_MAX:
                raise asyncio.QueueFull
        elif len(self._fifo) >= FIFO_MAX:
            raise asyncio.QueueFull
        super().put_nowait(item)

    def _put(self, item: aiomqtt.Message) -> None:
        self.stats.last_put_at = time.monotonic()
        self.stats.drained.clear()
        topic = str(item.topic)
        if is_state(topic):
            if topic in self._state:
                self.stats.coalesced += 1
            self._state[topic] = item
        else:
            self._fifo.append(item)

    def _get(self) -> aiomqtt.Message:
        item = self._fifo.popleft() if self._fifo else self._state.popitem(last=False)[1]
        if self.empty():
            self.stats.drained.set()
        return item

    def take(self, most: int) -> list[aiomqtt.Message]:
        """Up to ``most`` waiting messages at once, in the order :meth:`get` gives them
        (aiomqtt's iterator costs a task and a wait per message; a burst is read in
        batches instead)."""
        out: list[aiomqtt.Message] = []
        while len(out) < most and not self.empty():
            out.append(self.get_nowait())
        return out

    def qsize(self) -> int:
        return len(self._fifo) + len(self._state)

    def empty(self) -> bool:
        return not self._fifo and not self._state

    def full(self) -> bool:
        return False  # bounded per part, in put_nowait


def intake_type(stats: IntakeStats) -> type[Intake]:
    """An :class:`Intake` subclass counting into ``stats``."""
    return type("ConnectionIntake", (Intake,), {"stats": stats})
