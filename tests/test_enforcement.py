"""Enforcement on real processes (DESIGN.md §5), as a user meets it: a real daemon on mock
cards, real ``xpuctl run`` children, and shares measured from /proc, never from the agent."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.enforce_support import (
    BUSY,
    SLEEP,
    cpu_priority,
    cpu_s,
    events,
    finish,
    gone,
    holding,
    proc_state,
    reconfigure,
    running,
    shares,
    slice_usage,
)
from tests.harness import AgentProcess, json_out, spawn, wait_for

__all__ = ["cpu_priority"]  # a fixture, used by name below


# -- memory ---------------------------------------------------------------------------------


def test_memory_hog_is_terminated_and_a_process_within_its_limit_is_untouched(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(config='[enforcement]\nmemory_action = "term"\ngrace_s = 2\n')
    memory = ("--memory", "512MiB", "--compute", "10")
    started = time.monotonic()
    with running(agent, *memory, "--device", "mock-1", code=holding(300)) as (fits, fits_pid):
        assert fits.stdout is not None and fits.stdout.readline() and fits.stdout.readline()
        with running(agent, *memory, "--device", "mock-0", code=holding(600)) as (hog, hog_pid):
            assert hog.stdout is not None
            crossing_at = float(hog.stdout.readline())
            wait_for(lambda: gone(hog_pid), 10, interval_s=0.005)
            reaction_s = time.time() - crossing_at
            status = hog.wait(10)
        # xpuctl run exits with the child's status: 128 + SIGTERM.
        assert status == 128 + signal.SIGTERM
        assert reaction_s < 2.5, f"acted after {reaction_s:.2f}s (interval 0.5s)"
        (act,) = [e for e in events(agent, "enforce.memory") if e["data"]["pid"] == hog_pid]
        assert act["data"]["action"] == "term" and act["data"]["limit_mib"] == 512
        assert 512 < act["data"]["used_mib"] < 700 and not act["data"]["escalated"]
        # The one within its limit: untouched for 10 s, never stopped, no action on it.
        while time.monotonic() - started < 10:
            assert fits.poll() is None and proc_state(fits_pid) != "T"
            time.sleep(0.2)
        assert not any(e["data"].get("pid") == fits_pid for e in events(agent, "enforce.memory"))
        (usage,) = slice_usage(agent).values()
        assert 280 < usage["memory_used_mib"] < 360
        assert usage["throttled"] is False and usage["last_action"] is None


def test_memory_report_then_kill_after_reload(agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory(config='[enforcement]\nmemory_action = "report"\n')
    with running(agent, "--memory", "512MiB", "--compute", "10", code=holding(600)) as (
        hog,
        hog_pid,
    ):
        assert hog.stdout is not None and hog.stdout.readline()
        wait_for(lambda: events(agent, "enforce.memory"), 5)
        time.sleep(1.5)  # three more samples: still over, reported once, left running
        (report,) = events(agent, "enforce.memory")
        assert report["data"]["action"] == "report" and report["data"]["pid"] == hog_pid
        assert hog.poll() is None
        usage = next(iter(slice_usage(agent).values()))
        assert usage["last_action"] == f"memory report pid {hog_pid}"
        reconfigure(agent, 'memory_action = "report"', 'memory_action = "kill"')
        assert hog.wait(5) == 128 + signal.SIGKILL
        assert events(agent, "enforce.memory")[-1]["data"]["action"] == "kill"


# -- compute --------------------------------------------------------------------------------


def test_two_busy_slices_on_one_card_get_30_and_70_percent(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    agent = agent_factory()  # default policy: work-conserving
    small = ("--memory", "256MiB", "--device", "mock-0")
    with (
        running(agent, *small, "--compute", "30", code=BUSY) as (_, low),
        running(agent, *small, "--compute", "70", code=BUSY) as (_, high),
    ):
        time.sleep(3)  # settle: a few samples
        got_low, got_high = shares([low, high], 10.0)
        assert abs(got_low - 30) <= 7 and abs(got_high - 70) <= 7, (got_low, got_high)
        usage = slice_usage(agent)
        assert all(
            u["throttled"] and u["last_action"] == "compute throttle" for u in usage.values()
        )
        table = agent.xpuctl("devices").stdout
        assert "COMPUTE USED/QUOTA" in table and "compute throttle" in table
        assert agent.xpuctl("slices").stdout.count("active (throttled)") == 2
        assert agent.xpuctl("slices", "--wide").stdout.count(" yes ") == 2


def test_alone_a_slice_may_use_idle_compute_unless_the_policy_is_hard(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    agent = agent_factory()
    with running(agent, "--memory", "256MiB", "--compute", "30", code=BUSY) as (_, pid):
        time.sleep(1.5)
        (alone,) = shares([pid], 4.0)
        assert alone > 80, alone
        reconfigure(agent, "[node]", '[enforcement]\ncompute_policy = "hard"\n[node]')
        time.sleep(3)
        (capped,) = shares([pid], 6.0)
        assert abs(capped - 30) <= 7, capped
        (usage,) = slice_usage(agent).values()
        assert usage["throttled"] is True


# -- safety ---------------------------------------------------------------------------------


def test_a_process_left_stopped_by_a_crash_runs_again_after_restart(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    agent = agent_factory(config='[enforcement]\ncompute_policy = "hard"\n')
    with running(agent, "--memory", "256MiB", "--compute", "10", code=BUSY) as (_, pid):
        # Held to 10 %, the child is stopped 90 % of the time: kill -9 the agent then.
        for _attempt in range(10):
            wait_for(lambda: proc_state(pid) == "T", 5, interval_s=0.002)
            agent.kill9()
            if proc_state(pid) == "T":
                break
            agent.start()
        else:
            pytest.fail("never caught the child stopped")
        time.sleep(0.5)
        assert proc_state(pid) == "T"  # nobody else resumes it
        # Restart with enforcement off: only crash recovery can resume it.
        reconfigure_file = agent.config_path.read_text().replace('"hard"', '"off"')
        agent.config_path.write_text(reconfigure_file)
        agent.start()
        assert proc_state(pid) != "T"
        (ran,) = shares([pid], 1.0)
        assert ran > 50, ran
        (recovered,) = events(agent, "enforce.recovered")
        assert pid in recovered["data"]["pids"]


def test_a_clean_stop_resumes_what_it_holds_and_leaves_nothing_to_recover(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    agent = agent_factory(config='[enforcement]\ncompute_policy = "hard"\n')
    with running(agent, "--memory", "256MiB", "--compute", "10", code=BUSY) as (_, pid):
        wait_for(lambda: proc_state(pid) == "T", 5, interval_s=0.002)
        assert agent.stop() == 0  # SIGTERM
        assert proc_state(pid) != "T"
        (ran,) = shares([pid], 1.0)
        assert ran > 50, ran
        agent.start()
        assert events(agent, "enforce.recovered") == []


def test_unsliced_processes_are_never_signalled_and_release_resumes(
    agent_factory: Callable[..., AgentProcess], cpu_priority: None
) -> None:
    agent = agent_factory(config='[enforcement]\ncompute_policy = "hard"\n')
    loose = spawn(BUSY, env={"XPU_DEVICE": "mock-0"}, stdout=subprocess.PIPE)
    held = spawn(BUSY, stdout=subprocess.PIPE)
    try:
        slice_ = json_out(
            agent.xpuctl(
                "--json", "alloc", "--memory", "256MiB", "--compute", "10", "--device", "mock-0"
            )
        )
        assert agent.xpuctl("attach", slice_["id"], "--pid", str(held.pid)).returncode == 0
        wait_for(lambda: slice_usage(agent)[slice_["id"]].get("throttled"), 5)
        # Over two seconds the attached process is held; the unsliced one is never stopped.
        before = cpu_s(loose.pid)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert proc_state(loose.pid) != "T"
            time.sleep(0.005)
        assert cpu_s(loose.pid) - before > 1.4
        (device,) = [d for d in json_out(agent.xpuctl("--json", "devices")) if d["id"] == "mock-0"]
        assert loose.pid in device["unsliced_pids"]
        (report,) = [e for e in events(agent, "enforce.unsliced") if e["data"]["pid"] == loose.pid]
        assert report["data"]["action"] == "report"
        # Free the slice while its process is stopped: it runs again at once.
        wait_for(lambda: proc_state(held.pid) == "T", 5, interval_s=0.002)
        assert agent.xpuctl("free", slice_["id"]).returncode == 0
        wait_for(lambda: proc_state(held.pid) != "T", 0.5, interval_s=0.01)
        (ran,) = shares([held.pid], 1.0)
        assert ran > 50, ran
    finally:
        finish(loose)
        finish(held)


def test_unsliced_kill_when_configured_spares_sliced_processes(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(config='[enforcement]\nunsliced = "kill"\n')
    with running(
        agent, "--memory", "256MiB", "--compute", "10", "--device", "mock-0", code=SLEEP
    ) as (
        run,
        sliced,
    ):
        loose = spawn(SLEEP, env={"XPU_DEVICE": "mock-0"}, stdout=subprocess.PIPE)
        try:
            assert loose.wait(5) == -signal.SIGKILL
            (kill,) = events(agent, "enforce.unsliced")
            assert kill["data"] == {
                "action": "kill",
                "device": "mock-0",
                "pid": loose.pid,
                "memory_mib": kill["data"]["memory_mib"],
            }
            assert run.poll() is None and proc_state(sliced) != "Z"
        finally:
            finish(loose)
