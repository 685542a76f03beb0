"""Fail closed, never silently: each defect of the black-box attack, at the level it was
found (a real agent process, a real socket)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sim_peers
from tests.broker import (
    Mosquitto,
    Subscriber,
    mqtt_config,
    publish_raw,
    topic_root,
)
from tests.enforce_support import BUSY, cpu_priority, running, shares
from tests.harness import (
    PY,
    REPO,
    AgentProcess,
    agent_env,
    short_tmpdir,
    wait_for,
    xpuctl_popen,
)


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


__all__ = ["cpu_priority"]  # a fixture, used by name below

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
    assert status == 400 and "nested too deeply" in problem["detail"], problem


def test_nested_json_on_the_bus_is_dropped_and_counted() -> None:
    from agent.bus import payloads
    from agent.bus.guard import MALFORMED, Guard

    guard = Guard(10**7)
    deep = b'{"node": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert guard.decode(deep, payloads.Status, "z/nodes/x/status") is None
    assert guard.dropped[MALFORMED] == 1


# -- retried calls -------------------------------------------------------------------------


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


# -- idle connections cannot take the API down ---------------------------------------------

FLOOD = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        held.append(s)
    except OSError:
        s.close()
# Refused connections are closed by the agent as it accepts them: they read EOF.
for s in held:
    s.setblocking(False)
closed, deadline = set(), time.monotonic() + 5
while len(closed) < len(held) - int(sys.argv[4]) and time.monotonic() < deadline:
    for i, s in enumerate(held):
        if i not in closed:
            try:
                if s.recv(1) == b"":
                    closed.add(i)
            except BlockingIOError:
                pass
    time.sleep(0.05)
print(len(held), len(closed), flush=True)
time.sleep(float(sys.argv[3]))
"""


def start_flood(
    sock: Path, uid: int, count: int, hold_s: float, keep: int
) -> subprocess.Popen[str]:
    """``count`` idle connections as ``uid`` (root runs it through setpriv); its first line
    is "opened closed" once all but ``keep`` were closed by the agent (or 5 s passed)."""
    return subprocess.Popen(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--init-groups",
            PY,
            "-c",
            FLOOD,
            str(sock),
            str(count),
            str(hold_s),
            str(keep),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user and prlimit")
def test_idle_connections_of_one_user_leave_the_api_to_others(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    from tests.test_authz import GROUP, ensure_group, ensure_user

    ensure_group(GROUP)
    flooder = ensure_user("xa-flooder", [GROUP])
    agent = agent_factory(
        config=f'[api]\nsocket_group = "{GROUP}"\nmax_connections_per_uid = 16\n'
        "header_timeout_s = 30\n"
    )
    assert agent.proc is not None
    os.chmod(agent.dir, 0o755)  # let the user reach the socket; its own mode decides
    # systemd's default soft limit; the agent must stay usable under it.
    resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    flood = start_flood(agent.socket, flooder.uid, 1100, hold_s=20, keep=16)
    try:
        assert flood.stdout is not None
        held, closed = map(int, flood.stdout.readline().split())
        assert held == 1100 and closed == 1100 - 16, (held, closed)
        started = time.monotonic()
        status = agent.xpuctl("--json", "status")  # root: another uid
        assert status.returncode == 0, status.stderr
        assert time.monotonic() - started < 5
        time.sleep(1.5)  # a few samples while the flood holds its connections
        devices = agent.api("GET", "/v1/devices")[1]
        assert all(d["memory_used_mib"] is not None for d in devices)
    finally:
        flood.kill()
        flood.wait()
        if flood.stdout is not None:
            flood.stdout.close()
    log = agent.log()
    assert "Too many open files" not in log
    refusals = log.count("API connection refused")
    assert 1 <= refusals <= 12, refusals  # rate-limited: ~1,084 refusals, a handful of lines


def test_a_connection_that_sends_nothing_is_closed(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(config="[api]\nheader_timeout_s = 1\nbody_timeout_s = 1\n")
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(5)
    idle.connect(str(agent.socket))
    started = time.monotonic()
    assert idle.recv(1) == b""  # closed by the agent
    assert 0.5 < time.monotonic() - started < 4
    idle.close()
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.settimeout(5)
    slow.connect(str(agent.socket))
    slow.sendall(
        b"POST /v1/slices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"in time" in answer, answer[:200]
    slow.close()


def test_warnings_are_rate_limited_per_message() -> None:
    import logging

    from agent.logs import RateLimit

    now = [0.0]
    limit = RateLimit(every_s=10, burst=3, clock=lambda: now[0])

    def record(msg: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, msg, None, None)

    passed = [limit.filter(record({"event": "accept failed"})) for _ in range(100)]
    assert passed.count(True) == 3
    assert limit.filter(record({"event": "another"}))  # each message has its own budget
    assert all(limit.filter(record("info", logging.INFO)) for _ in range(50))
    now[0] = 11.0
    summary = record({"event": "accept failed"})
    assert limit.filter(summary) and summary.msg["suppressed"] == 97  # type: ignore[index]


def test_clients_wait_in_a_full_backlog_instead_of_failing(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(config="[api]\nbacklog = 2\n")
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)  # accepts nothing: the backlog fills
    try:
        clients = [
            xpuctl_popen(
                agent.socket, "--json", "status", stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(12)
        ]
        time.sleep(1.5)
        early = [c.poll() for c in clients]
        assert early == [None] * 12, early  # none gave up on a full backlog
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    for client in clients:
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, err
        assert json.loads(out)["node"] == "test-node"


# -- health that tells the truth ---------------------------------------------------------

FAKE_NPU_SMI = REPO / "tests" / "fake_npu_smi.py"


def test_a_hung_tool_at_start_does_not_hold_the_api_back(tmp_path: Path) -> None:
    agent = AgentProcess(
        short_tmpdir(),
        config=f'[backends]\nenabled = ["npu-smi"]\n'
        f'[backends.npu_smi]\npath = "{FAKE_NPU_SMI}"\ntimeout_s = 4\n',
        env={"FAKE_NPU_SMI_HANG": "1", "FAKE_NPU_SMI_HANG_S": "30"},
    )
    started = time.monotonic()
    agent.start(wait=False)
    try:
        health = wait_for(lambda: _health(agent), timeout_s=10)
        assert time.monotonic() - started < 4, "answered before the tool's timeout"
        assert health["status"] == "degraded"
        assert "device discovery has not finished" in health["reasons"]
        status = agent.xpuctl("status")
        assert status.returncode == 0 and "discovery has not finished" in status.stdout
    finally:
        agent.cleanup()


def _health(agent: AgentProcess) -> dict[str, object] | None:
    try:
        status, body, _ = agent.api("GET", "/v1/health")
    except OSError:
        return None
    return body if status == 200 else None


def test_a_tool_that_keeps_failing_makes_its_devices_unhealthy_at_once(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    switch = tmp_path / "fail"
    wrapper = tmp_path / "npu-smi"
    # The real fake, failing every sample once ``switch`` exists.
    wrapper.write_text(
        f"#!/bin/sh\nif [ -e {switch} ]; then echo 'dcmi error' >&2; exit 1; fi\n"
        f'exec {PY} {FAKE_NPU_SMI} "$@"\n'
    )
    wrapper.chmod(0o755)
    agent = agent_factory(
        config=f'[backends]\nenabled = ["npu-smi"]\n[backends.npu_smi]\npath = "{wrapper}"\n'
        "[enforcement]\ninterval_ms = 200\n"
    )
    before = _health(agent)
    assert before is not None and before["status"] == "ok", before
    switch.touch()
    started = time.monotonic()
    health = wait_for(lambda: (h := _health(agent)) and h["status"] == "degraded" and h, 10)
    assert time.monotonic() - started < 5  # three failed samples, not the next rediscovery
    assert any("samples failed in a row" in r for r in health["reasons"])  # type: ignore[union-attr]
    devices = agent.api("GET", "/v1/devices")[1]
    assert {d["health"] for d in devices} == {"unknown"}
    switch.unlink()
    wait_for(lambda: (h := _health(agent)) and h["status"] == "ok", 10)


# -- borrowing has bounds --------------------------------------------------------------------


def _borrow_request(
    node: str, topics: object, n: int, ttl_s: float | None = None, memory_mib: int = 81920
) -> bytes:
    from agent.bus import payloads

    return payloads.encode(
        payloads.BorrowRequest(
            node=node,
            boot_id="stranger-boot",
            seq=n,
            ts=time.time(),
            request_id=f"r-{n}",
            reply_to=topics.reply_to(node),  # type: ignore[attr-defined]
            memory_mib=memory_mib,
            compute_pct=100,
            ttl_s=ttl_s,
        )
    )


def test_borrowing_is_bounded_and_fair(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    from agent.bus.topics import Topics

    root = topic_root()
    lender = agent_factory(
        node="lender",
        config=mqtt_config(broker, root, "lender", keepalive_s=30, pool="max_lease_ttl_s = 3600"),
    )
    borrower = agent_factory(
        node="borrower", config=mqtt_config(broker, root, "borrower", keepalive_s=30)
    )
    wait_for(lambda: any(p["placeable"] for p in borrower.api("GET", "/v1/pool")[1]), 10)
    topics = Topics(root, "z", "stranger")
    inbox = topics.rpc("lender", "borrow")
    # A node never seen asks for a whole card for 31 years: refused, nothing lent.
    with Subscriber(broker, topics.reply_to("stranger")) as replies:
        publish_raw(broker, inbox, _borrow_request("stranger", topics, 1, ttl_s=1e9))
        wait_for(lambda: replies.messages, 5)
    answer = json.loads(replies.messages[0][1])
    assert answer["status"] == 403 and "online" in answer["detail"], answer
    assert [s for s in lender.api("GET", "/v1/slices")[1] if s["borrower"]] == []
    # 2,000 requests from one (online) node do not starve a real peer's borrow: each
    # requester has its own short queue, served in turn.
    client = sim_peers.connect(broker)
    flooder = Topics(root, "z", "flooder")
    try:
        sim_peers.publish(client, topics, ["flooder"], lambda _i: ["MockA100-80G"])
        wait_for(lambda: any(p["node"] == "flooder" for p in lender.api("GET", "/v1/pool")[1]), 5)
        infos = [
            client.publish(
                flooder.rpc("lender", "borrow"),
                _borrow_request("flooder", flooder, n, memory_mib=10**6),
                qos=1,
            )
            for n in range(2, 2002)
        ]
        started = time.monotonic()
        lease = borrower.xpuctl(
            "--json",
            "borrow",
            "--node",
            "lender",
            "--memory",
            "8GiB",
            "--compute",
            "30",
            "--ttl",
            "300d",
        )
        took = time.monotonic() - started
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()
    assert lease.returncode == 0, lease.stderr
    assert took < 5, took
    granted = json.loads(lease.stdout)
    # The lease is capped by the lender's pool.max_lease_ttl_s, not the 300 days asked.
    assert granted["expires_at"] - time.time() <= 3600 + 5
    dropped = lender.api("GET", "/v1/node")[1]["mqtt"]["dropped"]
    assert dropped.get("overloaded", 0) > 0, dropped


# -- a full disk turns nothing off -----------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A real 4 MiB tmpfs for the state directory (root only: mounting needs it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = short_tmpdir("xfull")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_refuses_writes_cleanly_and_enforcement_goes_on(
    agent_factory: Callable[..., AgentProcess], small_disk: Path, cpu_priority: None
) -> None:
    agent = AgentProcess(short_tmpdir(), config='[enforcement]\ncompute_policy = "hard"\n')
    agent.config_path.write_text(
        agent.config_path.read_text().replace(str(agent.state), str(small_disk / "state"))
    )
    agent.start()
    try:
        with running(agent, "--memory", "256MiB", "--compute", "10", code=BUSY) as (_, pid):
            time.sleep(3)  # settle: the duty cycle holds the child near 10 %
            filler = _fill(small_disk)
            before_full = time.monotonic()
            status, problem, ctype = agent.api(
                "POST", "/v1/slices", {"memory_mib": 1024, "compute_pct": 10}
            )
            assert status == 507 and ctype == "application/problem+json", problem
            assert (
                "disk is full" in problem["detail"] and "nothing was changed" in problem["detail"]
            )
            health = _health(agent)
            assert health is not None and health["status"] == "degraded"
            assert any("ledger cannot commit" in r for r in health["reasons"])  # type: ignore[union-attr]
            # Enforcement needs no ledger write: the busy child stays held near its 10 %.
            (got,) = shares([pid], 3.0)
            assert got < 25, got
            slices = agent.api("GET", "/v1/slices")[1]
            assert len(slices) == 1 and slices[0]["usage"]["throttled"] is True
            # Stopped on a full disk, the agent starts on it again and serves reads.
            assert agent.stop() == 0
            agent.start()
            assert [s["id"] for s in agent.api("GET", "/v1/slices")[1]] == [slices[0]["id"]]
            restarted = _health(agent)
            assert restarted is not None and restarted["status"] == "degraded", restarted
            assert agent.api("POST", "/v1/slices", {"memory_mib": 1, "compute_pct": 1})[0] == 507
            assert "Traceback" not in agent.log()
            # Space returns: writes and health come back by themselves.
            filler.unlink()
            freed = time.monotonic()
            wait_for(lambda: (h := _health(agent)) and h["status"] == "ok", 10)
            recovery_s = time.monotonic() - freed
            assert recovery_s < 5  # the next write probe (every 2 s)
            status, _, _ = agent.api("POST", "/v1/slices", {"memory_mib": 1024, "compute_pct": 10})
            assert status == 201
            print(f"full for {freed - before_full:.1f}s; recovered in {recovery_s:.2f}s")
    finally:
        agent.cleanup()


# -- one peer cannot silence another's lending -------------------------------------------


def test_oversized_qos1_messages_cannot_wedge_the_inbox(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    from agent.bus.topics import Topics

    root = topic_root()
    agent_factory(  # the lender
        node="lender", config=mqtt_config(broker, root, "lender", keepalive_s=30)
    )
    victim = agent_factory(
        node="victim", config=mqtt_config(broker, root, "victim", keepalive_s=30)
    )
    wait_for(lambda: any(p["placeable"] for p in victim.api("GET", "/v1/pool")[1]), 10)
    inbox = Topics(root, "z", "victim").reply_to("victim")
    big = b"x" * (700 * 1024)  # over the 256 KiB the agent accepts (and over any cap it sets)
    client = sim_peers.connect(broker)
    try:
        for info in [client.publish(inbox, big, qos=1) for _ in range(40)]:
            info.wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()
    for attempt in range(3):  # each borrow and return is a QoS 1 round trip to the inbox
        lease = victim.xpuctl(
            "--json", "borrow", "--node", "lender", "--memory", "1GiB", "--compute", "10"
        )
        assert lease.returncode == 0, (attempt, lease.stderr)
        returned = victim.xpuctl("return", json.loads(lease.stdout)["slice_id"])
        assert returned.returncode == 0, returned.stderr
    dropped = victim.api("GET", "/v1/node")[1]["mqtt"]["dropped"]
    assert dropped["oversized"] >= 1, dropped
