#!/usr/bin/env python3
"""A stand-in for Huawei's ``npu-smi`` that answers from captured outputs.

Standard library only, so it runs with any ``python3``.

Point the daemon at it (end-to-end tests, or a first look without an NPU)::

    # agent.toml
    version = 1
    [backends]
    enabled = ["npu-smi"]
    [backends.npu_smi]
    path = "/abs/path/to/tests/fake_npu_smi.py"

    FAKE_NPU_SMI_DIR=/abs/path/to/tests/data/npu-smi/fake/atlas800-9010 xpu-agent --dev
    xpuctl devices          # npu-0-0 .. npu-7-0, Ascendxxx, 0/32768 MiB, two Warning

Environment:

- ``FAKE_NPU_SMI_DIR``: the scenario directory (default: ``data/npu-smi/fake/atlas800-9010``
  next to this script). One file per command: ``info.txt`` (``npu-smi info``),
  ``info-l.txt``, ``info-m.txt``, ``info-t-<type>-i<N>-c<M>.txt`` (falling back to
  ``info-t-<type>-i<N>.txt``, then ``info-t-<type>.txt``). Leading lines starting with
  ``#`` (a capture's source line) are not printed. The files are read on every call, so a
  test may rewrite them between calls. A command without a file exits 2.
- ``FAKE_NPU_SMI_HANG``: ``1`` hangs every command (sleeps ``FAKE_NPU_SMI_HANG_S``,
  default 3600 s); or a comma-separated list of command keys (``info-m``, ``info``) to hang.
- ``FAKE_NPU_SMI_FAIL``: same form; those commands print a driver error and exit 1.
- ``FAKE_NPU_SMI_LOG``: a file to which each call appends ``<pid> LC_ALL=<value> <args>``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "npu-smi" / "fake" / "atlas800-9010"


def command_keys(args: list[str]) -> list[str]:
    """File names to try for ``args``, most specific first."""
    if not args or args[0] != "info":
        return []
    options: dict[str, str] = {}
    flags: set[str] = set()
    rest = args[1:]
    while rest:
        token = rest.pop(0)
        if token in ("-l", "-m"):
            flags.add(token[1])
        elif token in ("-t", "-i", "-c") and rest:
            options[token[1]] = rest.pop(0)
        else:
            return []
    if not options and not flags:
        return ["info"]
    if not options and len(flags) == 1:
        return [f"info-{flags.pop()}"]
    if "t" in options and not flags:
        base = f"info-t-{options['t']}"
        keys = []
        if "i" in options and "c" in options:
            keys.append(f"{base}-i{options['i']}-c{options['c']}")
        if "i" in options:
            keys.append(f"{base}-i{options['i']}")
        keys.append(base)
        return keys
    return []


def selected(variable: str, keys: list[str]) -> bool:
    value = os.environ.get(variable, "").strip()
    if not value or value == "0":
        return False
    if value in ("1", "all"):
        return True
    wanted = {item.strip() for item in value.split(",")}
    return bool(wanted.intersection(keys))


def main(argv: list[str]) -> int:
    args = argv[1:]
    log_path = os.environ.get("FAKE_NPU_SMI_LOG")
    if log_path:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} LC_ALL={os.environ.get('LC_ALL', '')} {' '.join(args)}\n")
    keys = command_keys(args)
    if selected("FAKE_NPU_SMI_HANG", keys):
        time.sleep(float(os.environ.get("FAKE_NPU_SMI_HANG_S", "3600")))
    if selected("FAKE_NPU_SMI_FAIL", keys):
        print("dcmi model initialized failed, because the device is used. ret is -8020")
        return 1
    directory = Path(os.environ.get("FAKE_NPU_SMI_DIR") or DEFAULT_DIR)
    for key in keys:
        path = directory / f"{key}.txt"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            while lines and lines[0].startswith("#"):
                lines.pop(0)
            sys.stdout.write("".join(lines))
            return 0
    print(
        f"fake npu-smi: no capture for `npu-smi {' '.join(args)}` in {directory}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
