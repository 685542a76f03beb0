"""structlog set-up: console on a terminal, JSON lines otherwise, journald-friendly.

Under journald (``$JOURNAL_STREAM`` matches stderr) lines carry no timestamp (the journal
has one) and a ``<N>`` syslog priority prefix. Third-party stdlib logging goes through the
same renderer.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def under_journald() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _priority_prefix(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["_prio"] = _PRIORITY.get(method if method != "exception" else "error", 6)
    return event


class _JournalRenderer:
    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        prio = event.pop("_prio", 6)
        rendered = self._json(logger, method, event)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return f"<{prio}>{text}"


class RateLimit(logging.Filter):
    """At most ``burst`` warnings or errors per message per ``every_s``; the next one that
    passes says how many were suppressed. Every error path of the agent — a malformed HTTP
    request, a failing accept(), a tool that fails every sample — goes through the root
    handler, so none of them can flood the journal however often it fires. Info and debug
    records pass untouched."""

    def __init__(
        self, every_s: float = 10.0, burst: int = 5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self.burst = burst
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple[str, str]:
        msg = record.msg
        text = msg.get("event", "") if isinstance(msg, dict) else msg
        return record.name, str(text)[:200]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = self._key(record)
        now = self._clock()
        start, passed, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.every_s:
            start, passed = now, 0
        if passed >= self.burst:
            self._windows[key] = (start, passed, suppressed + 1)
            return False
        self._windows[key] = (start, passed + 1, 0)
        if suppressed:
            if isinstance(record.msg, dict):
                record.msg = {**record.msg, "suppressed": suppressed}
            else:
                record.msg = f"{record.msg} (suppressed {suppressed} similar)"
        if len(self._windows) > 10_000:  # bounded: forget the oldest windows
            for old in sorted(self._windows, key=lambda k: self._windows[k][0])[:5_000]:
                del self._windows[old]
        return True


class ClientFault(logging.Filter):
    """aiohttp logs a malformed request (bad header, bad request line) as an error with a
    traceback; it is the client's fault, not ours: one warning line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("aiohttp.http_exceptions"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"malformed HTTP request: {' '.join(str(exc).split())[:200]}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure(level: str = "info") -> None:
    journald = under_journald()
    tty = sys.stderr.isatty() and not journald
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    if not journald:
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: Any
    if journald:
        shared.append(_priority_prefix)
        renderer = _JournalRenderer()
    elif tty:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientFault())
