"""HTTP over the agent's Unix socket with the standard library's ``http.client``.

``xpuctl`` must start fast (``aiohttp`` alone costs ~0.2 s to import), so the client uses
``http.client`` — a real HTTP implementation, only connected to an ``AF_UNIX`` socket —
and maps every problem document to one exception carrying the server's words.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
from collections.abc import Iterator

# Not ``typing`` itself: its import alone costs ~3 ms of xpuctl's start-up (mypy reads
# ``TYPE_CHECKING`` as true by name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


DEFAULT_SOCKET = "/run/xpu-agent/agent.sock"
DEV_SOCKET = ".run/agent.sock"
#: Where the packaged ``xpu-agent.socket`` unit listens (outside RuntimeDirectory=).
ACTIVATED_SOCKET = "/run/xpu-agent.sock"
DEFAULT_CONFIG = "/etc/xpu-agent/agent.toml"


class ClientError(Exception):
    """Base of the client's errors; ``exit_code`` is what ``xpuctl`` exits with."""

    exit_code = 1


class AgentUnavailable(ClientError):
    pass


class ApiError(ClientError):
    """The agent answered with a problem document."""

    _CODES = {400: 2, 403: 3, 404: 4, 409: 5, 413: 2}

    def __init__(self, status: int, title: str, detail: str, extra: dict[str, Any]) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra
        self.exit_code = self._CODES.get(status, 1)


class BadRequest(ApiError):
    """400/413: the request was malformed or too large (exit code 2)."""


class NotAllowed(ApiError):
    """403: the caller may not do this (exit code 3)."""


class NotFound(ApiError):
    """404: no such slice, lease, peer or device (exit code 4)."""


class DoesNotFit(ApiError):
    """409: does not fit, or conflicts with the state it is in (exit code 5)."""


#: The problem classes by HTTP status (docker-py's way): callers catch what they mean.
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    413: BadRequest,
    403: NotAllowed,
    404: NotFound,
    409: DoesNotFit,
}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path
        self.timeout: float = timeout

    def connect(self) -> None:
        # Connect *blocking*, bounded by SO_SNDTIMEO: a non-blocking connect (what a Python
        # timeout makes) fails at once with EAGAIN when the agent's listen backlog is full,
        # where a blocking one waits its turn. The timeout applies to the exchange after.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        seconds = 0.0 if self.timeout is None else float(self.timeout)
        whole = int(seconds)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", whole, int((seconds - whole) * 1_000_000)),
        )
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock


def resolve_socket(explicit: str | None) -> str:
    """--socket, then $XPU_AGENT_SOCKET, then the configured socket, then the socket-activated
    one, then ./.run/ (``--dev``)."""
    if explicit:
        return explicit
    from_env = os.environ.get("XPU_AGENT_SOCKET")
    if from_env:
        return from_env
    configured = DEFAULT_SOCKET
    config_path = os.environ.get("XPU_AGENT_CONFIG", DEFAULT_CONFIG)
    if os.path.exists(config_path):
        import tomllib  # noqa: PLC0415 - only when there is a config to read

        try:
            with open(config_path, "rb") as handle:
                configured = tomllib.load(handle).get("paths", {}).get("socket", configured)
        except (OSError, tomllib.TOMLDecodeError):
            pass
    if not os.path.exists(configured):
        for fallback in (ACTIVATED_SOCKET, DEV_SOCKET):
            if os.path.exists(fallback):
                return os.path.abspath(fallback)
    return str(configured)


class AgentClient:
    def __init__(
        self, socket_path: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None
    ) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        #: Sent with every request (a slice token: ``xpuctl run --slice`` of a lent slice).
        self.headers = dict(headers or {})

    def _open(
        self, method: str, path: str, body: Any, timeout: float | None
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(self.socket_path, self.timeout_s if timeout is None else timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise AgentUnavailable(
                f"the agent is not running (no one listens on {self.socket_path}: {exc.strerror})"
            ) from None
        except PermissionError:
            conn.close()
            raise AgentUnavailable(
                f"permission denied on {self.socket_path}: join its group (default 'xpu')"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise AgentUnavailable(
                f"the agent did not answer on {self.socket_path}: {exc}"
            ) from None
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise self._problem(response.status, raw)
        return conn, response

    @staticmethod
    def _problem(status: int, raw: bytes) -> ApiError:
        kind = _BY_STATUS.get(status, ApiError)
        try:
            doc = json.loads(raw)
            return kind(
                status, doc.get("title", str(status)), doc.get("detail", ""), doc.get("extra") or {}
            )
        except (ValueError, AttributeError):
            return kind(status, f"HTTP {status}", raw.decode(errors="replace")[:200], {})

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn, response = self._open(method, path, body, None)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def stream(self, path: str) -> Iterator[Any]:
        """Newline-delimited JSON, one object per line, until the server closes."""
        conn, response = self._open("GET", path, None, timeout=None)
        try:
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
