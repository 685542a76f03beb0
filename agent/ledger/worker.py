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

from agent.errors import XpuError
from agent.ledger.store import Ledger, storage_error

T = TypeVar("T")
MAX_BATCH = 128


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    result: Any = None
    error: BaseException | None = None
    #: A write probe: its commit proves the ledger writable again.
    probe: bool = False


class LedgerWorker:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._thread.start()
        self.batches = 0
        self.calls = 0
        #: Why the last commit failed for want of storage (None: the last one went through).
        #: Read on the loop; written only by this thread (a str swap is atomic).
        self.unwritable: str | None = (
            f"opened without shared memory: {ledger.exclusive_because}"
            if ledger.exclusive_because
            else None
        )

    def submit(self, fn: Callable[[], T], probe: bool = False) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, future, loop, probe=probe))
        return future

    def probe(self) -> asyncio.Future[None]:
        """A tiny durable write; when it commits, :attr:`unwritable` is cleared."""
        return self.submit(self._ledger.probe_write, probe=True)

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
        proven = False
        try:
            with self._ledger.batch():
                for call in calls:
                    try:
                        with self._ledger.savepoint():
                            call.result = call.fn()
                    except Exception as exc:  # handed to the caller
                        call.error = self._caller_error(exc)
            proven = any(c.probe and c.error is None for c in calls)
        except Exception as exc:  # the COMMIT failed: nobody succeeded
            error = self._caller_error(exc)
            for call in calls:
                if call.error is None:
                    call.error = error
        if proven:
            self.unwritable = None
        self.batches += 1
        self.calls += len(calls)
        for call in calls:
            call.loop.call_soon_threadsafe(_settle, call)

    def _caller_error(self, exc: Exception) -> Exception:
        """SQLite's storage failures as the caller's error (507/503); noted for health."""
        translated: XpuError | None = storage_error(exc)
        if translated is None:
            return exc
        self.unwritable = translated.detail
        return translated


def _settle(call: _Call) -> None:
    if call.future.cancelled():
        return
    if call.error is not None:
        call.future.set_exception(call.error)
    else:
        call.future.set_result(call.result)
