"""Fail closed, never silently: each defect of the black-box attack, at the level it was
found (a real agent process, a real socket)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sim_peers
from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, publish_raw, topic_root
from tests.harness import PY, REPO, AgentProcess, agent_env, short_tmpdir, wait_for


def daemon(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "agent.cli.daemon_main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        check=False,
        cwd="/tmp",
    )


# -- one agent per state directory and socket ------------------------------------------------


def test_second_agent_on_the_same_state_dir_refuses(agent: AgentProcess) -> None:
    second = daemon("--config", str(agent.config_path))
    assert second.returncode == 1
    assert "another xpu-agent is running on state directory" in second.stderr
    assert "Traceback" not in second.stderr
    assert agent.xpuctl("status").returncode == 0  # the first one still serves


def test_second_agent_on_the_same_socket_refuses(agent: AgentProcess) -> None:
    other = AgentProcess(short_tmpdir())
    text = other.config_path.read_text().replace(str(other.socket), str(agent.socket))
    other.config_path.write_text(text)
    second = daemon("--config", str(other.config_path))
    assert second.returncode == 1
    assert f"{agent.socket} is served by another process" in second.stderr
    assert agent.xpuctl("status").returncode == 0


def test_after_kill9_the_next_agent_starts(agent_factory: Callable[..., AgentProcess]) -> None:
    first = agent_factory()
    first.kill9()
    assert first.socket.exists()  # stale, nobody listens
    again = AgentProcess(first.dir)
    again.start()
    try:
        assert again.xpuctl("status").returncode == 0
    finally:
        again.stop()


def test_check_config_validates_without_starting(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('version = 1\n[node]\nname = "n1"\n[backends]\nenabled = ["mock"]\n')
    ok = daemon("check-config", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout and "n1" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[node]\nnmae = "n1"\n')
    refused = daemon("check-config", str(bad))
    assert refused.returncode == 2
    assert "node.nmae" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


# -- every input bounded at the edge -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/slices", {"memory_mib": 1024, "compute_pct": 10, "ttl_s": 1e308}, "ttl_s"),
        (
            "POST",
            "/v1/slices",
            {"memory_mib": 1024, "compute_pct": 10, "priority": 2**64},
            "priority",
        ),
        ("POST", "/v1/slices", {"memory_mib": 2**63, "compute_pct": 10}, "memory_mib"),
        (
            "POST",
            "/v1/slices",
            {"memory_mib": 1024, "compute_pct": 10, "labels": {f"k{i}": "v" for i in range(100)}},
            "labels",
        ),
        ("POST", "/v1/slices/s-000000000000/processes", {"pid": -1}, "pid"),
        ("POST", "/v1/slices/s-000000000000/processes", {"pid": 2**63}, "pid"),
        ("DELETE", "/v1/slices/s-000000000000/processes/-5", None, "pid"),
        ("DELETE", "/v1/slices/s-000000000000/processes/99999999999999999999", None, "pid"),
        ("GET", f"/v1/events?after={2**63}", None, "after"),
        ("GET", "/v1/events?limit=0", None, "limit"),
        ("POST", "/v1/pool/place", {"memory_mib": 0, "compute_pct": 10}, "memory_mib"),
        ("POST", "/v1/pool/place", {"memory_mib": 1, "compute_pct": 10, "limit": 10**6}, "limit"),
        ("POST", "/v1/pool/borrow", {"memory_mib": -1, "compute_pct": 10}, "memory_mib"),
        ("POST", "/v1/pool/borrow", {"memory_mib": 1, "compute_pct": 500}, "compute_pct"),
    ],
)
def test_out_of_range_is_400_naming_the_field_at_once(
    agent: AgentProcess, method: str, path: str, body: object, field: str
) -> None:
    started = time.monotonic()
    status, problem, ctype = agent.api(method, path, body)
    assert status == 400, problem
    assert ctype == "application/problem+json" and field in problem["detail"], problem
    assert time.monotonic() - started < 1.0  # refused at the edge, not after a timeout


def test_deeply_nested_body_is_400(agent: AgentProcess) -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    status, problem, _ = agent.api("POST", "/v1/slices", raw=raw)
    assert status in (400, 413), problem
    nested = (
        b'{"memory_mib": 1024, "compute_pct": 10, "labels": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    status, problem, _ = agent.api("POST", "/v1/slices", raw=nested)
    assert status == 400 and "labels" in problem["detail"], problem


def test_nested_json_on_the_bus_is_dropped_and_counted() -> None:
    from agent.bus import payloads
    from agent.bus.guard import MALFORMED, Guard

    guard = Guard(10**7)
    deep = b'{"node": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert guard.decode(deep, payloads.Status, "z/nodes/x/status") is None
    assert guard.dropped[MALFORMED] == 1


# -- retried calls -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (make deps installs it)")
    mosquitto = Mosquitto().start()
    yield mosquitto
    mosquitto.cleanup()


def test_an_empty_retained_status_removes_the_peer(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    from agent.bus.topics import Kind, Topics

    root = topic_root()
    topics = Topics(root, "z", "sim")
    client = sim_peers.connect(broker)
    try:
        sim_peers.publish(client, topics, ["gone", "stays"], lambda _i: ["MockA100-80G"])
    finally:
        client.loop_stop()
        client.disconnect()
    me = agent_factory(node="me", config=mqtt_config(broker, root, "me", keepalive_s=30))

    def nodes() -> set[str]:
        return {p["node"] for p in me.api("GET", "/v1/pool")[1]}

    wait_for(lambda: nodes() == {"gone", "stays"}, 10)
    for kind in (Kind.STATUS, Kind.CAPACITY, Kind.IDLE):
        assert publish_raw(broker, topics.state(kind, "gone"), b"", retain=True) in (0, 16)
    wait_for(lambda: nodes() == {"stays"}, 5)
    dropped = me.api("GET", "/v1/node")[1]["mqtt"]["dropped"]
    assert dropped.get("malformed", 0) == 0, dropped
