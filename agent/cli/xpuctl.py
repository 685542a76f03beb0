"""``xpuctl``: the client of the local agent.

Exit codes: 0 ok; 1 the agent is unreachable or failed; 2 bad usage or value (also an API
400/413); 3 not allowed (403); 4 unknown id (404); 5 does not fit / conflict (409); for
``run``, the command's own status, 127 when it cannot start, 128+N when ``xpuctl`` was
ended by signal N (``run --pool``), 75 when its slice or lease ended under it (reclaimed,
expired, freed: the line before says why), 255 when the launcher (ssh) failed.

Size: the parser of every command (help texts included) and their thin handlers; ``run``
lives in :mod:`agent.cli.run`, ``run --pool`` in :mod:`agent.cli.dispatch`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from agent import __version__
from agent.cli import render
from agent.client.http import (
    AgentClient,
    ClientError,
    resolve_socket,
)
from agent.units import parse_compute_pct, parse_duration_s, parse_size_mib

# Not ``typing`` itself: its import alone costs ~3 ms of xpuctl's start-up (mypy reads
# ``TYPE_CHECKING`` as true by name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


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


# What every option accepts, said once (the forms are the ones agent.units parses).
MEMORY_HELP = "memory: 512MiB|8GiB|8G|<MiB>"
COMPUTE_HELP = "compute share of the card: 30|30%% (rounded up to the node's step)"
TTL_HELP = "release after: 90s|10m|1h|2d|<seconds>"
MODEL_HELP = (
    "only cards of these models: H100 or A100|H100 (a name matches a model that contains it"
    " where no digit follows: A10 is not A100)"
)
MODELS_HELP = "only peers with a card of one of these models: A100|H100"


def _common_options() -> _Parser:
    """``--socket`` and ``--json``, defined once and accepted before or after the command.

    The parent parser is attached to the top level and to every subcommand; ``SUPPRESS``
    keeps a subcommand that was not given the flag from overwriting the top-level value.
    """
    common = _Parser(add_help=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="the agent's socket (default: $XPU_AGENT_SOCKET, then the configured one)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the API's JSON (stable, for scripts) instead of a table",
    )
    return common


def _wide_option() -> _Parser:
    wide = _Parser(add_help=False)
    wide.add_argument(
        "--wide",
        "-w",
        action="store_true",
        help="every column and per-card detail, even past the terminal's width",
    )
    return wide


def _request_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--memory", type=SIZE, required=True, help=f"{what} {MEMORY_HELP}")
    parser.add_argument("--compute", type=COMPUTE, required=True, help=COMPUTE_HELP)
    _host_args(parser)


def _cpus(text: str) -> int:
    """``4``, ``0.5`` or ``500m`` CPUs as milli-CPUs."""
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not CPUs: 4|0.5|500m") from None
    if not 0 <= value <= 64_000:
        raise argparse.ArgumentTypeError(f"{text!r}: CPUs must be 0..64000")
    return round(value * 1000)


def _host_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus", type=_cpus, default=0, metavar="4|0.5|500m", help="host CPUs the job needs"
    )
    parser.add_argument(
        "--host-memory",
        type=SIZE,
        default=0,
        metavar="32GiB|<MiB>",
        help="host memory the job needs",
    )


def host_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "cpus", 0):
        body["cpu_milli"] = args.cpus
    if getattr(args, "host_memory", 0):
        body["host_memory_mib"] = args.host_memory
    return body


def _slice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="ID", help="pin to this device id (see devices)")
    parser.add_argument("--model", metavar="A|B", help=MODEL_HELP)
    parser.add_argument("--ttl", type=DURATION, help=TTL_HELP)
    parser.add_argument(
        "--label",
        type=LABEL,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label the slice (repeatable); lend=true offers it to the pool while idle",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="integer; a higher priority is preempted last (default 0)",
    )


# (name, help, example) for every command; the example ends its --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("node, agent, backends, health, MQTT link, totals", "xpuctl status --json"),
    "devices": ("devices with telemetry and slices", "xpuctl devices --wide"),
    "slices": ("the slice table", "xpuctl slices --all"),
    "alloc": (
        "allocate a slice",
        "xpuctl alloc --memory 8GiB --compute 30 --ttl 1h --label team=vision",
    ),
    "free": ("release a slice", "xpuctl free s-0123456789ab"),
    "run": (
        "run a command in a slice (a new one, or --slice)",
        "xpuctl run --memory 4GiB --compute 20 -- python3 train.py --epochs 3",
    ),
    "attach": (
        "bind a running process of yours to a slice",
        "xpuctl attach s-0123456789ab --pid 4242",
    ),
    "pool": (
        "every peer's capacity as last heard, one line per peer",
        "xpuctl pool --model H100 --state online",
    ),
    "place": (
        "ranked (node, device) candidates across the pool",
        "xpuctl place --memory 8GiB --compute 30 --model H100",
    ),
    "borrow": ("obtain a lease on a peer", "xpuctl borrow --memory 8GiB --compute 30 --ttl 10m"),
    "leases": (
        "leases this node borrowed from peers (renewed until returned)",
        "xpuctl leases --json",
    ),
    "return": ("return a borrowed lease to its lender", "xpuctl return s-0123456789ab"),
    "events": ("the node's event stream", "xpuctl events --follow"),
    "top": (
        "live view of devices, slices and the pool (q quits)",
        "xpuctl top --interval 2",
    ),
}


def chosen_command(argv: list[str]) -> str | None:
    """The command ``argv`` names, read past the top-level options (``None``: none or an
    unknown one). Lets ``main`` build only that command's parser: building all fourteen
    costs a few ms of start-up, mostly argparse's gettext look-ups."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--socket":
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) the top level with just that one command."""
    common = _common_options()
    wide = _wide_option()
    parser = _Parser(
        prog="xpuctl",
        description="Client of the local xpu-agent.",
        parents=[common],
        epilog="Options such as --json and --socket go before or after the command. "
        "Example: xpuctl alloc --memory 8GiB --compute 30",
    )
    parser.add_argument("--version", action="version", version=f"xpuctl {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    for name, (about, example) in COMMANDS.items():
        if only is not None and name != only:
            continue
        arguments, tables = _ARGUMENTS[name]
        command = sub.add_parser(
            name,
            help=about,
            description=about[0].upper() + about[1:] + ".",
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common, wide] if tables else [common],
        )
        arguments(command)
    return parser


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    pass


def _slices_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include released/expired history")


def _alloc_arguments(p: argparse.ArgumentParser) -> None:
    _request_args(p, "slice")
    _slice_args(p)
    p.add_argument(
        "--request-id",
        metavar="KEY",
        help="idempotency key: a retry with the same key returns the same slice",
    )


def _slice_id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("slice", help="slice id (s-...)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slice",
        metavar="ID",
        help="run in this slice (yours, or one whose token XPU_SLICE_TOKEN holds)",
    )
    p.add_argument(
        "--pool",
        action="store_true",
        help="run on the best card of this node or any peer: a peer's through a lease there"
        " and the launcher (ssh); the lease is returned when CMD ends",
    )
    p.add_argument("--node", metavar="NAME", help="with --pool: run on this node only")
    p.add_argument(
        "--launcher",
        metavar="ARGV",
        help="with --pool: how to reach the lender, e.g. 'ssh -p 2222 {address}'"
        " (default: the agent's pool.launcher)",
    )
    p.add_argument("--chdir", metavar="DIR", help="run CMD in this directory")
    p.add_argument("--leased", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory", type=SIZE, help=f"slice {MEMORY_HELP} (without --slice)")
    p.add_argument("--compute", type=COMPUTE, help=f"{COMPUTE_HELP} (without --slice)")
    _host_args(p)
    _slice_args(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def _attach_arguments(p: argparse.ArgumentParser) -> None:
    _slice_id_argument(p)
    p.add_argument("--pid", type=int, required=True, help="process id (yours)")


def _pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="A|B", help=MODELS_HELP)
    p.add_argument(
        "--state",
        metavar="STATE",
        help="only peers in these states: online|stale|offline (A|B for several)",
    )


def _place_arguments(p: argparse.ArgumentParser) -> None:
    _request_args(p, "requested")
    p.add_argument("--model", metavar="A|B", help=MODEL_HELP)
    p.add_argument("--limit", type=int, default=10, help="at most this many (default 10)")


def _borrow_arguments(p: argparse.ArgumentParser) -> None:
    _request_args(p, "requested")
    p.add_argument("--node", metavar="NAME", help="borrow from this peer only")
    p.add_argument("--ttl", type=DURATION, help=TTL_HELP)
    p.add_argument("--model", metavar="A|B", help=MODEL_HELP)


def _return_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lease", help="lease (slice) id, as `leases` shows it")


def _events_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--limit", type=int, default=50, help="how many past events (default 50)")


def _top_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="print one frame as text and exit")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1.0)"
    )


#: command → (its own arguments, whether it prints tables and so takes --wide).
_ARGUMENTS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], bool]] = {
    "status": (_no_arguments, False),
    "devices": (_no_arguments, True),
    "slices": (_slices_arguments, True),
    "alloc": (_alloc_arguments, False),
    "free": (_slice_id_argument, False),
    "run": (_run_arguments, False),
    "attach": (_attach_arguments, False),
    "pool": (_pool_arguments, True),
    "place": (_place_arguments, True),
    "borrow": (_borrow_arguments, False),
    "leases": (_no_arguments, True),
    "return": (_return_arguments, False),
    "events": (_events_arguments, False),
    "top": (_top_arguments, False),
}


# -- commands -------------------------------------------------------------------------------


def _print(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> int:
    if args.json:
        render.emit_json(data)
    else:
        print(text(data))
    return 0


def alloc_body(args: argparse.Namespace) -> dict[str, Any]:
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
    if args.model:
        body["model"] = args.model
    return body | host_body(args)


def cmd_alloc(client: AgentClient, args: argparse.Namespace) -> int:
    body = alloc_body(args)
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


def _command_of(args: argparse.Namespace) -> list[str]:
    return list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)


def cmd_run(client: AgentClient, args: argparse.Namespace) -> int:
    cmd = _command_of(args)
    if not cmd:
        print("xpuctl run: error: no command given (xpuctl run ... -- CMD ARGS)", file=sys.stderr)
        return 2
    if args.pool or args.node:
        if args.slice is not None:
            print("xpuctl run: error: --pool allocates its own slice: no --slice", file=sys.stderr)
            return 2
        from agent.cli import dispatch  # noqa: PLC0415 - only run --pool needs it

        return dispatch.run_pool(client, args, cmd)
    from agent.cli.run import run_local  # noqa: PLC0415 - only run needs it

    return run_local(client, args, cmd)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """What ``place``, ``borrow`` and ``run --pool`` ask for: the card share, the models,
    the host's CPU and memory."""
    body: dict[str, Any] = {"memory_mib": args.memory, "compute_pct": args.compute}
    if args.model:
        body["model"] = args.model
    return body | host_body(args)


def cmd_place(client: AgentClient, args: argparse.Namespace) -> int:
    body = request_body(args) | {"limit": args.limit}
    return _print(
        args,
        client.request("POST", "/v1/pool/place", body),
        lambda cs: render.candidates_text(cs, _width(args)),
    )


def cmd_borrow(client: AgentClient, args: argparse.Namespace) -> int:
    body = request_body(args)
    for key, value in (("node", args.node), ("ttl_s", args.ttl)):
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


def _width(args: argparse.Namespace) -> int | None:
    """The table width: the terminal's, or no limit with ``--wide``."""
    return None if args.wide else render.terminal_width()


def cmd_pool(client: AgentClient, args: argparse.Namespace) -> int:
    from urllib.parse import quote  # noqa: PLC0415 - http.client has imported it already

    path = f"/v1/pool?model={quote(args.model)}" if args.model else "/v1/pool"
    peers = render.filter_peers(client.get(path), args.model, args.state)
    return _print(args, peers, lambda ps: render.pool_text(ps, _width(args), args.wide))


def dispatch(client: AgentClient, args: argparse.Namespace) -> int:
    simple: dict[str, tuple[str, Callable[[Any, int | None], str]]] = {
        "devices": ("/v1/devices", render.devices_text),
        "leases": ("/v1/pool/leases", render.leases_text),
    }
    if args.command == "status":
        return _print(args, client.get("/v1/node"), render.status_text)
    if args.command in simple:
        path, text = simple[args.command]
        return _print(args, client.get(path), lambda data: text(data, _width(args)))
    if args.command == "top":
        # Lazy: curses and the view's code load only for `top`; other commands stay light.
        from agent.cli import top  # noqa: PLC0415

        return top.run(client, args)
    if args.command == "slices":
        path = "/v1/slices?history=1" if args.all else "/v1/slices"
        return _print(args, client.get(path), lambda s: render.slices_text(s, _width(args)))
    handlers: dict[str, Callable[[AgentClient, argparse.Namespace], int]] = {
        "alloc": cmd_alloc,
        "free": cmd_free,
        "attach": cmd_attach,
        "events": cmd_events,
        "run": cmd_run,
        "pool": cmd_pool,
        "place": cmd_place,
        "borrow": cmd_borrow,
        "return": cmd_return,
    }
    return handlers[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen_command(argv)).parse_args(argv)
    # The shared options are SUPPRESSed unless given (see _common_options).
    args.json = getattr(args, "json", False)
    args.socket = getattr(args, "socket", None)
    args.wide = getattr(args, "wide", False)
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
