"""Admission for the API socket: a cap on connections in total and per peer uid.

Any member of the socket's group can open connections and hold them idle; without a cap,
about a thousand of them exhaust the agent's file descriptors and with them the sampler
(``/proc``), the ledger and every other client. So the agent accepts connections itself,
a few per wake-up (asyncio's own server accepts up to ``backlog`` at once, which alone can
exhaust a 1,024-fd limit before any protocol runs), reads the peer's uid with
``SO_PEERCRED`` and closes a connection over its uid's share or over the total at once
(counted, logged with a rate limit) before aiohttp reads a byte. The total is kept below
``RLIMIT_NOFILE`` minus a reserve, so the agent's own work always has descriptors; when
``accept`` fails anyway (``EMFILE``), accepting pauses for a second instead of spinning.
Slow or idle connections that *are* admitted are closed by aiohttp's keep-alive timer
(``api.header_timeout_s``), which also runs before the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from agent.api.peercred import peer_credentials

log = structlog.get_logger(__name__)

#: File descriptors kept for everything but API connections (ledger, /proc, NVML, MQTT).
FD_RESERVE = 256


def fd_budget(wanted: int, reserve: int = FD_RESERVE) -> int:
    """``wanted``, or fewer when the soft ``RLIMIT_NOFILE`` leaves less after ``reserve``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - reserve))


#: Connections accepted per wake-up of the listening socket.
ACCEPT_BATCH = 16
#: Seconds accepting pauses after accept() itself failed (out of descriptors).
ACCEPT_RETRY_S = 1.0


@dataclass
class ConnectionGate:
    """Counts open API connections by peer uid; says which may be served."""

    total: int
    per_uid: int
    open_by_uid: dict[int, int] = field(default_factory=dict)
    refused: int = 0

    @property
    def open(self) -> int:
        return sum(self.open_by_uid.values())

    def admit(self, uid: int) -> bool:
        total = fd_budget(self.total)  # the limit may change under us (prlimit)
        if self.open >= total or self.open_by_uid.get(uid, 0) >= self.per_uid:
            self.refused += 1
            return False
        self.open_by_uid[uid] = self.open_by_uid.get(uid, 0) + 1
        return True

    def release(self, uid: int) -> None:
        left = self.open_by_uid.get(uid, 0) - 1
        if left > 0:
            self.open_by_uid[uid] = left
        else:
            self.open_by_uid.pop(uid, None)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for an admitted connection, which gives its place back on close."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate, uid: int) -> None:
        self._inner = inner
        self._gate = gate
        self._uid: int | None = uid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def forget(self) -> None:
        """The connection never started: give its place back."""
        if self._uid is not None:
            self._gate.release(self._uid)
            self._uid = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._uid is not None:
            self._gate.release(self._uid)
            self._uid = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GatedListener:
    """Accepts on a listening Unix socket through a :class:`ConnectionGate` and hands each
    admitted connection to ``factory``'s protocol (``loop.connect_accepted_socket``)."""

    def __init__(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], gate: ConnectionGate
    ) -> None:
        self._sock = sock
        self._factory = factory
        self.gate = gate
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[object]] = set()
        self._paused: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off, do not spin
                log.error("API accept failed; pausing", error=str(exc), retry_s=ACCEPT_RETRY_S)
                self._loop.remove_reader(self._sock.fileno())
                self._paused = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            self._admit(conn)

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket) -> None:
        uid = -1
        with contextlib.suppress(OSError):
            uid = peer_credentials(conn).uid
        if not self.gate.admit(uid):
            log.warning(
                "API connection refused: over the cap",
                uid=uid,
                open=self.gate.open,
                total_cap=fd_budget(self.gate.total),
                per_uid_cap=self.gate.per_uid,
            )
            conn.close()
            return
        conn.setblocking(False)
        protocol = _Counted(self._factory(), self.gate, uid)
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: protocol, sock=conn)
        )
        self._tasks.add(task)

        def started(done: asyncio.Task[object]) -> None:
            self._tasks.discard(done)
            if done.cancelled() or done.exception() is not None:
                protocol.forget()
                with contextlib.suppress(OSError):
                    conn.close()
                if not done.cancelled():
                    log.warning("API connection could not start", error=str(done.exception()))

        task.add_done_callback(started)

    def close(self) -> None:
        """Stop accepting (open connections are aiohttp's to finish)."""
        if self._paused is not None:
            self._paused.cancel()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
