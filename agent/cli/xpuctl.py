"""``xpuctl``: the client of the local agent.

Exit codes: 0 ok; 1 the agent is unreachable or failed; 2 bad usage or value (also an API
400/413); 3 not allowed (403); 4 unknown id (404); 5 does not fit / conflict (409); for
``run``, the command's own status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from agent import __version__
from agent.cli import render
from agent.client.http import AgentClient, AgentUnavailable, ApiError, ClientError, resolve_socket
from agent.units import parse_compute_pct, parse_duration_s, parse_size_mib


class _Parser(argparse.ArgumentParser):
    """One-line errors naming the option, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


SIZE = _typed(parse_size_mib)
COMPUTE = _typed(parse_compute_pct)
DURATION = _typed(parse_duration_s)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


LABEL = _typed(_label)


def _request_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--memory", type=SIZE, required=True, help=f"{what} memory: 512MiB, 8GiB")
    parser.add_argument("--compute", type=COMPUTE, required=True, help="compute share: 30 or 30%%")


def _alloc_args(parser: argparse.ArgumentParser) -> None:
    _request_args(parser, "slice")
    parser.add_argument("--device", help="pin to this device id")
    parser.add_argument("--ttl", type=DURATION, help="release after this long: 90s, 10m, 1h")
    parser.add_argument("--label", type=LABEL, action="append", default=[], help="k=v")
    parser.add_argument("--priority", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xpuctl", description="Client of the local xpu-agent.")
    parser.add_argument("--socket", help="agent socket (env XPU_AGENT_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print stable JSON")
    parser.add_argument("--version", action="version", version=f"xpuctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("status", help="node, agent, backends, health, MQTT link, totals")
    sub.add_parser("devices", help="devices with telemetry and slices")
    slices = sub.add_parser("slices", help="the slice table")
    slices.add_argument("--all", action="store_true", help="include released/expired history")
    alloc = sub.add_parser("alloc", help="allocate a slice")
    _alloc_args(alloc)
    alloc.add_argument("--request-id", help="idempotency key")
    free = sub.add_parser("free", help="release a slice")
    free.add_argument("slice")
    run = sub.add_parser("run", help="run a command in a slice")
    run.add_argument("--slice", help="reuse this slice instead of allocating one")
    run.add_argument("--memory", type=SIZE)
    run.add_argument("--compute", type=COMPUTE)
    run.add_argument("--device")
    run.add_argument("--ttl", type=DURATION)
    run.add_argument("--label", type=LABEL, action="append", default=[])
    run.add_argument("--priority", type=int, default=0)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    attach = sub.add_parser("attach", help="bind a running process of yours to a slice")
    attach.add_argument("slice")
    attach.add_argument("--pid", type=int, required=True)
    sub.add_parser("pool", help="every peer's capacity as last heard")
    place = sub.add_parser("place", help="ranked (node, device) candidates")
    _request_args(place, "requested")
    place.add_argument("--model", help="only devices whose model contains this")
    place.add_argument("--limit", type=int, default=10)
    borrow = sub.add_parser("borrow", help="obtain a lease on a peer")
    _request_args(borrow, "requested")
    borrow.add_argument("--node")
    borrow.add_argument("--ttl", type=DURATION)
    borrow.add_argument("--model")
    sub.add_parser("leases", help="leases this node borrowed from peers (renewed until returned)")
    give_back = sub.add_parser("return", help="return a borrowed lease to its lender")
    give_back.add_argument("lease")
    events = sub.add_parser("events", help="the node's event stream")
    events.add_argument("--follow", "-f", action="store_true")
    events.add_argument("--limit", type=int, default=50)
    top = sub.add_parser("top", help="live view of devices, slices and the pool (q quits)")
    top.add_argument("--once", action="store_true", help="print one frame as text and exit")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    return parser


# -- commands -------------------------------------------------------------------------------


def _print(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> int:
    if args.json:
        render.emit_json(data)
    else:
        print(text(data))
    return 0


def _alloc_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "memory_mib": args.memory,
        "compute_pct": args.compute,
        "labels": dict(args.label),
        "priority": args.priority,
    }
    if args.device:
        body["device"] = args.device
    if args.ttl:
        body["ttl_s"] = args.ttl
    return body


def cmd_alloc(client: AgentClient, args: argparse.Namespace) -> int:
    body = _alloc_body(args)
    if args.request_id:
        body["request_id"] = args.request_id
    return _print(args, client.request("POST", "/v1/slices", body), render.slice_text)


def cmd_free(client: AgentClient, args: argparse.Namespace) -> int:
    ended = client.request("DELETE", f"/v1/slices/{args.slice}")
    return _print(args, ended, lambda s: f"released {s['id']}")


def cmd_attach(client: AgentClient, args: argparse.Namespace) -> int:
    bound = client.request("POST", f"/v1/slices/{args.slice}/processes", {"pid": args.pid})
    return _print(args, bound, lambda s: f"bound process {args.pid} to {s['id']}")


def cmd_events(client: AgentClient, args: argparse.Namespace) -> int:
    if not args.follow:
        return _print(
            args,
            client.get(f"/v1/events?limit={args.limit}"),
            lambda es: "\n".join(render.event_line(e) for e in es),
        )
    try:
        for event in client.stream(f"/v1/events?follow=1&limit={args.limit}"):
            print(render.json_line(event) if args.json else render.event_line(event), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


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


def cmd_run(client: AgentClient, args: argparse.Namespace) -> int:
    # Imported here: only ``run`` needs them, and xpuctl's start-up time is a budget.
    import subprocess  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("xpuctl run: error: no command given (xpuctl run ... -- CMD ARGS)", file=sys.stderr)
        return 2
    owned = args.slice is None
    if owned:
        if args.memory is None or args.compute is None:
            print(
                "xpuctl run: error: --memory and --compute are required without --slice",
                file=sys.stderr,
            )
            return 2
        body = _alloc_body(args)
        body["request_id"] = f"run-{uuid.uuid4()}"
        slice_ = client.request("POST", "/v1/slices", body)
    else:
        slice_ = client.get(f"/v1/slices/{args.slice}")
    if not slice_.get("env"):
        print(
            f"xpuctl run: error: slice {slice_['id']} is not yours or not active", file=sys.stderr
        )
        return 3
    env = {**os.environ, **slice_["env"]}
    try:
        # Own process group: the enforcer may stop/continue the group without stopping us.
        child = subprocess.Popen(cmd, env=env, process_group=0)
    except OSError as exc:
        print(f"xpuctl run: cannot start {cmd[0]}: {exc.strerror}", file=sys.stderr)
        if owned:
            _release_quietly(client, slice_["id"])
        return 127

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        client.request("POST", f"/v1/slices/{slice_['id']}/processes", {"pid": child.pid})
    except ApiError as exc:
        if child.poll() is None:
            print(f"xpuctl run: warning: could not bind: {exc}", file=sys.stderr)
    except AgentUnavailable as exc:
        print(f"xpuctl run: warning: {exc}; the command runs unenforced", file=sys.stderr)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_agent, args=(client, stop), daemon=True)
    watcher.start()
    status = child.wait()
    stop.set()
    if owned:
        _release_quietly(client, slice_["id"])
    return 128 - status if status < 0 else status


def _release_quietly(client: AgentClient, slice_id: str) -> None:
    try:
        client.request("DELETE", f"/v1/slices/{slice_id}")
    except AgentUnavailable:
        print(
            f"xpuctl run: the agent is gone; slice {slice_id} was not released",
            file=sys.stderr,
        )
    except ApiError as exc:
        if exc.status != 404:
            print(f"xpuctl run: could not release {slice_id}: {exc}", file=sys.stderr)


def cmd_place(client: AgentClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "memory_mib": args.memory,
        "compute_pct": args.compute,
        "limit": args.limit,
    }
    if args.model:
        body["model"] = args.model
    return _print(args, client.request("POST", "/v1/pool/place", body), render.candidates_text)


def cmd_borrow(client: AgentClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"memory_mib": args.memory, "compute_pct": args.compute}
    for key, value in (("node", args.node), ("ttl_s", args.ttl), ("model", args.model)):
        if value:
            body[key] = value
    lease = client.request("POST", "/v1/pool/borrow", body)

    def text(lease: dict[str, Any]) -> str:
        lines = [
            f"lease {lease['slice_id']} on {lease['lender']}/{lease['device']}: "
            f"{render.mib(lease['memory_mib'])}, {lease['compute_pct']}% compute, "
            f"expires {render.ago(lease['expires_at'])}"
        ]
        lines += [f"  {k}={v}" for k, v in sorted(lease["env"].items())]
        return "\n".join(lines)

    return _print(args, lease, text)


def cmd_return(client: AgentClient, args: argparse.Namespace) -> int:
    lease = client.request("DELETE", f"/v1/pool/leases/{args.lease}")
    return _print(args, lease, lambda x: f"returned {x['slice_id']} to {x['lender']}")


def dispatch(client: AgentClient, args: argparse.Namespace) -> int:
    simple: dict[str, tuple[str, Callable[[Any], str]]] = {
        "status": ("/v1/node", render.status_text),
        "devices": ("/v1/devices", render.devices_text),
        "pool": ("/v1/pool", render.pool_text),
        "leases": ("/v1/pool/leases", render.leases_text),
    }
    if args.command in simple:
        path, text = simple[args.command]
        return _print(args, client.get(path), text)
    if args.command == "top":
        # Lazy: curses and the view's code load only for `top`; other commands stay light.
        from agent.cli import top  # noqa: PLC0415

        return top.run(client, args)
    if args.command == "slices":
        path = "/v1/slices?history=1" if args.all else "/v1/slices"
        return _print(args, client.get(path), render.slices_text)
    handlers: dict[str, Callable[[AgentClient, argparse.Namespace], int]] = {
        "alloc": cmd_alloc,
        "free": cmd_free,
        "attach": cmd_attach,
        "events": cmd_events,
        "run": cmd_run,
        "place": cmd_place,
        "borrow": cmd_borrow,
        "return": cmd_return,
    }
    return handlers[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = AgentClient(resolve_socket(args.socket))
    try:
        return dispatch(client, args)
    except ClientError as exc:
        print(f"xpuctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
