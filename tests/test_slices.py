"""Slices as a user meets them: xpuctl alloc/free/slices/run/attach/events and the API."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

from tests.harness import PY, AgentProcess, json_out, spawn, wait_for, xpuctl, xpuctl_popen


def alloc(agent: AgentProcess, *args: str) -> dict[str, object]:
    return json_out(agent.xpuctl("--json", "alloc", *args))  # type: ignore[no-any-return]


def test_alloc_prints_slice_with_environment(agent: AgentProcess) -> None:
    result = agent.xpuctl("alloc", "--memory", "8GiB", "--compute", "30", "--label", "team=ml")
    assert result.returncode == 0, result.stderr
    assert "XPU_SLICE_ID=s-" in result.stdout and "XPU_MEMORY_LIMIT_MIB=8192" in result.stdout
    slices = json_out(agent.xpuctl("--json", "slices"))
    assert len(slices) == 1
    s = slices[0]
    assert s["memory_mib"] == 8192 and s["compute_pct"] == 30 and s["labels"] == {"team": "ml"}
    env = s["env"]
    assert env["XPU_DEVICE"] == s["device"]
    assert env["XPU_COMPUTE_PCT"] == "30"
    assert env["XPU_MEMORY_FRACTION"] == "0.1"
    assert len(env["XPU_SLICE_TOKEN"]) >= 24


def test_compute_rounds_up_to_step_and_device_pin(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "1024", "--compute", "25%", "--device", "mock-3")
    assert s["compute_pct"] == 30 and s["device"] == "mock-3"


def test_free_releases_and_history_keeps_it(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "1GiB", "--compute", "10")
    freed = agent.xpuctl("free", str(s["id"]))
    assert freed.returncode == 0 and f"released {s['id']}" in freed.stdout
    assert json_out(agent.xpuctl("--json", "slices")) == []
    history = json_out(agent.xpuctl("--json", "slices", "--all"))
    assert [(h["id"], h["state"]) for h in history] == [(s["id"], "released")]
    # A retried DELETE (the first answer was lost) is answered with the ended slice.
    again = agent.xpuctl("--json", "free", str(s["id"]))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["state"] == "released"
    status, _, _ = agent.api("DELETE", "/v1/slices/s-000000000000")
    assert status == 404  # an id that never was is still unknown


def test_request_id_is_idempotent_per_owner(agent: AgentProcess) -> None:
    body = {"memory_mib": 2048, "compute_pct": 20, "request_id": "job-42"}
    first = agent.api("POST", "/v1/slices", body)
    second = agent.api("POST", "/v1/slices", body)
    assert first[0] == 201 and second[0] == 200
    assert first[1]["id"] == second[1]["id"]
    assert len(agent.api("GET", "/v1/slices")[1]) == 1
    # Replayed after the slice was released: a 409 naming it, neither it nor a new one.
    assert agent.api("DELETE", f"/v1/slices/{first[1]['id']}")[0] == 200
    status, problem, _ = agent.api("POST", "/v1/slices", body)
    assert status == 409, problem
    assert problem["extra"]["slice_id"] == first[1]["id"] and first[1]["id"] in problem["detail"]
    assert problem["extra"]["state"] == "released"
    assert agent.api("GET", "/v1/slices")[1] == []


def test_does_not_fit_is_409_naming_most_room(agent: AgentProcess) -> None:
    for device in ("mock-0", "mock-1", "mock-2"):
        alloc(agent, "--memory", "70GiB", "--compute", "90", "--device", device)
    status, problem, ctype = agent.api(
        "POST", "/v1/slices", {"memory_mib": 40960, "compute_pct": 50}
    )
    assert status == 201  # mock-3 is still empty
    status, problem, ctype = agent.api(
        "POST", "/v1/slices", {"memory_mib": 50000, "compute_pct": 60}
    )
    assert status == 409 and ctype == "application/problem+json"
    assert problem["extra"]["most_room"]["device"] == "mock-3"
    assert "most room: mock-3" in problem["detail"]
    cli = agent.xpuctl("alloc", "--memory", "50000", "--compute", "60")
    assert cli.returncode == 5 and "does not fit" in cli.stderr.lower()


def test_max_slices_per_device(agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory(
        config="[slicing]\nmax_slices_per_device = 3\n",
        mock_devices='[{ model = "M", memory_mib = 8192, count = 1 }]',
    )
    for _ in range(3):
        alloc(agent, "--memory", "100", "--compute", "10")
    status, problem, _ = agent.api("POST", "/v1/slices", {"memory_mib": 100, "compute_pct": 10})
    assert status == 409 and "0 slot" in problem["detail"]


def test_fragmentation_aware_placement_keeps_a_whole_card(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    """Two half-card requests go to the same card, leaving the other whole for a full one."""
    agent = agent_factory(mock_devices='[{ model = "M", memory_mib = 16384, count = 2 }]')
    a = alloc(agent, "--memory", "8GiB", "--compute", "50")
    b = alloc(agent, "--memory", "8GiB", "--compute", "50")
    assert a["device"] == b["device"]
    whole = alloc(agent, "--memory", "16GiB", "--compute", "100")
    assert whole["device"] != a["device"]


def test_ttl_expiry_survives_restart(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "512MiB", "--compute", "10", "--ttl", "3s")
    agent.stop()
    agent.start()

    def expired() -> bool:
        history = json_out(agent.xpuctl("--json", "slices", "--all"))
        return any(h["id"] == s["id"] and h["state"] == "expired" for h in history)

    wait_for(expired, 10)
    events = json_out(agent.xpuctl("--json", "events"))
    assert any(e["kind"] == "slice.expired" and e["slice_id"] == s["id"] for e in events)


def test_slices_survive_a_restart(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "2GiB", "--compute", "20")
    agent.stop()
    agent.start()
    assert [x["id"] for x in json_out(agent.xpuctl("--json", "slices"))] == [s["id"]]


def test_run_prints_env_in_child_releases_and_passes_exit_code(agent: AgentProcess) -> None:
    code = (
        "import os, sys; print('SLICE', os.environ['XPU_SLICE_ID'], "
        "os.environ['XPU_MEMORY_LIMIT_MIB'], os.environ['XPU_DEVICE']); sys.exit(7)"
    )
    result = agent.xpuctl("run", "--memory", "1GiB", "--compute", "20", "--", PY, "-c", code)
    assert result.returncode == 7, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("SLICE"))
    _, slice_id, limit, device = line.split()
    assert limit == "1024" and device.startswith("mock-")
    assert json_out(agent.xpuctl("--json", "slices")) == []
    history = json_out(agent.xpuctl("--json", "slices", "--all"))
    assert [(h["id"], h["state"]) for h in history] == [(slice_id, "released")]
    events = [
        e["kind"] for e in json_out(agent.xpuctl("--json", "events")) if e["slice_id"] == slice_id
    ]
    assert events[0] == "slice.allocated" and "process.bound" in events
    assert events[-1] == "slice.released"


def test_run_reuses_slice_and_keeps_it(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "1GiB", "--compute", "10")
    result = agent.xpuctl(
        "run",
        "--slice",
        str(s["id"]),
        "--",
        PY,
        "-c",
        "import os; print(os.environ['XPU_SLICE_ID'])",
    )
    assert result.returncode == 0 and result.stdout.strip() == s["id"]
    assert [x["id"] for x in json_out(agent.xpuctl("--json", "slices"))] == [s["id"]]


def test_run_forwards_sigterm_and_reports_signal(agent: AgentProcess) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got term', flush=True), "
        "sys.exit(3)))\nprint('started', flush=True)\ntime.sleep(30)\n"
    )
    proc = xpuctl_popen(
        agent.socket,
        "run",
        "--memory",
        "512",
        "--compute",
        "10",
        "--",
        PY,
        "-c",
        script,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    assert "got term" in out and proc.returncode == 3
    assert json_out(agent.xpuctl("--json", "slices")) == []


def test_run_survives_agent_death_and_says_so(agent: AgentProcess) -> None:
    proc = xpuctl_popen(
        agent.socket,
        "run",
        "--memory",
        "512",
        "--compute",
        "10",
        "--",
        PY,
        "-c",
        "import time; print('up', flush=True); time.sleep(5); print('done', flush=True)",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    agent.kill9()
    out, err = proc.communicate(timeout=30)
    assert "done" in out and proc.returncode == 0
    assert "stopped answering" in err and "was not released" in err


def test_attach_binds_own_process_and_token_binds_automatically(agent: AgentProcess) -> None:
    s = alloc(agent, "--memory", "1GiB", "--compute", "10")
    child = spawn("import time; time.sleep(30)")
    try:
        result = agent.xpuctl("attach", str(s["id"]), "--pid", str(child.pid))
        assert result.returncode == 0, result.stderr
        got = json_out(agent.xpuctl("--json", "slices"))[0]
        assert [p["pid"] for p in got["processes"]] == [child.pid]
    finally:
        child.kill()
        child.wait()
    # Exited processes are forgotten.
    wait_for(lambda: json_out(agent.xpuctl("--json", "slices"))[0]["processes"] == [], 10)
    env = s["env"]
    assert isinstance(env, dict)
    token_child = spawn("import time; time.sleep(30)", env=env)
    try:

        def bound() -> bool:
            procs = json_out(agent.xpuctl("--json", "slices"))[0]["processes"]
            return [p["pid"] for p in procs] == [token_child.pid]

        wait_for(bound, 10)
        events = json_out(agent.xpuctl("--json", "events"))
        assert any(e["kind"] == "process.bound" and e["data"].get("how") == "token" for e in events)
    finally:
        token_child.kill()
        token_child.wait()
    # A wrong token binds nothing.
    bad = spawn("import time; time.sleep(30)", env={**env, "XPU_SLICE_TOKEN": "forged"})
    try:
        time.sleep(1.5)
        procs = json_out(agent.xpuctl("--json", "slices"))[0]["processes"]
        assert bad.pid not in [p["pid"] for p in procs]
    finally:
        bad.kill()
        bad.wait()


def test_events_follow_streams_new_events(agent: AgentProcess) -> None:
    proc = xpuctl_popen(
        agent.socket,
        "--json",
        "events",
        "--follow",
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.8)
        s = alloc(agent, "--memory", "1GiB", "--compute", "10")
        assert proc.stdout is not None
        # Other events (enforcement reports about unrelated processes) may come first.
        for _ in range(50):
            event = json.loads(proc.stdout.readline())
            if event["slice_id"] == s["id"]:
                break
        assert event["kind"] == "slice.allocated" and event["slice_id"] == s["id"]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_run_without_command_is_usage_error(agent: AgentProcess) -> None:
    result = agent.xpuctl("run", "--memory", "1GiB", "--compute", "10")
    assert result.returncode == 2


def test_xpuctl_help_lists_commands() -> None:
    out = xpuctl("--help")
    assert out.returncode == 0
    for command in (
        "status",
        "devices",
        "slices",
        "alloc",
        "free",
        "run",
        "attach",
        "pool",
        "place",
        "borrow",
        "events",
    ):
        assert command in out.stdout
