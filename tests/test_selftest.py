"""``xpu-agent selftest`` against a real agent on mock cards: every check passes where the
agent enforces, the memory check fails where it does not act, and a node without an
NVIDIA card says so. (On an NVIDIA node the same command probes with CUDA itself.)"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from tests.harness import PY, REPO, AgentProcess, agent_env

TWO = '[{ model = "MockA100-80G", memory_mib = 81920, count = 2 }]'


def selftest(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "agent.cli.daemon_main", "selftest", "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
    )


def test_selftest_passes_where_the_agent_enforces(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(mock_devices=TWO)
    result = selftest(agent, "--device", "mock-1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("xpu-agent selftest on mock-1")
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["PASS", "rung"],
        ["PASS", "memory"],
        ["PASS", "compute"],
        ["PASS", "cleanup"],
    ]
    assert agent.api("GET", "/v1/slices")[1] == []  # nothing left behind
    missing = selftest(agent)
    assert missing.returncode == 2 and "no NVIDIA card on this node" in missing.stderr


def test_selftest_fails_where_memory_is_not_acted_on(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(config='[enforcement]\nmemory_action = "report"\n')
    result = selftest(agent, "--device", "mock-0", "--checks", "memory", "--within", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  memory" in result.stdout and "not acted on in 2 s (sampling)" in result.stdout
    assert "PASS  cleanup" in result.stdout
