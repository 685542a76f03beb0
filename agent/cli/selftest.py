"""``xpu-agent selftest``: prove, on this node's own hardware, which enforcement holds.

Run as root on a node whose agent is running. On one card (the first NVIDIA card, or
``--device``) it:

1. reports the card's enforcement rung and why each stronger rung was refused;
2. **memory**: allocates a slice and, through ``xpuctl run --slice`` (bound before it
   runs, as users' jobs are), starts a process that allocates twice the slice — on an
   NVIDIA card with the CUDA driver API through ``ctypes`` (``libcuda.so.1``), on a mock
   card in host memory. It passes when the allocation is refused (the driver's limits,
   MPS, HAMi-core) or when the agent ends the process soon after it went over (sampling).
   A stronger rung that lets the allocation through fails the check;
3. **compute**: two slices of 30 % and 70 % of the card run busy processes at once; it
   passes when each one's measured share is within 15 points of its quota (NVIDIA: needs
   PyTorch for the busy kernels, else it is reported as not checked);
4. **cleanup**: every slice it made is released and every process it started is gone.

It prints one report and exits 0 when every check passed, 1 when one failed, 2 when it
could not run (no agent, no such card). It takes well under 5 minutes (about 30 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from agent.client.http import AgentClient, ClientError, resolve_socket

#: How long the agent may take to act on a process over its memory.
ACT_WITHIN_S = 15.0
#: How long the compute shares are sampled, after a settling period.
COMPUTE_SETTLE_S = 3.0
COMPUTE_MEASURE_S = 6.0
COMPUTE_TOLERANCE_PCT = 15.0

_CUDA_ALLOC = r"""
import ctypes, sys, time
mib = int(sys.argv[1])
cuda = ctypes.CDLL("libcuda.so.1")
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
for rc in (cuda.cuInit(0), cuda.cuDeviceGet(ctypes.byref(dev), 0),
           cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev)):
    if rc:
        print(f"error {rc}", flush=True); sys.exit(3)
rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20))
print("refused" if rc == 2 else ("allocated" if rc == 0 else f"error {rc}"), flush=True)
time.sleep(60)
"""
_HOST_ALLOC = r"""
import sys, time
block = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("allocated", flush=True)
time.sleep(60)
"""
_TORCH_BUSY = r"""
import time, torch
a = torch.randn(4096, 4096, device="cuda")
end = time.monotonic() + 30
while time.monotonic() < end:
    a = a @ a; a = a / a.norm(); torch.cuda.synchronize()
"""
_CPU_BUSY = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    outcome: str  # "PASS" | "FAIL" | "SKIP"
    detail: str


class SelfTest:
    def __init__(
        self,
        client: AgentClient,
        socket: str,
        device: dict[str, Any],
        python: str,
        within_s: float = ACT_WITHIN_S,
    ) -> None:
        self.client = client
        self.within_s = within_s
        #: The interpreter the probes run in (one with PyTorch for the compute check).
        self.python = python
        self.socket = socket
        self.device = device
        self.nvidia = device["vendor"] == "nvidia"
        self.slices: list[str] = []
        self.children: list[subprocess.Popen[str]] = []

    # -- the checks -----------------------------------------------------------------------

    def rung(self) -> Check:
        held = self.device.get("enforcement") or {}
        refused = "; ".join(f"{r}: {why}" for r, why in (held.get("refused") or {}).items())
        return Check(
            "rung", "PASS", f"{held.get('rung', '?')}" + (f" ({refused})" if refused else "")
        )

    def memory(self) -> Check:
        # A mock card's memory is host memory: keep the probe small there.
        size = max(64, min(1024 if self.nvidia else 256, self.device["memory_total_mib"] // 8))
        made = self._slice(size, 20)
        try:
            return self._memory(made, size)
        finally:
            self._free(made)  # the compute check needs the whole card

    def _memory(self, made: str, size: int) -> Check:
        child = self._run(made, _CUDA_ALLOC if self.nvidia else _HOST_ALLOC, str(2 * size))
        assert child.stdout is not None
        said = child.stdout.readline().strip()
        rung = (self.device.get("enforcement") or {}).get("rung", "sampling")
        if said == "refused":
            child.terminate()
            return Check("memory", "PASS", f"an allocation of 2 x {size} MiB was refused ({rung})")
        if not said:  # ended before it could say: did the agent act while it allocated?
            code = child.wait(self.within_s)
            if self._acted_on(made) and rung == "sampling":
                return Check(
                    "memory",
                    "PASS",
                    f"the agent ended the process while it allocated 2 x {size} MiB (sampling)",
                )
            return Check(
                "memory", "FAIL", f"the probe ended (exit {code}) and the agent did not act"
            )
        if said != "allocated":
            child.terminate()
            return Check("memory", "FAIL", f"the probe could not run: {said}")
        started = time.monotonic()
        try:
            child.wait(self.within_s)
        except subprocess.TimeoutExpired:
            child.terminate()
            return Check(
                "memory",
                "FAIL",
                f"2 x {size} MiB allocated and not acted on in {self.within_s:g} s ({rung})",
            )
        took = time.monotonic() - started
        if not self._acted_on(made):
            return Check(
                "memory", "FAIL", f"the probe ended after {took:.1f} s, not by the agent's hand"
            )
        if rung != "sampling":
            return Check(
                "memory",
                "FAIL",
                f"{rung} let 2 x {size} MiB through; sampling ended the process {took:.1f} s later",
            )
        return Check(
            "memory",
            "PASS",
            f"the agent ended the process {took:.1f} s after it "
            f"allocated 2 x {size} MiB (sampling)",
        )

    def compute(self) -> Check:
        if self.nvidia:
            has_torch = subprocess.run(
                [self.python, "-c", "import torch"], capture_output=True, check=False
            )
            if has_torch.returncode != 0:
                return Check(
                    "compute", "SKIP", f"no PyTorch for {self.python}: no busy kernels (--python)"
                )
        busy = _TORCH_BUSY if self.nvidia else _CPU_BUSY
        small, large = self._slice(256, 30), self._slice(256, 70)
        runs = [self._run(small, busy), self._run(large, busy)]
        time.sleep(COMPUTE_SETTLE_S)
        shares: dict[str, list[float]] = {small: [], large: []}
        until = time.monotonic() + COMPUTE_MEASURE_S
        while time.monotonic() < until:
            for slice_id, seen in shares.items():
                usage = self.client.get(f"/v1/slices/{slice_id}").get("usage") or {}
                seen.append(float(usage.get("compute_used_pct") or 0.0))
            time.sleep(0.5)
        for child in runs:
            child.terminate()
        got = {k: statistics.median(v) for k, v in shares.items()}
        detail = f"30 % slice used {got[small]:.0f} %, 70 % slice used {got[large]:.0f} %"
        ok = (
            abs(got[small] - 30) <= COMPUTE_TOLERANCE_PCT
            and abs(got[large] - 70) <= COMPUTE_TOLERANCE_PCT
        )
        return Check("compute", "PASS" if ok else "FAIL", detail)

    def cleanup(self) -> Check:
        for child in self.children:
            if child.poll() is None:
                child.terminate()  # xpuctl passes it on to its command
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        for slice_id in self.slices:
            self._free(slice_id)
        left = [s["id"] for s in self.client.get("/v1/slices") if s["id"] in self.slices]
        alive = [c.pid for c in self.children if _alive(c.pid)]
        if left or alive:
            return Check("cleanup", "FAIL", f"slices left {left}, processes left {alive}")
        return Check("cleanup", "PASS", f"{len(self.slices)} slices released, no process left")

    # -- plumbing -------------------------------------------------------------------------

    def _slice(self, mib: int, compute: int) -> str:
        made = self.client.request(
            "POST",
            "/v1/slices",
            {
                "memory_mib": mib,
                "compute_pct": compute,
                "device": self.device["id"],
                "ttl_s": 300,
                "labels": {"selftest": "1"},
            },
        )
        self.slices.append(made["id"])
        return str(made["id"])

    def _acted_on(self, slice_id: str) -> bool:
        """Whether the agent itself ended a process of the slice for its memory (not, say,
        the kernel's OOM killer)."""
        events = self.client.get("/v1/events?limit=500")
        return any(
            e["kind"] == "enforce.memory"
            and e.get("slice_id") == slice_id
            and e["data"].get("action") in ("term", "kill")
            for e in events
        )

    def _free(self, slice_id: str) -> None:
        with contextlib.suppress(ClientError):
            self.client.request("DELETE", f"/v1/slices/{slice_id}")

    def _run(self, slice_id: str, code: str, *args: str) -> subprocess.Popen[str]:
        """``xpuctl run --slice``: the probe is bound before it runs, as a user's job."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli.xpuctl",
                "--socket",
                self.socket,
                "run",
                "--slice",
                slice_id,
                "--",
                self.python,
                "-c",
                code,
                *args,
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.children.append(child)
        return child


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def run(
    socket: str | None,
    device_id: str | None,
    as_json: bool,
    python: str,
    checks_wanted: tuple[str, ...] = ("memory", "compute"),
    within_s: float = ACT_WITHIN_S,
) -> int:
    path = resolve_socket(socket)
    client = AgentClient(path)
    try:
        devices = client.get("/v1/devices")
    except ClientError as exc:
        print(f"xpu-agent selftest: {exc}", file=sys.stderr)
        return 2
    if device_id is None:
        chosen = next((d for d in devices if d["vendor"] == "nvidia"), None)
        if chosen is None:
            print(
                "xpu-agent selftest: no NVIDIA card on this node (--device ID checks "
                "another: " + ", ".join(d["id"] for d in devices) + ")",
                file=sys.stderr,
            )
            return 2
    else:
        chosen = next((d for d in devices if d["id"] == device_id), None)
        if chosen is None:
            print(f"xpu-agent selftest: no device {device_id!r}", file=sys.stderr)
            return 2
    test = SelfTest(client, path, chosen, python, within_s)
    started = time.monotonic()
    checks = [test.rung()]
    try:
        for name, check in (("memory", test.memory), ("compute", test.compute)):
            if name not in checks_wanted:
                continue
            try:
                checks.append(check())
            except ClientError as exc:
                checks.append(Check(name, "FAIL", f"the agent refused: {exc}"))
    finally:
        checks.append(test.cleanup())
    failed = [c for c in checks if c.outcome == "FAIL"]
    if as_json:
        print(
            json.dumps(
                {
                    "device": chosen["id"],
                    "model": chosen["model"],
                    "seconds": round(time.monotonic() - started, 1),
                    "checks": [
                        {"name": c.name, "outcome": c.outcome, "detail": c.detail} for c in checks
                    ],
                    "passed": not failed,
                },
                indent=2,
            )
        )
    else:
        print(f"xpu-agent selftest on {chosen['id']} ({chosen['model']}), uid {os.geteuid()}")
        for c in checks:
            print(f"  {c.outcome:4}  {c.name:8} {c.detail}")
        print(f"{'FAILED' if failed else 'passed'} in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help="the agent's socket (default: as xpuctl finds it)")
    parser.add_argument("--device", metavar="ID", help="this card (default: the first NVIDIA)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument(
        "--checks",
        default="memory,compute",
        help="which checks besides the rung and cleanup: memory,compute (default both)",
    )
    parser.add_argument(
        "--within",
        type=float,
        default=ACT_WITHIN_S,
        metavar="SECONDS",
        help=f"how long the agent may take to act on a process over its memory "
        f"(default {ACT_WITHIN_S:g})",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter the probes run in (one with PyTorch checks compute on a GPU)",
    )
