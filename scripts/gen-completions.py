#!/usr/bin/env python3
"""Write xpuctl's bash and zsh completion, generated from its argument parser by shtab.

    scripts/gen-completions.py OUTDIR      (make completions: packaging/completions/)

Generated ahead of time so that ``xpuctl`` imports nothing for completion at run time;
tests/test_completion.py fails when the committed files no longer match the parser, and
the Debian package installs them (bash-completion and zsh vendor-completions).
"""

from __future__ import annotations

import sys
from pathlib import Path

import shtab

from agent.cli.xpuctl import build_parser

FILES = {"bash": "xpuctl.bash", "zsh": "_xpuctl"}


def generate(shell: str) -> str:
    return str(shtab.complete(build_parser(), shell=shell))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for shell, name in FILES.items():
        (out / name).write_text(generate(shell))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
