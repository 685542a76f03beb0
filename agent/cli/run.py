"""``xpuctl run``: a command in a slice of this node — a new one, one of the caller's, or
(with its token) a slice lent to a peer whose job ``run --pool`` dispatched here.

The command is forked, bound to the slice, and only then exec'd (:mod:`agent.cli.gated`);
``xpuctl`` forwards SIGINT/SIGTERM/SIGHUP to it, says once if the agent stops answering
(the command runs on, unenforced), releases a slice it allocated, and exits with the
command's status (:data:`LEASE_ENDED` when the slice ended under it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import uuid
from typing import Any

from agent.cli.gated import GatedChild
from agent.cli.xpuctl import alloc_body
from agent.client.http import AgentClient, AgentUnavailable, ApiError, ClientError, NotFound
from agent.model import SLICE_TOKEN_HEADER

#: ``run``'s exit code when the slice or lease ended under the command (reclaimed for
#: local demand, expired, freed by an operator): sysexits' EX_TEMPFAIL, "try again".
LEASE_ENDED = 75


def _watch_agent(client: AgentClient, stop: Any) -> None:
    """While CMD runs: say once if the agent goes away (CMD keeps running)."""
    while not stop.wait(2.0):
        try:
            client.get("/v1/health")
        except AgentUnavailable:
            print(
                "xpuctl: the agent stopped answering; the command keeps running unenforced",
                file=sys.stderr,
                flush=True,
            )
            return
        except ClientError:
            continue


def _slice_token() -> str | None:
    """The slice token this process was given: ``XPU_SLICE_TOKEN``, or the ``LC_`` form
    that ``run --pool`` sends through ssh (``SendEnv``), never on a command line."""
    return os.environ.get("XPU_SLICE_TOKEN") or os.environ.get("LC_XPU_SLICE_TOKEN") or None


def run_local(client: AgentClient, args: argparse.Namespace, cmd: list[str]) -> int:
    """Run ``cmd`` in a new slice of this node, or in ``--slice`` (one of the caller's, or
    one whose token the caller holds: a job dispatched here by ``run --pool``)."""
    owned = args.slice is None
    if owned:
        if args.memory is None or args.compute is None:
            print(
                "xpuctl run: error: --memory and --compute are required without --slice",
                file=sys.stderr,
            )
            return 2
        body = alloc_body(args)
        body["request_id"] = f"run-{uuid.uuid4()}"
        slice_ = client.request("POST", "/v1/slices", body)
    else:
        token = _slice_token()
        if token:
            client.headers[SLICE_TOKEN_HEADER] = token
        slice_ = client.get(f"/v1/slices/{args.slice}")
    if not slice_.get("env"):
        print(
            f"xpuctl run: error: slice {slice_['id']} is not yours (nor is its token given) or"
            " not active",
            file=sys.stderr,
        )
        return 3
    env = {k: v for k, v in os.environ.items() if k != "LC_XPU_SLICE_TOKEN"} | slice_["env"]
    if "LD_PRELOAD" in slice_["env"] and os.environ.get("LD_PRELOAD"):
        # The slice's hook (HAMi-core) first, the user's own preloads after it.
        env["LD_PRELOAD"] = f"{slice_['env']['LD_PRELOAD']}:{os.environ['LD_PRELOAD']}"
    # Forked now, exec'd once bound: nothing of CMD runs outside its slice.
    child = GatedChild(cmd, env, args.chdir)
    try:
        client.request("POST", f"/v1/slices/{slice_['id']}/processes", {"pid": child.pid})
    except (ApiError, AgentUnavailable) as exc:
        child.cancel()
        print(f"xpuctl run: could not bind the command to {slice_['id']}: {exc}", file=sys.stderr)
        if owned:
            _release_quietly(client, slice_["id"])
        return exc.exit_code
    failed = child.release()
    if failed is not None:
        where = f" in {args.chdir}" if args.chdir else ""
        print(f"xpuctl run: cannot start {cmd[0]}{where}: {failed.strerror}", file=sys.stderr)
        if owned:
            _release_quietly(client, slice_["id"])
        return 127

    def forward(signum: int, _frame: object) -> None:
        child.signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_agent, args=(client, stop), daemon=True)
    watcher.start()
    status = child.wait()
    stop.set()
    if owned:
        _release_quietly(client, slice_["id"])
    elif status < 0:
        ended = _ended_under(client, slice_["id"])
        if ended is not None:
            if not args.leased:
                print(f"xpuctl run: slice {slice_['id']} ended: {ended}", file=sys.stderr)
            return LEASE_ENDED
    return 128 - status if status < 0 else status


def _ended_under(client: AgentClient, slice_id: str) -> str | None:
    """Why the slice ended, if it did (its processes are ended with a lent slice)."""
    try:
        now = client.get(f"/v1/slices/{slice_id}")
    except ClientError:
        return None
    if now.get("state") == "active":
        return None
    return str(now.get("end_reason") or now.get("state"))


def _release_quietly(client: AgentClient, slice_id: str) -> None:
    try:
        client.request("DELETE", f"/v1/slices/{slice_id}")
    except AgentUnavailable:
        print(
            f"xpuctl run: the agent is gone; slice {slice_id} was not released",
            file=sys.stderr,
        )
    except NotFound:
        pass  # released already
    except ApiError as exc:
        print(f"xpuctl run: could not release {slice_id}: {exc}", file=sys.stderr)
