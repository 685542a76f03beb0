"""Real daemons and real xpuctl processes for tests that read like a user's session."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def short_tmpdir(prefix: str = "xa") -> Path:
    """AF_UNIX paths are limited to 108 bytes: keep sockets under a short /tmp dir."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    env.pop("XPU_AGENT_SOCKET", None)
    env.pop("XPU_AGENT_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def api(
    socket_path: str | Path,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any, str]:
    """One request over the Unix socket: (status, decoded JSON or text, content type)."""
    conn = _UnixConnection(str(socket_path))
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if payload is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        decoded: Any = data.decode(errors="replace")
        if "json" in ctype:
            decoded = json.loads(data)
        return resp.status, decoded, ctype
    finally:
        conn.close()


class AgentProcess:
    """An ``xpu-agent`` subprocess with its own config, state dir and socket."""

    def __init__(
        self,
        workdir: Path | None = None,
        config: str = "",
        backends: str = '["mock"]',
        mock_devices: str = '[{ model = "MockA100-80G", memory_mib = 81920, count = 4 }]',
        env: Mapping[str, str] | None = None,
        node: str = "test-node",
    ) -> None:
        self.dir = workdir or short_tmpdir()
        self.socket = self.dir / "agent.sock"
        self.state = self.dir / "state"
        self.log_path = self.dir / "agent.log"
        self.config_path = self.dir / "agent.toml"
        self.node = node
        sections = config
        if "[backends]" not in sections:
            sections += f"\n[backends]\nenabled = {backends}\n"
        if "[backends.mock]" not in sections:
            sections += f"\n[backends.mock]\ndevices = {mock_devices}\n"
        if "[node]" not in sections:
            sections = f'[node]\nname = "{node}"\n' + sections
        self.config_path.write_text(
            "version = 1\n"
            f"{sections}\n"
            "[paths]\n"
            f'state_dir = "{self.state}"\n'
            f'socket = "{self.socket}"\n'
            f'runtime_dir = "{self.dir / "run"}"\n'
        )
        self.env = agent_env(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout_s: float = 20.0) -> AgentProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process life
        self._log_start = self._log.tell()  # this run's lines start here (restarts append)
        self.proc = subprocess.Popen(
            [PY, "-m", "agent.cli.daemon_main", "--config", str(self.config_path)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            # The socket answers before device discovery ends; ready is what READY=1 is.
            try:
                status, _, _ = api(self.socket, "GET", "/v1/health")
                fresh = self.log_path.read_bytes()[self._log_start :]
                if status == 200 and b"xpu-agent ready" in fresh:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, str]:
        return api(self.socket, method, path, body, **kw)

    def xpuctl(
        self, *args: str, user: int | None = None, timeout: float = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return xpuctl(*args, socket_path=self.socket, user=user, timeout=timeout, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def xpuctl(
    *args: str,
    socket_path: Path | str | None = None,
    user: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``xpuctl`` (optionally as another uid through ``setpriv``)."""
    cmd: list[str] = [PY, "-m", "agent.cli.xpuctl"]
    if socket_path is not None:
        cmd += ["--socket", str(socket_path)]
    cmd += list(args)
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    full_env = agent_env(env)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        input=input_text,
        check=False,
        cwd="/tmp",
    )


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met in {timeout_s}s (last: {last!r})")


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    """In an asyncio test: wait (without blocking the loop) until ``predicate()`` holds."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def spawn(code: str, env: Mapping[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """A real child Python process running ``code``."""
    return subprocess.Popen([PY, "-c", code], env={**os.environ, **(env or {})}, **kw)


def xpuctl_popen(socket_path: Path | str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """A long-running ``xpuctl`` (``run``, ``events --follow``) to interact with."""
    return subprocess.Popen(
        [PY, "-m", "agent.cli.xpuctl", "--socket", str(socket_path), *args],
        text=True,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        **popen,
    )
