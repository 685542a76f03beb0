"""``xpu-agent``: the daemon (and ``xpu-agent demo``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from agent import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xpu-agent", description="Per-node accelerator slicing agent.")
    parser.add_argument("--config", type=Path, help="TOML config (env XPU_AGENT_CONFIG)")
    parser.add_argument("--dev", action="store_true", help="socket/state/logs under ./.run/")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("XPU_AGENT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument("--version", action="version", version=f"xpu-agent {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    demo = sub.add_parser(
        "demo", help="a local cluster on mock cards with a broker, under ./.run/demo"
    )
    demo.add_argument("--nodes", type=int, default=3, help="how many agents (1-16)")
    demo.add_argument("--check", action="store_true", help="only say which broker would run")
    check = sub.add_parser(
        "check-config",
        help="validate a config file and exit (0: valid; 2: the first bad key, named)",
    )
    check.add_argument("file", type=Path, help="the TOML file to check")
    selftest = sub.add_parser(
        "selftest",
        help="on this node's hardware, check which enforcement holds (memory, compute,"
        " cleanup) against the running agent; exit 0 all passed, 1 one failed",
    )
    from agent.cli.selftest import add_arguments  # noqa: PLC0415 - argparse only

    add_arguments(selftest)
    return parser


def check_config(path: Path) -> int:
    """What ``reload`` would say of ``path``, without starting anything."""
    from agent import config as config_mod  # noqa: PLC0415
    from agent.errors import ConfigError  # noqa: PLC0415

    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok (node {config.node_name}, backends {', '.join(config.backends.enabled)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from agent.cli import demo  # noqa: PLC0415

        if args.check:
            return demo.check()
        if not 1 <= args.nodes <= 16:
            print("xpu-agent demo: error: --nodes must be 1..16", file=sys.stderr)
            return 2
        return demo.run(args.nodes)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "selftest":
        from agent.cli import selftest  # noqa: PLC0415

        checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
        unknown = set(checks) - {"memory", "compute"}
        if unknown:
            print(
                f"xpu-agent selftest: error: --checks: unknown {sorted(unknown)}", file=sys.stderr
            )
            return 2
        return selftest.run(args.socket, args.device, args.json, args.python, checks, args.within)
    # Imports after parsing: --help and --version stay fast.
    from agent import config as config_mod  # noqa: PLC0415
    from agent import logs  # noqa: PLC0415
    from agent.errors import AlreadyRunning, ConfigError  # noqa: PLC0415

    logs.configure(args.log_level)
    env_path = os.environ.get("XPU_AGENT_CONFIG")
    path: Path | None = args.config or (Path(env_path) if env_path else None)
    try:
        config = config_mod.load(path)
        if args.dev:
            config = config_mod.with_dev_paths(config)
        from agent.daemon import run_daemon  # noqa: PLC0415

        return run_daemon(config, path, args.dev)
    except ConfigError as exc:
        print(f"xpu-agent: config error: {exc}", file=sys.stderr)
        return 2
    except AlreadyRunning as exc:
        print(f"xpu-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
