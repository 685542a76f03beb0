"""Signals reach exactly the verified process (or the group it leads), never anyone else."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from agent.enforce import actions
from agent.enforce.actions import Target
from agent.model import ProcessRef
from tests.enforce_support import finish
from tests.harness import PY, spawn, wait_for

SLEEP = "import time\ntime.sleep(60)\n"
# A group leader with a child in its group: prints the child's pid.
FAMILY = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def ref_of(pid: int) -> ProcessRef:
    return ProcessRef(pid, psutil.Process(pid).create_time())


def test_a_recycled_pid_is_never_signalled() -> None:
    child = spawn(SLEEP)
    try:
        stale = ProcessRef(child.pid, psutil.Process(child.pid).create_time() - 100.0)
        assert Target.open(stale) is None
        assert not actions.signal_once(stale, signal.SIGKILL)
        assert child.poll() is None
    finally:
        finish(child)


def test_the_agent_itself_and_pid_1_are_never_signalled() -> None:
    assert Target.open(ref_of(os.getpid())) is None
    assert Target.open(ProcessRef(1, psutil.Process(1).create_time())) is None


def test_a_plain_child_is_stopped_alone_not_our_group() -> None:
    child = spawn(SLEEP)
    target = Target.open(ref_of(child.pid))
    try:
        assert target is not None and not target.group
        assert target.stop()
        wait_for(lambda: state(child.pid) == "T", 2)
        assert state(os.getpid()) != "T"
        assert target.resume()
        wait_for(lambda: state(child.pid) != "T", 2)
    finally:
        if target is not None:
            target.close()
        finish(child)


def test_a_group_leader_is_stopped_with_its_group() -> None:
    leader = subprocess.Popen([PY, "-c", FAMILY], stdout=subprocess.PIPE, process_group=0)
    target = None
    try:
        assert leader.stdout is not None
        grandchild = int(leader.stdout.readline())
        target = Target.open(ref_of(leader.pid))
        assert target is not None and target.group
        target.stop()
        wait_for(lambda: state(leader.pid) == "T" and state(grandchild) == "T", 2)
        target.resume()
        wait_for(lambda: state(leader.pid) != "T" and state(grandchild) != "T", 2)
    finally:
        if target is not None:
            target.close()
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
        finish(leader)


def test_a_session_leader_is_stopped_alone() -> None:
    """A login shell leads its group and its session: never stop it as a group."""
    child = subprocess.Popen([PY, "-c", SLEEP], start_new_session=True)
    target = Target.open(ref_of(child.pid))
    try:
        assert target is not None and not target.group
    finally:
        if target is not None:
            target.close()
        finish(child)


def test_signals_to_an_exited_process_report_false() -> None:
    child = spawn(SLEEP)
    target = Target.open(ref_of(child.pid))
    assert target is not None
    finish(child)
    assert not target.alive()
    assert not target.stop() and not target.resume()
    target.close()


def test_term_then_continue_reaches_a_stopped_process() -> None:
    child = spawn(SLEEP)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: state(child.pid) == "T", 2)
        started = time.monotonic()
        assert actions.signal_once(ref_of(child.pid), signal.SIGTERM, then_continue=True)
        assert child.wait(5) == -signal.SIGTERM
        assert time.monotonic() - started < 2
    finally:
        finish(child)


def test_resume_once_continues_a_stopped_process() -> None:
    child = spawn(SLEEP)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: state(child.pid) == "T", 2)
        assert actions.resume_once(ref_of(child.pid))
        wait_for(lambda: state(child.pid) != "T", 2)
    finally:
        finish(child)
