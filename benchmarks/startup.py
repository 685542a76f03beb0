"""``xpuctl status`` start-up against ``python -I -c pass`` from the same interpreter.

Both are run side by side, interleaved (pass, status, pass, status, ...) so that the
machine's load hits both alike, against a real agent on mock cards. Two installations:

- ``dev``: this virtual environment's ``xpuctl`` entry point (the editable install that
  ``make run`` makes; its import hook costs every Python start here, ``pass`` included);
- ``installed``: a fresh virtual environment with a regular (non-editable) install of this
  tree, as the Debian package has it.

Run: ``python -m benchmarks.startup [--runs 40] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness import REPO, AgentProcess
from tests.test_lock import LOCK, read_lock


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _side_by_side(python: Path, xpuctl: Path, socket: Path, runs: int) -> dict[str, Any]:
    base, status = [], []
    for i in range(runs + 3):
        pair = [
            ("pass", [str(python), "-I", "-c", "pass"]),
            ("status", [str(xpuctl), "--socket", str(socket), "status"]),
        ]
        for name, cmd in pair if i % 2 else reversed(pair):
            took = _time(cmd)
            if i >= 3:  # the first rounds warm the page cache
                (base if name == "pass" else status).append(took)
    p, s = statistics.median(base), statistics.median(status)
    return {
        "python_pass_ms": round(p * 1000, 1),
        "xpuctl_status_ms": round(s * 1000, 1),
        "ratio": round(s / p, 2),
        "runs": runs,
    }


def _installed_venv(where: Path) -> Path:
    """A regular install of this tree (plus texttable, xpuctl's one dependency)."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    texttable = read_lock(LOCK)["texttable"].version
    subprocess.run([*pip, f"texttable=={texttable}"], check=True)
    subprocess.run([*pip, str(REPO)], check=True, cwd=where)
    return venv


def run(runs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="xas", dir="/tmp"))
    (work / "agent").mkdir()
    agent = AgentProcess(work / "agent")
    agent.start()
    try:
        here = Path(sys.executable).parent
        results = {"dev": _side_by_side(Path(sys.executable), here / "xpuctl", agent.socket, runs)}
        venv = _installed_venv(work)
        results["installed"] = _side_by_side(
            venv / "bin" / "python", venv / "bin" / "xpuctl", agent.socket, runs
        )
    finally:
        agent.cleanup()
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("dev", "installed"):
            r = result[name]
            print(
                f"{name:9} xpuctl status {r['xpuctl_status_ms']} ms vs python -I -c pass "
                f"{r['python_pass_ms']} ms: ratio {r['ratio']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
