"""``xpuctl run --pool``: run a job where the pool has room (DESIGN.md §6, "run anywhere").

The local agent ranks this node and every placeable peer with the one placement. The best
card here: the job runs as ``xpuctl run`` does. The best card on a peer: a lease is
borrowed there (the agent tries the next peer on a refusal), and the job is dispatched to
the lender through the **launcher** (``pool.launcher``, OpenSSH by default), as

    <launcher> -- 'exec env K=V ... xpuctl run --slice S --leased --chdir DIR -- CMD ARGS'

so that the lender's own agent binds the job to the lent slice (by its token) before it
runs and enforces it like any local job. The lease's environment and the directory travel
in the remote command, quoted (ssh carries no environment); the token does not — it goes
in the launcher's environment as ``LC_XPU_SLICE_TOKEN`` with ``-o SendEnv`` (Debian's
sshd accepts ``LC_*``), so that no ``ps`` on either node shows it, unless the agent says
``pool.token_in_command``.

The lease follows the job: it is returned when the command ends, when ``xpuctl`` gets
SIGINT/SIGTERM/SIGHUP (returning it ends the remote job: the lender ends a lent slice's
processes with the slice), when the launcher dies, and — should ``xpuctl`` itself be
killed — by the agent, which holds the lease for this process only (``hold``). When the
lender ends the lease (reclaimed for its local demand, expired), ``xpuctl`` says so in one
line and exits 75.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from typing import Any

from agent.cli import render
from agent.cli.run import LEASE_ENDED, run_local
from agent.cli.xpuctl import request_body
from agent.client.http import AgentClient, AgentUnavailable, ApiError, ClientError, NotFound

#: Exit code: the request fits nowhere in the pool (as ``alloc``'s 409).
DOES_NOT_FIT = 5
#: How often the lease's state is read while the job runs.
WATCH_S = 0.5
#: After the lease is returned or ended, how long the launcher may take to see its job end.
LINGER_S = 10.0
#: After the remote side reported the end of its slice, how long to wait for the notice.
NOTICE_WAIT_S = 3.0
#: The lease's environment that must not travel on a command line.
SECRET_KEYS = ("XPU_SLICE_TOKEN",)
TOKEN_ENV = "LC_XPU_SLICE_TOKEN"  # noqa: S105 - a variable's name, not a secret


def remote_command(
    lease: dict[str, Any], cmd: list[str], cwd: str, with_token: bool = False
) -> str:
    """The shell command the lender runs: the lease's environment and ``cwd`` explicit,
    every word quoted for a POSIX shell."""
    env = {k: v for k, v in sorted(lease["env"].items()) if with_token or k not in SECRET_KEYS}
    words = ["exec", "env", *(f"{k}={v}" for k, v in env.items())]
    words += [lease.get("remote_xpuctl") or "xpuctl", "run", "--slice", lease["slice_id"]]
    words += ["--leased", "--chdir", cwd, "--", *cmd]
    return shlex.join(words)


def launcher_argv(
    lease: dict[str, Any], remote: str, tty: bool, template: str | None = None
) -> list[str]:
    """The launcher's argv for ``lease``: ``template`` (``--launcher``) or the agent's
    ``pool.launcher``, ``{address}``/``{node}`` filled, then the remote command. For ssh,
    ``-t`` when stdin is a terminal and ``SendEnv`` of the token; other launchers (srun, a
    container exec) inherit the token in their environment and get ``sh -c``."""
    address = lease.get("address") or lease["lender"]
    if template is not None:
        argv = [w.format(address=address, node=lease["lender"]) for w in shlex.split(template)]
    else:
        argv = list(lease.get("launcher") or ["ssh", "-o", "BatchMode=yes", address])
    if os.path.basename(argv[0]) == "ssh":
        extra = ["-o", f"SendEnv={TOKEN_ENV}"] + (["-t"] if tty else [])
        return [argv[0], *extra, *argv[1:], "--", remote]
    return [*argv, "sh", "-c", remote]


def _most_room(client: AgentClient) -> str:
    """Where the most room is, this node and the peers, for the one-line refusal."""
    best: tuple[int, int, str] | None = None
    try:
        here = client.get("/v1/node").get("node", "this node")
        for device in client.get("/v1/devices"):
            free = (
                100 - device["allocated_compute_pct"],
                device["memory_total_mib"] - device["allocated_memory_mib"],
            )
            if best is None or free > best[:2]:
                best = (*free, f"{here}/{device['id']}")
        for peer in client.get("/v1/pool?placeable=1"):
            for device in peer.get("devices", []):
                free = (device.get("compute_free_pct", 0), device.get("memory_free_mib", 0))
                if best is None or free > best[:2]:
                    best = (*free, f"{peer['node']}/{device['id']}")
    except ClientError:
        return ""
    if best is None:
        return "; no card anywhere in the pool"
    return f"; most room: {best[2]} with {render.mib(best[1])} and {best[0]} % free"


def run_pool(client: AgentClient, args: argparse.Namespace, cmd: list[str]) -> int:
    if args.memory is None or args.compute is None:
        print("xpuctl run: error: --pool needs --memory and --compute", file=sys.stderr)
        return 2
    wanted = request_body(args)
    here = client.get("/v1/node")["node"]
    if args.node in (None, here):
        ranked = client.request("POST", "/v1/pool/place", wanted | {"limit": 1})
        if args.node == here or (ranked and ranked[0]["local"]):
            return run_local(client, args, cmd)
        if not ranked:
            print(
                f"xpuctl run: {render.mib(args.memory)} / {args.compute} % does not fit "
                f"anywhere in the pool{_most_room(client)}",
                file=sys.stderr,
            )
            return DOES_NOT_FIT
    body = wanted | {"hold": True}
    if args.node:
        body["node"] = args.node
    if args.ttl:
        body["ttl_s"] = args.ttl
    lease = client.request("POST", "/v1/pool/borrow", body)
    return _run_remote(client, args, cmd, lease)


def _run_remote(
    client: AgentClient, args: argparse.Namespace, cmd: list[str], lease: dict[str, Any]
) -> int:
    import subprocess  # noqa: PLC0415

    slice_id, lender = lease["slice_id"], lease["lender"]
    tty = sys.stdin.isatty()
    remote = remote_command(
        lease, cmd, args.chdir or os.getcwd(), with_token=lease.get("token_in_command", False)
    )
    argv = launcher_argv(lease, remote, tty, args.launcher)
    token = lease["env"].get("XPU_SLICE_TOKEN", "")
    env = os.environ | {TOKEN_ENV: token, "XPU_SLICE_TOKEN": token}
    got: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        got.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        # Without a terminal the launcher gets its own process group: a Ctrl-C reaches
        # xpuctl alone, which returns the lease (that ends the job) and lets ssh finish.
        launcher = subprocess.Popen(argv, env=env, process_group=None if tty else 0)
    except OSError as exc:
        print(f"xpuctl run: cannot start {argv[0]}: {exc.strerror}", file=sys.stderr)
        _give_back(client, slice_id)
        return 127
    returned = terminated = False
    ended: dict[str, Any] | None = None
    deadline: float | None = None
    next_look = time.monotonic() + WATCH_S
    while True:
        try:
            status = launcher.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if got and not returned:
            returned = True
            _give_back(client, slice_id)
            deadline = now + LINGER_S
        if ended is None and not returned and now >= next_look:
            next_look = now + WATCH_S
            ended = _ended(client, slice_id)
            if ended is not None:
                deadline = now + LINGER_S
        if deadline is not None and now >= deadline:
            # The job should have ended with its lease: stop waiting for the launcher,
            # politely first (SIGTERM), then for good two seconds later.
            if not terminated:
                launcher.terminate()
                terminated, deadline = True, now + 2.0
            else:
                launcher.kill()
                deadline = None
    if ended is None and not returned:
        if status == LEASE_ENDED:  # the lender's side saw the slice end: wait for why
            ended = _wait_ended(client, slice_id)
        if ended is None:
            _give_back(client, slice_id)
    if ended is not None:
        reason = ended.get("reason") or ended.get("state")
        print(f"xpuctl: lease {slice_id} {ended['state']} by {lender}: {reason}", file=sys.stderr)
        return LEASE_ENDED
    if got:
        return 128 + got[0]
    return status if status >= 0 else 128 - status


def _ended(client: AgentClient, slice_id: str) -> dict[str, Any] | None:
    """The lease once it ended (not by us), else ``None``; an absent agent is not news
    (the job goes on; the restarted agent renews the lease)."""
    try:
        lease: dict[str, Any] = client.get(f"/v1/pool/leases/{slice_id}")
    except NotFound as exc:
        return {"state": "lost", "reason": str(exc)}
    except (ApiError, AgentUnavailable):
        return None
    return None if lease.get("state") in ("active", "returned") else lease


def _wait_ended(client: AgentClient, slice_id: str) -> dict[str, Any] | None:
    until = time.monotonic() + NOTICE_WAIT_S
    while time.monotonic() < until:
        ended = _ended(client, slice_id)
        if ended is not None:
            return ended
        time.sleep(0.1)
    return {"state": "ended", "reason": "the lender ended the slice"}


def _give_back(client: AgentClient, slice_id: str) -> None:
    try:
        client.request("DELETE", f"/v1/pool/leases/{slice_id}")
    except NotFound:
        pass  # ended already
    except ApiError as exc:
        print(f"xpuctl run: could not return lease {slice_id}: {exc}", file=sys.stderr)
    except AgentUnavailable:
        print(
            f"xpuctl run: the agent is gone; it returns lease {slice_id} when back",
            file=sys.stderr,
        )
