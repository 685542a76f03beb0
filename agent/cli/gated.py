"""A child that is bound to its slice before it runs: ``xpuctl run`` forks it, binds its
pid, and only then lets it exec the command — no instruction of the command runs
unbound (and so unenforced, or unkillable with its lease).

``subprocess.Popen`` cannot do this: it waits in its constructor until the child has
exec'd, so a child held before exec would hold the parent too.

The child leads its own process group (the enforcer stops and continues the group, never
``xpuctl``). Run from a terminal's foreground, that group is given the terminal — as a
shell does for a job — so that an interactive command can read it and Ctrl-C reaches it;
the terminal comes back to ``xpuctl``'s group when the command ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

#: The child's exit status when it was never let go (its binding failed).
CANCELLED = 126
#: The child's exit status when exec failed (after writing errno to the parent).
NOT_STARTED = 127


class GatedChild:
    """Forked at once (in its own process group), exec'd at :meth:`release`."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: wait for the word, then become the command
            code = NOT_STARTED
            try:
                os.close(go_w)
                os.close(err_r)
                os.setpgid(0, 0)  # the enforcer stops/continues the group, not xpuctl
                if not os.read(go_r, 1):
                    code = CANCELLED
                    raise SystemExit
                os.close(go_r)
                if cwd:
                    os.chdir(cwd)
                os.execvpe(cmd[0], list(cmd), dict(env))  # noqa: S606 - argv, no shell
            except OSError as exc:
                os.write(err_w, f"{exc.errno}:{exc.filename or ''}".encode())
            except BaseException:  # noqa: S110 - nothing may escape a forked child
                pass
            os._exit(code)
        os.close(go_r)
        os.close(err_w)
        self.pid = pid
        self._go: int | None = go_w
        self._err = err_r
        self.status: int | None = None
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also here: the group exists before the terminal moves
        self._tty = _foreground_terminal()
        if self._tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(self._tty, pid)

    def release(self) -> OSError | None:
        """Let the child exec; the error when it could not (it has exited then)."""
        assert self._go is not None
        os.write(self._go, b"1")
        os.close(self._go)
        self._go = None
        data = os.read(self._err, 4096)  # EOF when exec succeeded (the pipe is CLOEXEC)
        os.close(self._err)
        if not data:
            return None
        self.wait()
        errno_text, _, name = data.decode(errors="replace").partition(":")
        errno = int(errno_text) if errno_text.isdigit() else 0
        return OSError(errno, os.strerror(errno), name or None)

    def cancel(self) -> None:
        """The child exits without running anything."""
        if self._go is not None:
            os.close(self._go)
            self._go = None
            os.close(self._err)
        self.wait()

    def wait(self) -> int:
        while self.status is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except ChildProcessError:
                self.status = 0
                break
            self.status = os.waitstatus_to_exitcode(status)
        self._take_terminal_back()
        return self.status

    def _take_terminal_back(self) -> None:
        if self._tty is None:
            return
        tty, self._tty = self._tty, None
        # From a background group tcsetpgrp raises SIGTTOU: ignore it for the call.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(tty, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, previous)

    def signal(self, signum: int) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def _foreground_terminal() -> int | None:
    """stdin's terminal when ``xpuctl`` runs in its foreground (else ``None``)."""
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except (OSError, ValueError, AttributeError):
        pass
    return None
