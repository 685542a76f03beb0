"""systemd integration with real parts: notify datagrams, socket activation, unit checks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import systemd as sd
from tests.harness import REPO, AgentProcess, api, wait_for

UNITS = REPO / "systemd"
need_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (make deps)"
)


def _recv_all(sock: socket.socket, until: str, timeout_s: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        messages.append(data)
        if until in data:
            break
    return messages


def test_notify_sequence_ready_status_watchdog_reload_stopping(
    agent_factory: object,
) -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    notify_path = tmp / f"xa-notify-{os.getpid()}.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    try:
        agent = agent_factory(  # type: ignore[operator]
            start=False,
            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "600000"},
        )
        agent.env["NOTIFY_SOCKET"] = str(notify_path)
        agent.env["WATCHDOG_USEC"] = "600000"
        agent.start(wait=False)
        got = _recv_all(receiver, "READY=1", 20)
        assert any("READY=1" in m for m in got), got
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=" in ready
        # The socket is bound before READY=1 is sent.
        assert api(agent.socket, "GET", "/v1/health")[0] == 200
        got = _recv_all(receiver, "WATCHDOG=1", 5)
        assert any("WATCHDOG=1" in m for m in got), got
        agent.proc.send_signal(signal.SIGHUP)
        got = _recv_all(receiver, "READY=1", 10)
        reloading = next(m for m in got if "RELOADING=1" in m)
        # RELOADING=1 and MONOTONIC_USEC= travel in one datagram, then READY=1.
        assert re.search(r"MONOTONIC_USEC=\d+", reloading)
        assert got.index(reloading) < max(i for i, m in enumerate(got) if "READY=1" in m)
        agent.proc.send_signal(signal.SIGTERM)
        got = _recv_all(receiver, "STOPPING=1", 15)
        assert any("STOPPING=1" in m for m in got), got
        assert agent.proc.wait(15) == 0
    finally:
        receiver.close()
        notify_path.unlink(missing_ok=True)


def test_notifier_abstract_namespace_and_absent() -> None:
    assert not sd.Notifier({}).enabled
    name = f"xa-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        notifier = sd.Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("hello")
        assert receiver.recv(100) == b"READY=1\nSTATUS=hello"
        notifier.close()
    finally:
        receiver.close()


def test_watchdog_pid_for_another_process_is_ignored() -> None:
    assert sd.Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    own = sd.Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert own.watchdog_s == 1.0


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (make deps)",
)
def test_socket_activation_through_systemd_socket_activate(agent_factory: object) -> None:
    agent = agent_factory(start=False)  # type: ignore[operator]
    listen = agent.dir / "activated.sock"
    log = open(agent.log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(listen),
            "--fdname=api",
            "-E",
            "PYTHONPATH",
            sys.executable,
            "-m",
            "agent.cli.daemon_main",
            "--config",
            str(agent.config_path),
        ],
        env={**agent.env, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # systemd-socket-activate starts the agent on the first connection; health turns
        # ok once discovery is done.
        status, _health, _ = wait_for(
            lambda: (got := _try(listen)) and got[1]["status"] == "ok" and got, 30
        )
        assert status == 200
        assert not agent.socket.exists(), "an activated agent must not bind its own socket"
        # The socket answers from before discovery; "ready" (READY=1) follows it.
        wait_for(lambda: "systemd socket" in agent.log(), 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()


def _try(path: Path) -> tuple[int, dict[str, object], str] | None:
    try:
        return api(path, "GET", "/v1/health")
    except OSError:
        return None


def _units_for_verify(tmp_path: Path) -> list[Path]:
    """The units as installed: ExecStart points at the real entry point."""
    exe = shutil.which("xpu-agent") or str(Path(sys.executable).parent / "xpu-agent")
    out = []
    for name in ("xpu-agent.service", "xpu-agent.socket"):
        text = (UNITS / name).read_text().replace("/usr/sbin/xpu-agent", exe)
        target = tmp_path / name
        target.write_text(text)
        out.append(target)
    return out


@need_systemd
def test_units_verify_clean(tmp_path: Path) -> None:
    units = _units_for_verify(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    noise = [line for line in result.stderr.splitlines() if "xpu-agent" in line]
    assert result.returncode == 0, result.stderr
    assert noise == [], noise


@need_systemd
def test_service_security_exposure_at_most_4(tmp_path: Path) -> None:
    service = _units_for_verify(tmp_path)[0]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 4.0


def test_service_contract() -> None:
    text = "\n".join(
        line
        for line in (UNITS / "xpu-agent.service").read_text().splitlines()
        if not line.startswith("#")
    )
    for required in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "DevicePolicy=closed",
        "AF_NETLINK",
        "CAP_KILL",
        "ProtectSystem=strict",
    ):
        assert required in text
    for forbidden in ("PrivateDevices=", "ProtectProc=", "Type=notify-reload"):
        assert forbidden not in text
    socket_unit = (UNITS / "xpu-agent.socket").read_text()
    assert "ListenStream=/run/xpu-agent.sock" in socket_unit
    assert "FileDescriptorName=api" in socket_unit
    assert "SocketMode=0660" in socket_unit


def test_graceful_sigterm_exit_0(agent: AgentProcess) -> None:
    assert agent.stop(signal.SIGTERM) == 0
    assert "stopped" in agent.log()
