"""Schemathesis against the agent's own OpenAPI document: every route, bounded in time,
failing on any 5xx the document does not promise and on any contract violation.

Schemathesis speaks HTTP over TCP, so a small TCP → Unix socket relay stands in front of
the real agent's socket (the caller the agent sees is this test process). Enforcement is
switched to report-only: the fuzzer binds arbitrary pids, and nothing may be stopped or
killed for it. ``follow=1`` on ``/v1/events`` streams until the client leaves, so the
document handed to schemathesis leaves that one parameter out; its other inputs are fuzzed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import AgentProcess
from tests.relay import tcp_relay

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
#: Seconds of fuzzing (examples, coverage, fuzzing and stateful phases share it).
BUDGET_S = int(os.environ.get("XPU_FUZZ_SECONDS", "60"))

# use_after_free does not apply: a released slice stays readable (GET answers it with
# state "released"; the history is part of the API), by design.
EXCLUDED = "use_after_free"
FUZZ_CONFIG = (
    "[slicing]\nmax_slices_per_device = 1000\n"
    '[enforcement]\nmemory_action = "report"\ncompute_policy = "off"\n'
)
# What counts as a server error: anything 5xx but 503 and 507, which the document
# promises for "the bus / the disk cannot now" (a standalone node has no bus to borrow
# through). A well-formed request may still not fit (409) or name an unknown id (404).
CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503", "507"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "403", "404", "409", "503", "507"]
"""


@pytest.fixture
def relay(agent_factory) -> Iterator[tuple[AgentProcess, int]]:  # type: ignore[no-untyped-def]
    agent = agent_factory(config=FUZZ_CONFIG)
    with tcp_relay(agent.socket) as port:
        yield agent, port


def schemathesis_run(
    agent: AgentProcess, port: int, workdir: Path, seconds: int
) -> subprocess.CompletedProcess[str]:
    """One bounded schemathesis run against the agent behind the relay."""
    status, doc, _ = agent.api("GET", "/v1/openapi.json")
    assert status == 200
    events = doc["paths"]["/v1/events"]["get"]
    events["parameters"] = [p for p in events["parameters"] if p["name"] != "follow"]
    schema = workdir / "openapi.json"
    schema.write_text(json.dumps(doc))
    (workdir / "schemathesis.toml").write_text(CONFIG)
    assert SCHEMATHESIS is not None
    return subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            str(schema),
            "--url",
            f"http://127.0.0.1:{port}",
            "--checks",
            "all",
            "--exclude-checks",
            EXCLUDED,
            "--max-time",
            str(seconds),
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--seed",
            "42",
            "--suppress-health-check",
            "all",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 150,
        check=False,
        cwd=workdir,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is in the test extra and the lock")
@pytest.mark.timeout(BUDGET_S + 180)
def test_schemathesis_finds_no_server_error_and_no_contract_violation(
    relay: tuple[AgentProcess, int], tmp_path: Path
) -> None:
    agent, port = relay
    run = schemathesis_run(agent, port, tmp_path, BUDGET_S)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    assert "Traceback" not in agent.log(), agent.log()[-4000:]
