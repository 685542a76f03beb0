"""A child that is bound to its slice before it runs: ``xpuctl run`` forks it, binds its
pid, and only then lets it exec the command — no instruction of the command runs
unbound (and so unenforced, or unkillable with its lease).

``subprocess.Popen`` cannot do this: it waits in its constructor until the child has
exec'd, so a child held before exec would hold the parent too.
"""

from __future__ import annotations

import contextlib
import os
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

    def poll(self) -> int | None:
        """The exit code (``-N`` for signal N) once the child is gone, else ``None``."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

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
        return self.status

    def signal(self, signum: int) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
