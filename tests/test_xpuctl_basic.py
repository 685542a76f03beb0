"""xpuctl as a user meets it: tables, --json, errors and exit codes."""

from __future__ import annotations

import time

from tests.harness import AgentProcess, json_out, short_tmpdir, xpuctl


def test_status_table_and_json(agent: AgentProcess) -> None:
    table = agent.xpuctl("status")
    assert table.returncode == 0, table.stderr
    assert "test-node" in table.stdout and "mock" in table.stdout
    assert "standalone" in table.stdout and "4/4 devices ok" in table.stdout
    node = json_out(agent.xpuctl("--json", "status"))
    assert node["node"] == "test-node" and node["capacity"]["compute_pct"] == 400


def test_devices_table_and_json(agent: AgentProcess) -> None:
    table = agent.xpuctl("devices")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "MODEL", "MEMORY"]
    assert sum(1 for line in lines if line.startswith("mock-")) == 4
    assert "80.0GiB" in table.stdout
    devices = json_out(agent.xpuctl("--json", "devices"))
    assert [d["id"] for d in devices] == ["mock-0", "mock-1", "mock-2", "mock-3"]


def test_not_running_is_one_line_exit_1() -> None:
    missing = short_tmpdir() / "agent.sock"
    result = xpuctl("status", socket_path=missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not running" in result.stderr and str(missing) in result.stderr


def test_socket_from_environment(agent: AgentProcess) -> None:
    result = xpuctl("--json", "status", env={"XPU_AGENT_SOCKET": str(agent.socket)})
    assert json_out(result)["node"] == "test-node"


def test_bad_values_name_the_option_exit_2(agent: AgentProcess) -> None:
    for args, option in [
        (["alloc", "--memory", "8XB", "--compute", "30"], "--memory"),
        (["alloc", "--memory", "8GiB", "--compute", "130"], "--compute"),
        (["alloc", "--memory", "8GiB", "--compute", "30", "--ttl", "soon"], "--ttl"),
    ]:
        result = agent.xpuctl(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and option in lines[0], result.stderr


def test_xpuctl_starts_light() -> None:
    """xpuctl must not import the daemon's internals (aiohttp, the ledger, backends)."""
    code = (
        "import sys, agent.cli.xpuctl\n"
        "heavy = [m for m in ('aiohttp', 'agent.daemon', 'agent.ledger.store', 'psutil',"
        " 'agent.core.service') if m in sys.modules]\n"
        "print(heavy)"
    )
    import subprocess
    import sys

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert time.monotonic() - start < 5


def test_problems_arrive_as_their_own_classes_with_their_exit_codes() -> None:
    from agent.client import http

    doc = b'{"title": "Not found", "detail": "no slice s-1"}'
    cases = {400: http.BadRequest, 403: http.NotAllowed, 404: http.NotFound, 409: http.DoesNotFit}
    for status, kind in cases.items():
        problem = http.AgentClient._problem(status, doc)
        assert type(problem) is kind and isinstance(problem, http.ApiError)
        assert problem.exit_code == {400: 2, 403: 3, 404: 4, 409: 5}[status]
    other = http.AgentClient._problem(503, b"not json")
    assert type(other) is http.ApiError and other.exit_code == 1 and "HTTP 503" in str(other)
