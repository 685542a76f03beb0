"""The pieces of ``run --pool`` where one wrong character costs a job: the remote command
line (quoting, the token kept off it), the launcher's argv, and the gated child that is
bound before it runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.cli.dispatch import launcher_argv, remote_command
from agent.cli.gated import CANCELLED, GatedChild
from tests.harness import AgentProcess

LEASE = {
    "lender": "node-3",
    "slice_id": "s-0123456789ab",
    "address": "node-3.cluster.example",
    "launcher": ["ssh", "-o", "BatchMode=yes", "node-3.cluster.example"],
    "remote_xpuctl": "/usr/bin/xpuctl",
    "env": {
        "XPU_SLICE_ID": "s-0123456789ab",
        "XPU_SLICE_TOKEN": "secret-token",
        "CUDA_VISIBLE_DEVICES": "GPU-4b2e0d3c",
        "XPU_AGENT_SOCKET": "/run/xpu-agent/agent.sock",
    },
}


def test_the_remote_command_is_quoted_and_carries_the_environment_not_the_token() -> None:
    cmd = ["python3", "train.py", "--name", "it's a $HOME; rm -rf / `x`"]
    line = remote_command(LEASE, cmd, "/home/al ice/run 1")
    assert "secret-token" not in line
    words = shlex.split(line)  # what the lender's shell makes of it
    assert words[:2] == ["exec", "env"]
    assert "CUDA_VISIBLE_DEVICES=GPU-4b2e0d3c" in words
    assert "XPU_AGENT_SOCKET=/run/xpu-agent/agent.sock" in words
    rest = words[words.index("/usr/bin/xpuctl") :]
    assert rest == [
        "/usr/bin/xpuctl",
        "run",
        "--slice",
        "s-0123456789ab",
        "--leased",
        "--chdir",
        "/home/al ice/run 1",
        "--",
        *cmd,
    ]
    # Run by a real POSIX shell, the arguments arrive exactly as given.
    echoed = subprocess.run(
        ["sh", "-c", shlex.join(["printf", "%s\\n", *cmd])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert echoed == cmd
    with_token = shlex.split(remote_command(LEASE, cmd, "/", with_token=True))
    assert "XPU_SLICE_TOKEN=secret-token" in with_token


def test_ssh_gets_sendenv_and_a_tty_only_when_stdin_is_one() -> None:
    argv = launcher_argv(LEASE, "REMOTE", tty=False)
    assert argv == [
        "ssh",
        "-o",
        "SendEnv=LC_XPU_SLICE_TOKEN",
        "-o",
        "BatchMode=yes",
        "node-3.cluster.example",
        "--",
        "REMOTE",
    ]
    assert launcher_argv(LEASE, "REMOTE", tty=True)[3:4] == ["-t"]
    custom = launcher_argv(LEASE, "REMOTE", False, "ssh -p 2222 -J bastion {address}")
    assert custom == [
        "ssh",
        "-o",
        "SendEnv=LC_XPU_SLICE_TOKEN",
        "-p",
        "2222",
        "-J",
        "bastion",
        "node-3.cluster.example",
        "--",
        "REMOTE",
    ]


def test_other_launchers_run_the_command_through_sh() -> None:
    argv = launcher_argv(LEASE, "exec env A=1 xpuctl run", False, "srun -w {node} --pty")
    assert argv == ["srun", "-w", "node-3", "--pty", "sh", "-c", "exec env A=1 xpuctl run"]


def test_a_gated_child_runs_nothing_until_released(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    child = GatedChild(["sh", "-c", f"echo $$ > {marker}"], dict(os.environ), str(tmp_path))
    time.sleep(0.2)
    assert not marker.exists()  # forked, held before exec
    assert child.release() is None
    assert child.wait() == 0
    assert marker.read_text().strip() == str(child.pid)  # the very pid that was bound

    cancelled = GatedChild(["sh", "-c", f"touch {marker}.2"], dict(os.environ))
    cancelled.cancel()
    assert cancelled.status == CANCELLED and not Path(f"{marker}.2").exists()

    missing = GatedChild(["/no/such/program"], dict(os.environ))
    error = missing.release()
    assert error is not None and error.errno == 2 and missing.status == 127

    badcwd = GatedChild(["true"], dict(os.environ), str(tmp_path / "absent"))
    error = badcwd.release()
    assert error is not None and error.errno == 2


def test_run_binds_the_command_before_it_runs(agent: AgentProcess) -> None:
    # The command's first act prints the time; the agent recorded the binding before it.
    # (Bound after starting, as before, a shell's first instruction beats the bind's HTTP
    # request and ledger commit by milliseconds.)
    for _ in range(3):
        result = agent.xpuctl(
            "--json", "run", "--memory", "1GiB", "--compute", "10", "--", "date", "+%s.%N"
        )
        assert result.returncode == 0, result.stderr
        started = float(result.stdout)
        events = agent.api("GET", "/v1/events?limit=20")[1]
        bound = [e for e in events if e["kind"] == "process.bound"][-1]
        assert bound["ts"] < started, (bound["ts"], started)


def test_signals_reach_a_gated_child() -> None:
    child = GatedChild([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ))
    assert child.release() is None
    child.signal(signal.SIGTERM)
    assert child.wait() == -signal.SIGTERM
    child.signal(signal.SIGTERM)  # gone: nothing happens
