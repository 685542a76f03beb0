"""Daemon lifecycle: reload on SIGHUP, supervised restarts, journald-style logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from agent import supervise
from agent.systemd import listen_fds
from tests.harness import AgentProcess, agent_env, json_out, short_tmpdir, wait_for, xpuctl_popen


def test_sighup_reloads_slicing_and_refuses_a_bad_file(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory()
    first = json_out(agent.xpuctl("--json", "alloc", "--memory", "512", "--compute", "25"))
    assert first["compute_pct"] == 30
    text = agent.config_path.read_text()
    agent.config_path.write_text(text + "\n[slicing]\ncompute_step_pct = 5\n")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in agent.log(), 10)
    second = json_out(agent.xpuctl("--json", "alloc", "--memory", "512", "--compute", "25"))
    assert second["compute_pct"] == 25
    agent.config_path.write_text(text + "\n[slicing]\ncompute_step_pct = 7\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in agent.log(), 10)
    assert "slicing.compute_step_pct" in agent.log()
    assert agent.api("GET", "/v1/health")[0] == 200
    third = json_out(agent.xpuctl("--json", "alloc", "--memory", "512", "--compute", "25"))
    assert third["compute_pct"] == 25  # the running configuration was kept


async def test_supervised_task_restarts_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # The waits asked for, not the gaps between calls: on a loaded host the first failure's
    # log (its traceback rendered for the first time) took longer than the third wait.
    monkeypatch.setattr(supervise, "BACKOFF_MIN_S", 0.05)
    waits: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        waits.append(delay)
        await sleep(0)

    monkeypatch.setattr(supervise.asyncio, "sleep", recorded)
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise RuntimeError("boom")

    restarts: dict[str, int] = {}
    await asyncio.wait_for(supervise.supervised("flaky", flaky, restarts), 5)
    assert len(calls) == 4 and restarts == {"flaky": 3}
    # 0.05, 0.1, 0.2 s, each with ±20 % jitter: doubling, so always growing.
    assert len(waits) == 3
    for wait, base in zip(waits, (0.05, 0.1, 0.2), strict=True):
        assert 0.8 * base <= wait <= 1.2 * base, waits


async def test_supervised_passes_cancellation_through() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(supervise.supervised("forever", forever))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_listen_fds_ignores_sockets_meant_for_another_process() -> None:
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == {}
    assert listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}) == {}
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == {}


def test_journald_lines_have_priority_and_no_timestamp() -> None:
    work = short_tmpdir()
    log_path = work / "stderr.log"
    config = work / "agent.toml"
    config.write_text(
        'version = 1\n[node]\nname = "j"\n[backends]\nenabled = ["mock"]\n'
        '[api]\nsocket_group = "xa-no-such-group"\n'
        f'[paths]\nstate_dir = "{work / "state"}"\nsocket = "{work / "a.sock"}"\n'
    )
    with open(log_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = {**agent_env(), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.daemon_main", "--config", str(config)],
            stderr=err,
            stdout=err,
            env=env,
        )
        try:
            wait_for(lambda: "xpu-agent ready" in log_path.read_text(), 20)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    ready = next(line for line in lines if "xpu-agent ready" in line)
    assert ready.startswith("<6>{")
    record = json.loads(ready[3:])
    assert "timestamp" not in record and record["node"] == "j"
    assert any(line.startswith("<4>") for line in lines)  # the missing socket group warning


def test_sigterm_with_an_open_event_stream_stops_promptly(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory()
    follower = xpuctl_popen(agent.socket, "events", "--follow", stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        started = time.monotonic()
        assert agent.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 8
    finally:
        follower.kill()
        follower.wait()
