"""Which processes the enforcer may have left stopped, kept where it can always be written.

A process is recorded *before* it can first be stopped and forgotten only after it has
been resumed for good, so that whatever ends the agent, the next start resumes it. That
record must never depend on the ledger's disk: a full disk would otherwise stop
enforcement (no record, no throttling) or leave processes stopped for ever. It lives in
the runtime directory (``/run/xpu-agent``, a tmpfs that the agent owns and that lasts as
long as the processes it names: until reboot), written atomically (a temporary file,
fsync, rename) so that a crash at any instant leaves the old or the new list.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from agent.model import ProcessRef

FILE_NAME = "stopped.json"


class StoppedRecord:
    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / FILE_NAME
        self._entries: dict[tuple[int, float], str | None] = {}
        self._loaded = False

    def load(self) -> list[tuple[ProcessRef, str | None]]:
        """What a previous run left (an unreadable file is treated as empty, and said)."""
        self._entries = {}
        try:
            rows = json.loads(self.path.read_text())
        except FileNotFoundError:
            rows = []
        except (OSError, ValueError):
            rows = []
        for row in rows if isinstance(rows, list) else []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                key = (int(row["pid"]), float(row["start_time"]))
                self._entries[key] = row.get("slice_id")
        self._loaded = True
        return [(ProcessRef(pid, t), slice_id) for (pid, t), slice_id in self._entries.items()]

    def mark(self, ref: ProcessRef, slice_id: str | None, stopped: bool) -> None:
        if not self._loaded:
            self.load()
        key = (ref.pid, ref.start_time)
        if stopped:
            self._entries[key] = slice_id
        elif key in self._entries:
            del self._entries[key]
        else:
            return
        self._write()

    def add(self, rows: list[tuple[ProcessRef, str | None]]) -> None:
        """Record several processes at once (one write)."""
        if not self._loaded:
            self.load()
        for ref, slice_id in rows:
            self._entries[(ref.pid, ref.start_time)] = slice_id
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        rows = [
            {"pid": pid, "start_time": start, "slice_id": slice_id}
            for (pid, start), slice_id in sorted(self._entries.items())
        ]
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(rows).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
