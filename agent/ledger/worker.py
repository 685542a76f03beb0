"""The ledger's one thread, with group commit.

Every ledger call runs on this thread (SQLite commits fsync; they must not run on the
event loop, and one thread serialises writers so that a placement decision and its insert
are atomic). Calls that queue up while a commit is in flight are run together in one
transaction, each inside its own SAVEPOINT so that one failing call does not undo the
others, and are answered only after that transaction's COMMIT: one fsync serves many
requests, and nothing is acknowledged before it is durable.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.ledger.store import Ledger

T = TypeVar("T")
MAX_BATCH = 128


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    result: Any = None
    error: BaseException | None = None


class LedgerWorker:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._thread.start()
        self.batches = 0
        self.calls = 0

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, future, loop))
        return future

    def close(self) -> None:
        """Finish queued calls, then stop the thread and close the ledger."""
        self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            calls = [first]
            while len(calls) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                calls.append(more)
            self._run_batch(calls)
        self._ledger.close()

    def _run_batch(self, calls: list[_Call]) -> None:
        try:
            with self._ledger.batch():
                for call in calls:
                    try:
                        with self._ledger.savepoint():
                            call.result = call.fn()
                    except Exception as exc:  # handed to the caller
                        call.error = exc
        except Exception as exc:  # the COMMIT failed: nobody succeeded
            for call in calls:
                if call.error is None:
                    call.error = exc
        self.batches += 1
        self.calls += len(calls)
        for call in calls:
            call.loop.call_soon_threadsafe(_settle, call)


def _settle(call: _Call) -> None:
    if call.future.cancelled():
        return
    if call.error is not None:
        call.future.set_exception(call.error)
    else:
        call.future.set_result(call.result)
