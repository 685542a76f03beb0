"""``xpu-agent demo``: a local cluster a new user can poke at, stopped by Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

import pytest

from tests.broker import MOSQUITTO
from tests.harness import PY, REPO, agent_env, json_out, short_tmpdir, wait_for, xpuctl

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def test_demo_check_names_the_broker() -> None:
    result = subprocess.run(
        [PY, "-m", "agent.cli.daemon_main", "demo", "--check"],
        capture_output=True,
        text=True,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("mosquitto: ")


def test_demo_runs_a_pool_until_ctrl_c() -> None:
    workdir = short_tmpdir("demo")
    proc = subprocess.Popen(
        [PY, "-m", "agent.cli.daemon_main", "demo", "--nodes", "2"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        start_new_session=True,  # its own process group: cleanup reaches the children
    )
    try:
        assert proc.stdout is not None
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")))
        reader.start()
        wait_for(lambda: any("Ctrl-C" in line for line in output) or proc.poll() is not None, 30)
        assert proc.poll() is None, "".join(output)
        text = "".join(output)
        assert "2 agents on mock cards, mosquitto broker" in text
        assert "--socket .run/demo/node-1/agent.sock pool" in text
        sockets = [workdir / ".run" / "demo" / f"node-{i}" / "agent.sock" for i in (1, 2)]

        def pool(index: int) -> list[dict[str, object]]:
            peers: list[dict[str, object]] = json_out(
                xpuctl("--json", "pool", socket_path=sockets[index])
            )
            return peers

        wait_for(lambda: [p["node"] for p in pool(0) if p["placeable"]] == ["node-2"], 10)
        wait_for(lambda: [p["node"] for p in pool(1) if p["placeable"]] == ["node-1"], 10)
        lease = json_out(
            xpuctl(
                "--json", "borrow", "--memory", "8GiB", "--compute", "30", socket_path=sockets[0]
            )
        )
        assert lease["lender"] == "node-2"
        # run --pool with an H100 (node-2's cards): dispatched there by the demo's local
        # launcher, bound to a slice lent to node-1, its output and status back.
        ran = xpuctl(
            "run",
            "--pool",
            "--memory",
            "8GiB",
            "--compute",
            "30",
            "--model",
            "H100",
            "--",
            "sh",
            "-c",
            "echo on $XPU_DEVICE; exit 3",
            socket_path=sockets[0],
        )
        assert ran.returncode == 3, ran.stderr
        assert ran.stdout.startswith("on mock-")
        lent = json_out(xpuctl("--json", "slices", "--all", socket_path=sockets[1]))
        ran_in = [s for s in lent if s["borrower"] == "node-1" and s["id"] != lease["slice_id"]]
        assert [s["state"] for s in ran_in] == ["released"]

        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        reader.join(5)
        assert "stopping the demo" in "".join(output)
        for sock in sockets:
            assert xpuctl("status", socket_path=sock).returncode == 1  # nobody answers
        assert (workdir / ".run" / "demo" / "node-1" / "agent.log").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)
