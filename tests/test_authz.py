"""Who may do what, with real unprivileged users created by the test (DESIGN.md §3).

Identities come from SO_PEERCRED: each xpuctl runs as the user through setpriv.
Needs root (to create users and switch to them); as another user it skips and says so.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.harness import AgentProcess, json_out

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become users")

GROUP = "xa-xpu-users"
ADMINS = "xa-xpu-admins"


@dataclass(frozen=True)
class User:
    name: str
    uid: int


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: list[str]) -> User:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
    subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)
    return User(name, pwd.getpwnam(name).pw_uid)


@pytest.fixture(scope="module")
def users() -> dict[str, User]:
    ensure_group(GROUP)
    ensure_group(ADMINS)
    return {
        "alice": ensure_user("xa-alice", [GROUP]),
        "bob": ensure_user("xa-bob", [GROUP]),
        "carol": ensure_user("xa-carol", [GROUP, ADMINS]),
    }


@pytest.fixture
def shared_agent(
    agent_factory: Callable[..., AgentProcess], users: dict[str, User]
) -> AgentProcess:
    agent = agent_factory(
        start=False,
        config=f'[api]\nsocket_group = "{GROUP}"\nadmin_group = "{ADMINS}"\n',
    )
    os.chmod(agent.dir, 0o755)  # let the users reach the socket; its own mode decides
    agent.start()
    return agent


def as_user(agent: AgentProcess, user: User, *args: str) -> subprocess.CompletedProcess[str]:
    """xpuctl as ``user`` with their supplementary groups (setpriv --init-groups)."""
    from tests.harness import PY, REPO, agent_env

    cmd = [
        "setpriv",
        f"--reuid={user.uid}",
        f"--regid={pwd.getpwuid(user.uid).pw_gid}",
        "--init-groups",
        PY,
        "-m",
        "agent.cli.xpuctl",
        "--socket",
        str(agent.socket),
        *args,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/tmp",
        env={**agent_env(), "PYTHONPATH": str(REPO)},
    )


def sleeper(user: User) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "setpriv",
            f"--reuid={user.uid}",
            f"--regid={pwd.getpwuid(user.uid).pw_gid}",
            "--clear-groups",
            "sleep",
            "60",
        ]
    )


def test_socket_mode_and_group(shared_agent: AgentProcess) -> None:
    st = os.stat(shared_agent.socket)
    assert oct(st.st_mode & 0o777) == "0o660"
    assert st.st_gid == grp.getgrnam(GROUP).gr_gid


def test_outsider_cannot_reach_socket(shared_agent: AgentProcess) -> None:
    outsider = ensure_user("xa-mallory", [ensure_group("xa-other") and "xa-other"])
    result = as_user(shared_agent, outsider, "status")
    assert result.returncode == 1
    assert "permission denied" in result.stderr.lower()


def test_authorisation_matrix(shared_agent: AgentProcess, users: dict[str, User]) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    mine = json_out(
        as_user(shared_agent, alice, "--json", "alloc", "--memory", "1GiB", "--compute", "10")
    )
    assert mine["owner_uid"] == alice.uid
    theirs = json_out(
        as_user(shared_agent, bob, "--json", "alloc", "--memory", "1GiB", "--compute", "10")
    )
    assert theirs["owner_uid"] == bob.uid

    # Everyone sees every slice, but only the owner sees the env (it carries the token).
    seen = {s["id"]: s for s in json_out(as_user(shared_agent, alice, "--json", "slices"))}
    assert set(seen) == {mine["id"], theirs["id"]}
    assert seen[mine["id"]]["env"]["XPU_SLICE_TOKEN"] == mine["env"]["XPU_SLICE_TOKEN"]
    assert seen[theirs["id"]]["env"] is None
    assert as_user(shared_agent, alice, "--json", "devices").returncode == 0

    alice_proc, bob_proc = sleeper(alice), sleeper(bob)
    try:
        # alice binds her own process to her slice: allowed.
        ok = as_user(shared_agent, alice, "attach", mine["id"], "--pid", str(alice_proc.pid))
        assert ok.returncode == 0, ok.stderr
        # alice binds bob's process to her slice: forbidden (exit 3).
        denied = as_user(shared_agent, alice, "attach", mine["id"], "--pid", str(bob_proc.pid))
        assert denied.returncode == 3 and "may not bind process" in denied.stderr
        # alice binds her process to bob's slice: forbidden.
        denied = as_user(shared_agent, alice, "attach", theirs["id"], "--pid", str(alice_proc.pid))
        assert denied.returncode == 3
        # alice releases bob's slice: forbidden; bob's slice is untouched.
        denied = as_user(shared_agent, alice, "free", theirs["id"])
        assert denied.returncode == 3 and "may not release" in denied.stderr
        # alice cannot unbind from bob's slice either (API level).
        # carol (admin group) may release bob's slice and bind anyone's process.
        assert (
            as_user(
                shared_agent, carol, "attach", theirs["id"], "--pid", str(bob_proc.pid)
            ).returncode
            == 0
        )
        assert as_user(shared_agent, carol, "free", theirs["id"]).returncode == 0
        # root may do anything.
        assert shared_agent.xpuctl("free", mine["id"]).returncode == 0
    finally:
        for proc in (alice_proc, bob_proc):
            proc.kill()
            proc.wait()


def test_owner_comes_from_peercred_not_the_body(
    shared_agent: AgentProcess, users: dict[str, User]
) -> None:
    """A body cannot claim another owner: unknown fields are refused."""
    alice = users["alice"]
    result = as_user(shared_agent, alice, "--json", "alloc", "--memory", "1GiB", "--compute", "10")
    created = json_out(result)
    assert created["owner_uid"] == alice.uid
    status, problem, _ = shared_agent.api(
        "POST", "/v1/slices", {"memory_mib": 1, "compute_pct": 1, "owner_uid": alice.uid}
    )
    assert status == 400 and "owner_uid" in problem["detail"]
