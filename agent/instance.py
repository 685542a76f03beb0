"""One agent per state directory and per socket.

Two agents on one ledger would both enforce, both lend and both answer on the socket. The
guard is an exclusive ``flock`` on the state directory itself (no file to create, so it
also works on a full disk), held for the life of the process and released by the kernel
when it dies (``kill -9`` included). A socket path that still answers belongs to a live
agent and is never unlinked from under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from agent.errors import AlreadyRunning


class StateLock:
    """Holds ``flock(LOCK_EX)`` on a directory until :meth:`release` (or exit)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.path = state_dir
        self._fd: int | None = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise AlreadyRunning(
                f"another xpu-agent is running on state directory {state_dir} "
                "(one agent per node; to check a config file: xpu-agent check-config FILE)"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_live_socket(path: Path, timeout_s: float = 1.0) -> None:
    """Raise if something accepts connections on ``path``; a stale socket file is fine."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout_s)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return  # nobody listens: a leftover from a crash
    except OSError:
        return  # not a socket, or not ours to test: unlinking decides
    finally:
        with contextlib.suppress(OSError):
            probe.close()
    raise AlreadyRunning(f"{path} is served by another process; refusing to replace it")
