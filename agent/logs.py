"""structlog set-up: console on a terminal, JSON lines otherwise, journald-friendly.

Under journald (``$JOURNAL_STREAM`` matches stderr) lines carry no timestamp (the journal
has one) and a ``<N>`` syslog priority prefix. Third-party stdlib logging goes through the
same renderer.
"""

from __future__ import annotations

import logging
import os
import sys
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
