"""``xpuctl run --pool`` across real agents, a real Mosquitto and a real OpenSSH server:
the job runs on the lender, bound to the lent slice and enforced there, its output and
status come back, and the lease follows the job (returned at its end and on Ctrl-C; its
end on the lender's side ends the job; a borrower restart does not).

All agents run on this machine; the lender is reached as ``127.0.0.1`` through the test's
sshd (``node.address``), with the test's keys (``pool.launcher``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, topic_root
from tests.harness import REPO, AgentProcess, agent_env, json_out, short_tmpdir, wait_for
from tests.sshd import SSH, SSHD, Sshd

pytestmark = [
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (make deps)"),
    pytest.mark.skipif(
        SSHD is None or SSH is None, reason="openssh-server is not installed (make deps)"
    ),
]

#: The borrower's one card is small: a 40 GiB job fits only on the lender's.
SMALL = '[{ model = "MockA100-16G", memory_mib = 16384, count = 1 }]'
BIG = '[{ model = "MockA100-80G", memory_mib = 81920, count = 1 }]'
XPUCTL = str(Path(sys.executable).parent / "xpuctl")
#: ``run --pool`` of a 40 GiB / 30 % job: it fits only on the lender's card.
JOB = ("--pool", "--memory", "40GiB", "--compute", "30", "--")


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    server = Sshd().start()
    yield server
    server.cleanup()


def pool_pair(
    broker: Mosquitto,
    sshd: Sshd,
    agent_factory: Callable[..., AgentProcess],
    lender_pool: str = "",
    borrower_pool: str = "",
    api: str = "",
) -> tuple[AgentProcess, AgentProcess]:
    """Borrower ``a`` (one small card) and lender ``b`` (one 80 GiB card), reached over
    the test's sshd; ``api``: an ``[api]`` section for both (their directories are then
    open to other users: the socket's own mode decides)."""
    root = topic_root()
    launcher = json.dumps(sshd.launcher())
    borrower = f'launcher = {launcher}\nremote_xpuctl = "{XPUCTL}"\n{borrower_pool}'
    a = agent_factory(
        node="a",
        mock_devices=SMALL,
        start=False,
        config=mqtt_config(broker, root, "a", pool=borrower) + api,
    )
    b = agent_factory(
        node="b",
        mock_devices=BIG,
        start=False,
        config=mqtt_config(broker, root, "b", node_extra='address = "127.0.0.1"', pool=lender_pool)
        + api,
    )
    for agent in (a, b):
        if api:
            os.chmod(agent.dir, 0o755)
        agent.start()

    def placeable(agent: AgentProcess) -> set[str]:
        return {p["node"] for p in agent.api("GET", "/v1/pool")[1] if p["placeable"]}

    wait_for(lambda: placeable(a) == {"b"} and placeable(b) == {"a"}, 10)
    return a, b


def run_pool(a: AgentProcess, *args: str, **popen: Any) -> subprocess.Popen[str]:
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli.xpuctl", "--socket", str(a.socket), "run", *args],
        text=True,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        **(options | popen),
    )


def lent(b: AgentProcess) -> list[dict[str, Any]]:
    """The lender's live slices lent to a peer."""
    return [s for s in b.api("GET", "/v1/slices")[1] if s["borrower"]]


def bound_job(b: AgentProcess, timeout_s: float = 20) -> dict[str, Any]:
    """The lent slice, once a process is bound to it."""
    found: dict[str, Any] = wait_for(
        lambda: next((s for s in lent(b) if s["processes"]), None), timeout_s
    )
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_run_pool_runs_on_the_lender_bound_and_enforced(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    script = (
        "echo XPU_SLICE_ID=$XPU_SLICE_ID; echo XPU_MEMORY_LIMIT_MIB=$XPU_MEMORY_LIMIT_MIB; "
        "echo TOKEN=$XPU_SLICE_TOKEN; echo CUDA=${CUDA_VISIBLE_DEVICES-unset}; echo PWD=$PWD; "
        "read line; echo IN=$line; sleep 1; exit 7"
    )
    proc = run_pool(
        a,
        *JOB,
        "sh",
        "-c",
        script,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write("hello from the borrower\n")
    proc.stdin.close()
    # While it runs: the lender's ledger has the job bound to the slice lent to a.
    job = bound_job(b)
    assert job["borrower"] == "a" and job["memory_mib"] == 40 * 1024
    assert job["labels"] == {"lent-to": "a"}
    # ...and no command line on the borrower shows the lease's token.
    token = job["env"]["XPU_SLICE_TOKEN"]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert token.encode() not in cmdline.read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    assert proc.stdout is not None and proc.stderr is not None
    with proc:  # little of both: no pipe fills
        out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(30)
    assert proc.returncode == 7, err
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines["XPU_SLICE_ID"] == job["id"]
    assert lines["XPU_MEMORY_LIMIT_MIB"] == str(40 * 1024)
    assert lines["TOKEN"] == token  # through SendEnv, not argv
    assert lines["PWD"] == str(tmp_path)
    assert lines["IN"] == "hello from the borrower"
    # Afterwards nothing is lent any more, and the borrower's lease says returned.
    wait_for(lambda: lent(b) == [], 5)
    lease = json_out(a.xpuctl("--json", "leases"))
    assert lease == []
    status, ended, _ = a.api("GET", f"/v1/pool/leases/{job['id']}")
    assert status == 200 and ended["state"] == "returned" and ended["env"] == {}
    assert "process.bound" in [e["kind"] for e in b.api("GET", "/v1/events?limit=200")[1]]


def test_ctrl_c_ends_the_remote_job_and_returns_the_lease(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    proc = run_pool(a, *JOB, "sleep", "120")
    job = bound_job(b)
    pid = job["processes"][0]["pid"]
    assert alive(pid)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    print(f"xpuctl ended {time.monotonic() - started:.2f}s after SIGINT")
    assert proc.returncode == 130, err
    wait_for(lambda: not alive(pid), 5)
    _, ended, _ = b.api("GET", f"/v1/slices/{job['id']}")
    assert ended["state"] == "released" and ended["end_reason"] == "returned by a"
    assert lent(b) == []


def test_reclaim_by_a_local_allocation_ends_the_remote_job(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    proc = run_pool(a, "--pool", "--memory", "40GiB", "--compute", "50", "--", "sleep", "120")
    job = bound_job(b)
    pid = job["processes"][0]["pid"]
    started = time.monotonic()
    local = json_out(b.xpuctl("--json", "alloc", "--memory", "60GiB", "--compute", "60"))
    assert local["borrower"] is None
    _, err = proc.communicate(timeout=20)
    print(f"remote job's xpuctl ended {time.monotonic() - started:.2f}s after the reclaim")
    assert proc.returncode == 75, err
    assert f"lease {job['id']} reclaimed by b: local demand" in err
    assert not alive(pid)
    ended = wait_for(
        lambda: [
            e for e in b.api("GET", "/v1/events?limit=200")[1] if e["kind"] == "enforce.lease_ended"
        ],
        5,
    )
    assert ended[0]["slice_id"] == job["id"] and ended[0]["data"]["reason"] == "local demand"
    assert ended[0]["data"]["pids"] == [pid]


def test_the_job_outlives_a_borrower_restart(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    # Renewed every 3.5 s (TTL 7 s); a borrower that goes keeps its leases 4 s at most.
    a, b = pool_pair(
        broker, sshd, agent_factory, lender_pool="lease_ttl_s = 7\nborrower_grace_s = 4"
    )
    proc = run_pool(a, *JOB, "sleep", "120")
    job = bound_job(b)
    pid = job["processes"][0]["pid"]
    for how in ("SIGTERM", "kill -9"):
        if how == "SIGTERM":
            a.stop()
        else:
            a.kill9()
        time.sleep(1.0)
        a.start()
        # Longer than the grace and the TTL: only renewals keep it.
        time.sleep(8)
        current = b.api("GET", f"/v1/slices/{job['id']}")[1]
        assert current["state"] == "active", (how, current)
        assert alive(pid) and proc.poll() is None, how
        leases = json_out(a.xpuctl("--json", "leases"))
        assert [x["slice_id"] for x in leases] == [job["id"]], how
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143
    wait_for(lambda: not alive(pid), 5)


def test_fits_nowhere_is_one_line_and_exit_5(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, _b = pool_pair(broker, sshd, agent_factory)
    proc = run_pool(a, "--pool", "--memory", "100GiB", "--compute", "30", "--", "true")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 5
    assert err.count("\n") == 1 and "does not fit anywhere in the pool" in err
    assert "most room: b/" in err


def test_best_card_local_runs_locally(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    proc = run_pool(
        a, "--pool", "--memory", "4GiB", "--compute", "10", "--", "sh", "-c", "echo $XPU_DEVICE"
    )
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.strip() == a.api("GET", "/v1/devices")[1][0]["id"]
    assert lent(b) == []


def _as(
    user_uid: int, agent: AgentProcess, *args: str, token: str = ""
) -> subprocess.CompletedProcess[str]:
    """xpuctl as ``user_uid`` (with its groups), optionally holding a slice token."""
    import pwd

    env = {**agent_env(), "PYTHONPATH": str(REPO)}
    if token:
        env["XPU_SLICE_TOKEN"] = token
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user_uid}",
            f"--regid={pwd.getpwuid(user_uid).pw_gid}",
            "--init-groups",
            sys.executable,
            "-m",
            "agent.cli.xpuctl",
            "--socket",
            str(agent.socket),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/tmp",
        env=env,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become users")
def test_the_token_is_a_capability_for_its_slice_alone(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    from tests.test_authz import GROUP, ensure_group, ensure_user

    ensure_group(GROUP)
    bob = ensure_user("xa-bob", [GROUP]).uid
    a, b = pool_pair(broker, sshd, agent_factory, api=f'[api]\nsocket_group = "{GROUP}"\n')
    proc = run_pool(a, *JOB, "sleep", "120")
    job = bound_job(b)
    token = job["env"]["XPU_SLICE_TOKEN"]
    other = json_out(b.xpuctl("--json", "alloc", "--memory", "1GiB", "--compute", "10"))

    def bob_runs(slice_id: str, with_token: str) -> int:
        result = _as(bob, b, "run", "--slice", slice_id, "--", "echo", "ran", token=with_token)
        assert "ran" not in result.stdout, result.stderr
        return result.returncode

    # No token, a wrong one, or the right one for another slice: nothing binds or runs.
    assert bob_runs(job["id"], "") == 3
    assert bob_runs(job["id"], "not-the-token") == 3
    assert bob_runs(other["id"], token) == 3
    assert len(b.api("GET", f"/v1/slices/{job['id']}")[1]["processes"]) == 1
    assert b.api("GET", f"/v1/slices/{other['id']}")[1]["processes"] == []
    # On the borrower, another user sees the lease but not its environment (the token).
    leases = json_out(_as(bob, a, "--json", "leases"))
    assert [x["slice_id"] for x in leases] == [job["id"]] and leases[0]["env"] == {}
    status, seen, _ = a.api("GET", f"/v1/pool/leases/{job['id']}")
    assert status == 200 and seen["env"]["XPU_SLICE_TOKEN"] == token  # root: an admin
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    # Once the lease has ended its token is stale: it binds nothing either.
    assert bob_runs(job["id"], token) == 3


def test_a_killed_xpuctl_leaves_no_lease_behind(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    # The lease follows its holder: with xpuctl gone (kill -9: no chance to return it),
    # the borrower's agent returns it, and the lender ends the job.
    a, b = pool_pair(broker, sshd, agent_factory)
    proc = run_pool(a, *JOB, "sleep", "120")
    job = bound_job(b)
    pid = job["processes"][0]["pid"]
    proc.kill()
    proc.communicate(timeout=10)
    wait_for(lambda: not alive(pid), 10)
    ended = b.api("GET", f"/v1/slices/{job['id']}")[1]
    assert ended["state"] == "released" and ended["end_reason"] == "returned by a"
    status, lease, _ = a.api("GET", f"/v1/pool/leases/{job['id']}")
    assert status == 200 and lease["state"] == "returned"
    assert lease["reason"].startswith(f"its holder (pid {proc.pid}) is gone")


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    b.stop()
    with open(b.config_path, "a") as config:
        config.write("\n[enforcement]\ngrace_s = 1.5\n")
    b.start()
    wait_for(
        lambda: [p["node"] for p in a.api("GET", "/v1/pool")[1] if p["placeable"]] == ["b"], 10
    )
    # SIGTERM ignored by the shell and (inherited) by its sleep.
    proc = run_pool(
        a,
        *JOB,
        "sh",
        "-c",
        "trap '' TERM; sleep 120",
    )
    job = bound_job(b)
    pid = job["processes"][0]["pid"]
    started = time.monotonic()
    b.xpuctl("free", job["id"]).check_returncode()  # an operator ends the lease
    wait_for(lambda: not alive(pid), 10)
    took = time.monotonic() - started
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert f"lease {job['id']} reclaimed by b: released by root" in err
    assert 1.5 <= took < 5, took  # not at SIGTERM, but at the grace's end
    assert "outlived the grace: killed" in b.log()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (make deps)")
def test_in_a_terminal_the_job_gets_one_and_ctrl_c_reaches_it(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    from tests.test_top import Tmux

    a, b = pool_pair(broker, sshd, agent_factory)
    status = Path(short_tmpdir()) / "status"
    job = "test -t 0 && echo REMOTE-TTY; read x; echo GOT-$x; sleep 60"
    command = (
        f"cd /tmp && PYTHONPATH={REPO} {sys.executable} -m agent.cli.xpuctl --socket {a.socket}"
        f" run --pool --memory 40GiB --compute 30 -- sh -c {shlex.quote(job)};"
        f" echo EXIT-$? > {status}"
    )
    tmux = Tmux()
    try:
        started = tmux("new-session", "-d", "-s", "top", "-x", "100", "-y", "20", command)
        assert started.returncode == 0, started.stderr
        tmux.wait_for("REMOTE-TTY", timeout_s=20)  # ssh -t: the remote side has a terminal
        tmux("send-keys", "-t", "top", "hello", "Enter")
        tmux.wait_for("GOT-hello", timeout_s=10)
        assert [s["borrower"] for s in lent(b)] == ["a"]
        tmux("send-keys", "-t", "top", "C-c")  # through ssh's terminal to the remote job
        wait_for(status.exists, 15)
        assert status.read_text().strip() == "EXIT-130"
        wait_for(lambda: lent(b) == [], 5)
    finally:
        tmux("kill-server")


def test_a_failing_launcher_returns_the_lease_and_exits_255(
    broker: Mosquitto, sshd: Sshd, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b = pool_pair(broker, sshd, agent_factory)
    # --launcher overrides pool.launcher; nothing listens on port 1.
    launcher = shlex.join("1" if w == str(sshd.port) else w for w in sshd.launcher())
    proc = run_pool(
        a,
        "--pool",
        "--node",
        "b",
        "--launcher",
        launcher,
        "--memory",
        "40GiB",
        "--compute",
        "30",
        "--",
        "true",
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255, err
    assert "Connection refused" in err
    wait_for(lambda: lent(b) == [], 5)
    events = [e["kind"] for e in a.api("GET", "/v1/events?limit=50")[1]]
    assert events.count("lease.borrowed") == 1 and events.count("lease.returned") == 1
