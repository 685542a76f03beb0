"""``xpuctl top`` as a user meets it: one frame in a script, and the live view in a real
terminal (tmux) against a real daemon — look at the screen, resize it, press q."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.top import MIN_WIDTH, Snapshot, frame, plain
from tests.harness import PY, REPO, AgentProcess, agent_env, short_tmpdir, wait_for, xpuctl

need_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux not installed (make deps)"
)


# -- the frame, from synthetic API answers --------------------------------------------------


def _slice(sid: str, memory: int, compute: int, used_mib: float, used_pct: float, **kw: Any) -> Any:
    usage = {
        "memory_used_mib": used_mib,
        "compute_used_pct": used_pct,
        "throttled": kw.pop("throttled", False),
        "last_action": kw.pop("last_action", None),
    }
    return {
        "id": sid,
        "memory_mib": memory,
        "compute_pct": compute,
        "owner_uid": 1000,
        "state": kw.pop("state", "active"),
        "created_at": kw.pop("created_at", 1.0),
        "processes": [{"pid": 4242, "start_time": 1.0}],
        "borrower": kw.pop("borrower", None),
        "usage": usage,
    }


def _device(did: str, slices: list[Any], **kw: Any) -> Any:
    return {
        "id": did,
        "model": "MockA100-80G",
        "health": kw.pop("health", "ok"),
        "health_reason": kw.pop("health_reason", None),
        "utilisation_pct": 55.0,
        "memory_used_mib": 1024.0,
        "memory_total_mib": 81920,
        "allocated_memory_mib": sum(s["memory_mib"] for s in slices),
        "allocated_compute_pct": sum(s["compute_pct"] for s in slices),
        "slices": slices,
        "unsliced_pids": kw.pop("unsliced", []),
    }


NODE = {
    "node": "gpu-01",
    "zone": "z1",
    "version": "9.9.9",
    "uptime_s": 3725.0,
    "health": "degraded",
    "backends": ["mock"],
    "devices": 2,
    "devices_healthy": 1,
    "capacity": {"memory_mib": 163840, "compute_pct": 200, "slices": 20},
    "allocated": {"memory_mib": 40960, "compute_pct": 70, "slices": 2},
    "free": {"memory_mib": 122880, "compute_pct": 130, "slices": 18},
    "idle": {"memory_mib": 122880, "compute_pct": 130, "slices": 18},
    "mqtt": {"enabled": True, "connected": True, "url": "mqtt://b", "state": "connected"},
}
PEERS = [
    {
        "node": "gpu-02",
        "state": "online",
        "placeable": True,
        "age_s": 2.25,
        "agent": "9.9.9",
        "devices": [{"memory_free_mib": 40960, "compute_free_pct": 60}],
        "lendable_memory_mib": 20480,
        "lendable_compute_pct": 30,
    },
    {
        "node": "gpu-03",
        "state": "offline",
        "placeable": False,
        "age_s": 120.0,
        "agent": None,
        "devices": [],
        "lendable_memory_mib": 0,
        "lendable_compute_pct": 0,
    },
]


def _snapshot() -> Snapshot:
    hog = _slice("s-hog", 8192, 30, 9000.0, 25.0, last_action="term pid 4242")
    busy = _slice("s-busy", 32768, 40, 1024.0, 40.0, throttled=True, created_at=2.0)
    devices = [
        _device("mock-0", [hog, busy], unsliced=[777]),
        _device("mock-1", [], health="lost", health_reason="device disappeared"),
    ]
    return Snapshot(NODE, devices, PEERS, None, time.time())


def test_frame_shows_slices_highlights_and_pool() -> None:
    lines = frame(_snapshot(), 120)
    text = plain(lines)
    assert "xpu-agent 9.9.9 on gpu-01 (zone z1)" in text and "up 62m" in text
    assert "allocated 40.0GiB/160.0GiB memory, 70/200% compute, 2/20 slices" in text
    assert "lendable 120.0GiB, 130% compute" in text
    # Each slice has a letter; its run in the bar is as long as its share of the card.
    hog_row = next(line for line in lines if "s-hog" in line.text)
    busy_row = next(line for line in lines if "s-busy" in line.text)
    assert hog_row.text.strip().startswith("A s-hog") and busy_row.text.strip().startswith("B")
    mem_bar = next(line.text for line in lines if line.text.startswith("  mem ["))
    cells = mem_bar[mem_bar.index("[") + 1 : mem_bar.index("]")]
    assert cells.lower().count("a") == round(len(cells) * 8192 / 81920)
    assert cells.lower().count("b") == round(len(cells) * 32768 / 81920)
    cmp_bar = next(line.text for line in lines if line.text.startswith("  cmp ["))
    cmp_cells = cmp_bar[cmp_bar.index("[") + 1 : cmp_bar.index("]")]
    # s-busy uses its whole quota: its run is all capitals.
    assert "b" not in cmp_cells and cmp_cells.count("B") == round(len(cmp_cells) * 0.4)
    # Over-limit and throttled slices are called out and styled.
    assert "OVER LIMIT" in hog_row.text and ("  OVER LIMIT", "alert") in hog_row.segments
    assert "last action: term pid 4242" in hog_row.text
    assert "THROTTLED" in busy_row.text and ("  THROTTLED", "warn") in busy_row.segments
    assert "unsliced processes: 777" in text
    assert "lost (device disappeared)" in text
    assert "2 peer(s), 1 placeable; lendable 20.0GiB, 30% compute" in text
    assert "gpu-03" in text and "offline*" in text
    # The bars line up and fill the width exactly.
    assert len(mem_bar) == 120 and cmp_bar.index("]") == mem_bar.index("]")


@pytest.mark.parametrize("width", [MIN_WIDTH, 60, 200])
def test_frame_bars_fit_any_width(width: int) -> None:
    for line in frame(_snapshot(), width):
        if line.text.startswith(("  mem [", "  cmp [")):
            assert len(line.text) <= width, (width, line.text)


def test_frame_when_agent_unreachable() -> None:
    text = plain(frame(Snapshot(None, [], [], "the agent is not running", 0.0), 80))
    assert "agent unreachable: the agent is not running" in text


def test_xpuctl_stays_light_without_top() -> None:
    code = (
        "import sys, agent.cli.xpuctl\n"
        "print([m for m in ('curses', '_curses', 'agent.cli.top') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- one frame from the real daemon ---------------------------------------------------------


def test_once_prints_the_frame(agent: AgentProcess) -> None:
    made = json.loads(agent.xpuctl("--json", "alloc", "--memory", "8GiB", "--compute", "30").stdout)
    result = agent.xpuctl("top", "--once", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "xpu-agent" in out and "on test-node" in out
    assert "mqtt standalone" in out and "pool  no peers (no MQTT bus configured)" in out
    for device in ("mock-0", "mock-1", "mock-2", "mock-3"):
        assert f"\n{device}  MockA100-80G  ok" in out
    assert f"A {made['id']}" in out
    assert "allocated 8.0GiB/320.0GiB memory, 30/400% compute, 1/40 slices" in out
    assert "\x1b" not in out  # plain text: no terminal control sequences
    # Not a terminal: `top` without --once prints one frame too (like `top -b -n 1`).
    piped = agent.xpuctl("top")
    assert piped.returncode == 0 and "xpu-agent" in piped.stdout


def test_json_top_and_unreachable(agent: AgentProcess, tmp_path: Path) -> None:
    snap = json.loads(agent.xpuctl("--json", "top").stdout)
    assert set(snap) == {"node", "devices", "pool"}
    assert snap["node"]["node"] == "test-node" and len(snap["devices"]) == 4
    missing = xpuctl("top", "--once", socket_path=tmp_path / "none.sock")
    assert missing.returncode == 1 and "not running" in missing.stderr


# -- the live view in a real terminal -------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket), so tests never touch a user's sessions."""

    def __init__(self) -> None:
        self.name = f"xpu-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.name, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def wait_for(self, *words: str, timeout_s: float = 20.0) -> str:
        """The screen once it shows every one of ``words``; on timeout, say what it showed."""
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if all(w in text for w in words):
                return text
            time.sleep(0.05)
        raise AssertionError(f"the screen never showed {words}; it showed:\n{text}")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    server("kill-server")


def _hog(agent: AgentProcess) -> subprocess.Popen[bytes]:
    """A process over its 128 MiB slice's limit (the agent only reports it here)."""
    code = "import time\nx = bytearray(300 << 20)\ntime.sleep(120)\n"
    env = {**agent_env(), "PYTHONPATH": str(REPO)}
    cmd = [
        PY,
        "-m",
        "agent.cli.xpuctl",
        "--socket",
        str(agent.socket),
        "run",
        "--memory",
        "128MiB",
        "--compute",
        "10",
        "--device",
        "mock-2",
        "--",
        PY,
        "-c",
        code,
    ]
    return subprocess.Popen(cmd, env=env, cwd="/tmp")


@need_tmux
def test_live_view_in_a_terminal(agent_factory: Callable[..., AgentProcess], tmux: Tmux) -> None:
    agent = agent_factory(config='[enforcement]\nmemory_action = "report"\n')
    made = json.loads(
        agent.xpuctl("--json", "alloc", "--memory", "20GiB", "--compute", "40").stdout
    )
    hog = _hog(agent)
    status = Path(short_tmpdir()) / "status"
    command = (
        f"cd /tmp && PYTHONPATH={REPO} {PY} -m agent.cli.xpuctl --socket {agent.socket} "
        f"top --interval 0.2; echo $? > {status}"
    )
    try:
        started = tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "40", command)
        assert started.returncode == 0, started.stderr
        screen = tmux.wait_for("mock-0", made["id"], "q quit", timeout_s=20)
        assert "xpu-agent" in screen and "on test-node" in screen
        assert "mem [" in screen and "cmp [" in screen
        # The hog's slice is flagged once the agent has measured it.
        screen = tmux.wait_for("OVER LIMIT", timeout_s=20)
        row = next(line for line in screen.splitlines() if "OVER LIMIT" in line)
        assert "128MiB" in row
        # A small window gets a message, not a crash; a larger one the view again.
        assert tmux("resize-window", "-t", "top", "-x", "30", "-y", "5").returncode == 0
        tmux.wait_for("terminal too small", timeout_s=10)
        assert tmux("resize-window", "-t", "top", "-x", "100", "-y", "16").returncode == 0
        screen = tmux.wait_for("mock-0", "q quit", "lines 1-15/", timeout_s=10)
        assert max(len(line) for line in screen.splitlines()) <= 100
        # More lines than rows: the arrow keys scroll, the title goes off the top.
        tmux("send-keys", "-t", "top", "Down", "Down")
        screen = tmux.wait_for("lines 3-17/", timeout_s=10)
        assert "xpu-agent" not in screen
        # q quits with status 0 and the terminal session ends.
        tmux("send-keys", "-t", "top", "q")
        wait_for(lambda: status.exists() and status.read_text().strip(), 10)
        assert status.read_text().strip() == "0"
        wait_for(lambda: tmux("has-session", "-t", "top").returncode != 0, 10)
    finally:
        hog.send_signal(signal.SIGTERM)
        hog.wait(15)
        shutil.rmtree(status.parent, ignore_errors=True)
