"""Huawei Ascend NPUs through ``npu-smi`` (DESIGN.md §1, §7).

Every call is a subprocess with ``LC_ALL=C`` and a timeout, so the event loop never
blocks and a hung driver costs one sample, not the daemon. Calls are kept to the
minimum, because ``npu-smi`` takes tens to hundreds of milliseconds each:

- a sample is one ``npu-smi info``: the overview carries memory, AI core use, health,
  temperature, power and the processes of every chip;
- discovery is one ``npu-smi info`` too, plus ``npu-smi info -m`` (chip logic ids) only
  when the set of chips changed, plus ``npu-smi info -t memory -i N -c M`` only for a
  chip whose memory size the overview does not show.

A device is one chip (die): ``npu-<NPU id>-<chip id>``, the pair ``npu-smi`` itself
addresses chips by (``-i N -c M``), stable across restarts. A 910C NPU has two chips,
hence two devices. The chip's logic id (what ``ASCEND_RT_VISIBLE_DEVICES`` takes) is its
``index`` and ``attributes["logic_id"]`` where known.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from agent import processes
from agent.backends.ascend import parser
from agent.backends.ascend.parser import ChipMapping, ChipRow
from agent.backends.ascend.pci import PciId, read_pci_id
from agent.backends.base import Backend, BackendAbsent
from agent.config import NpuSmiConfig
from agent.errors import BackendError
from agent.model import Device, DeviceSample, Health, ProcessUsage, Vendor

__all__ = ["NpuSmiBackend", "create", "device_id", "find_executable", "run_npu_smi"]

log = structlog.get_logger(__name__)

_TAIL_CHARS = 400
_KILL_WAIT_S = 5.0


def device_id(npu_id: int, chip_id: int) -> str:
    """The stable device id of a chip: ``npu-<NPU id>-<chip id>``."""
    return f"npu-{npu_id}-{chip_id}"


def find_executable(path: str) -> str | None:
    """Absolute path of the configured ``npu-smi`` (a name is looked up on PATH)."""
    if os.sep in path:
        candidate = Path(path).expanduser()
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.resolve())
        return None
    return shutil.which(path)


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process group we started (npu-smi may fork helpers), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.communicate(), _KILL_WAIT_S)


#: The most output one npu-smi call may produce; a 16-card node's largest real capture is
#: tens of KiB. A tool that writes more is broken, and reading it whole would let it grow
#: the agent without bound (50 MB of output cost 950 MB RSS).
MAX_STDOUT_BYTES = 8 * 1024 * 1024
MAX_STDERR_BYTES = 64 * 1024


async def _read_capped(
    stream: asyncio.StreamReader | None, limit: int, overflow: Callable[[], None]
) -> tuple[bytes, bool]:
    """Everything up to ``limit`` bytes; past it, ``overflow()`` (which kills the tool) and
    read on to EOF, keeping nothing, so that the pipe drains and the process is reaped."""
    if stream is None:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    over = False
    while chunk := await stream.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            if not over:
                over = True
                chunks.clear()
                overflow()
            continue
        chunks.append(chunk)
    return b"".join(chunks), over


async def run_npu_smi(executable: str, args: Sequence[str], timeout_s: float) -> str:
    """Run ``npu-smi ARGS`` and return its standard output.

    Raises :class:`BackendError` when it cannot start, exits non-zero or does not finish
    within ``timeout_s``; the process is killed on timeout and on cancellation.
    """
    command = " ".join(["npu-smi", *args])
    env = {**os.environ, "LC_ALL": "C"}
    try:
        proc = await asyncio.create_subprocess_exec(
            executable,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BackendError(f"cannot run {executable}: {exc}", command=command) from exc
    try:

        def overflow() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        async with asyncio.timeout(timeout_s):
            (stdout, over_out), (stderr, over_err) = await asyncio.gather(
                _read_capped(proc.stdout, MAX_STDOUT_BYTES, overflow),
                _read_capped(proc.stderr, MAX_STDERR_BYTES, overflow),
            )
            await proc.wait()
        if over_out or over_err:
            raise BackendError(
                f"`{command}` wrote more than {MAX_STDOUT_BYTES // 1024 // 1024} MiB; killed",
                command=command,
            )
    except TimeoutError:
        raise BackendError(
            f"`{command}` did not answer within {timeout_s:g} s; killed",
            command=command,
            timeout_s=timeout_s,
        ) from None
    finally:
        if proc.returncode is None:
            await _kill(proc)
    if proc.returncode != 0:
        detail = _tail(stderr) or _tail(stdout) or "no output"
        raise BackendError(
            f"`{command}` exited with status {proc.returncode}: {detail}",
            command=command,
            returncode=proc.returncode,
        )
    return stdout.decode("utf-8", errors="replace")


def model_name(name: str) -> str:
    """``910B3`` → ``Ascend910B3``; a name already starting with Ascend is kept."""
    compact = name.replace(" ", "")
    return compact if compact.lower().startswith("ascend") else f"Ascend{compact}"


class NpuSmiBackend(Backend):
    """Ascend chips as ``npu-smi`` reports them.

    ``sysfs_root`` is where the PCI ids are read (tests use a temporary directory);
    ``process_start`` finds a process's start time (tests stub it out).
    """

    name = "npu-smi"

    def __init__(
        self,
        executable: str,
        timeout_s: float = 10.0,
        *,
        sysfs_root: Path = Path("/sys"),
        process_start: Callable[[int], float | None] = processes.start_time,
    ) -> None:
        self._executable = executable
        self._timeout_s = timeout_s
        self._sysfs_root = sysfs_root
        self._process_start = process_start
        self._known: dict[str, Device] = {}
        # `info -m` and per-chip memory sizes do not change while the chips stay the same,
        # so they are asked once per chip set, not on every re-discovery.
        self._chips_key: tuple[tuple[int, int, str | None], ...] | None = None
        self._mapping: dict[tuple[int, int], ChipMapping] = {}
        self._memory_mib: dict[tuple[int, int, str | None], int] = {}
        self._pci: dict[str, PciId | None] = {}

    async def _npu_smi(self, *args: str) -> str:
        return await run_npu_smi(self._executable, args, self._timeout_s)

    async def discover(self) -> Sequence[Device]:
        table = parser.parse_info(await self._npu_smi("info"))
        key = tuple((c.npu_id, c.chip_id, c.bus_id) for c in table.chips)
        if key != self._chips_key:
            self._mapping = await self._chip_map()
            self._chips_key = key
        devices = [
            await self._device(chip, order, table.version) for order, chip in enumerate(table.chips)
        ]
        self._known = {d.id: d for d in devices}
        return devices

    async def _chip_map(self) -> dict[tuple[int, int], ChipMapping]:
        """Logic ids from ``info -m``; optional, as older or restricted setups refuse it."""
        try:
            rows = parser.parse_chip_map(await self._npu_smi("info", "-m"))
        except BackendError as exc:
            log.info("npu-smi info -m unavailable; logic ids unknown", error=exc.detail)
            return {}
        return {(r.npu_id, r.chip_id): r for r in rows if r.is_compute}

    async def _memory_total(self, chip: ChipRow) -> int | None:
        """Memory size from the overview, else once from ``info -t memory -i N -c M``."""
        if chip.device_memory_total_mib:
            return chip.device_memory_total_mib
        key = (chip.npu_id, chip.chip_id, chip.bus_id)
        if key not in self._memory_mib:
            try:
                text = await self._npu_smi(
                    "info", "-t", "memory", "-i", str(chip.npu_id), "-c", str(chip.chip_id)
                )
                size = parser.parse_memory(text).device_memory_mib
            except BackendError as exc:
                log.warning("npu-smi memory details failed", chip=key[:2], error=exc.detail)
                return None
            if size is None:
                return None
            self._memory_mib[key] = size
        return self._memory_mib[key]

    def _pci_id(self, bus_id: str | None) -> PciId | None:
        if bus_id is None:
            return None
        if bus_id not in self._pci:
            self._pci[bus_id] = read_pci_id(bus_id, self._sysfs_root)
        return self._pci[bus_id]

    async def _device(self, chip: ChipRow, order: int, version: str | None) -> Device:
        mapping = self._mapping.get((chip.npu_id, chip.chip_id))
        logic_id = chip.logic_id
        if logic_id is None and mapping is not None:
            logic_id = mapping.logic_id
        attributes = {
            "npu_id": str(chip.npu_id),
            "chip_id": str(chip.chip_id),
            "memory_kind": chip.memory_kind,
        }
        if logic_id is not None:
            attributes["logic_id"] = str(logic_id)
        if chip.phy_id is not None:
            attributes["phy_id"] = str(chip.phy_id)
        if mapping is not None and mapping.chip_name:
            attributes["chip_name"] = mapping.chip_name
        if version is not None:
            attributes["npu_smi_version"] = version
        if template := parser.vnpu_template_of(chip.name):
            attributes["vnpu_template"] = template
        pci = self._pci_id(chip.bus_id)
        if pci is not None:
            attributes["pci_device_id"] = f"0x{pci.device_id:04x}"
            if pci.card_type is not None:
                attributes["card_type"] = pci.card_type
        health, reason = parser.health_of(chip.health)
        total = await self._memory_total(chip)
        if total is None:
            health, reason = Health.UNKNOWN, "npu-smi shows no memory size for this chip"
        return Device(
            id=device_id(chip.npu_id, chip.chip_id),
            backend=self.name,
            vendor=Vendor.ASCEND,
            model=model_name(chip.name),
            index=logic_id if logic_id is not None else order,
            memory_total_mib=total or 0,
            pci_bus_id=chip.bus_id,
            health=health,
            health_reason=reason,
            attributes=attributes,
        )

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        """One ``npu-smi info``; ``npu-smi`` sees device processes itself, so ``bound``
        is not needed. A discovered chip missing from the output is reported UNKNOWN."""
        table = parser.parse_info(await self._npu_smi("info"))
        pids = {p.pid for p in table.processes}
        starts = await asyncio.to_thread(self._start_times, pids) if pids else {}
        by_chip: dict[tuple[int, int], list[ProcessUsage]] = {}
        for row in table.processes:
            by_chip.setdefault((row.npu_id, row.chip_id), []).append(
                ProcessUsage(
                    pid=row.pid,
                    memory_mib=None if row.memory_mib is None else float(row.memory_mib),
                    utilisation_pct=None,  # npu-smi does not split AI core use by process
                    start_time=starts.get(row.pid),
                )
            )
        samples: list[DeviceSample] = []
        for chip in table.chips:
            health, reason = parser.health_of(chip.health)
            used = chip.device_memory_used_mib
            samples.append(
                DeviceSample(
                    device_id=device_id(chip.npu_id, chip.chip_id),
                    memory_used_mib=None if used is None else float(used),
                    utilisation_pct=chip.aicore_pct,
                    temperature_c=chip.temperature_c,
                    power_w=chip.power_w,
                    processes=tuple(by_chip.get((chip.npu_id, chip.chip_id), ())),
                    health=health,
                    health_reason=reason,
                )
            )
        present = {s.device_id for s in samples}
        for missing in sorted(self._known.keys() - present):
            samples.append(
                DeviceSample(
                    device_id=missing,
                    memory_used_mib=None,
                    utilisation_pct=None,
                    health=Health.UNKNOWN,
                    health_reason="chip missing from npu-smi info output",
                )
            )
        return samples

    def _start_times(self, pids: set[int]) -> dict[int, float | None]:
        return {pid: self._process_start(pid) for pid in pids}


def create(config: NpuSmiConfig, *, sysfs_root: Path = Path("/sys")) -> Backend:
    """The ``npu-smi`` backend; :class:`BackendAbsent` when the executable is not found."""
    executable = find_executable(config.path)
    if executable is None:
        raise BackendAbsent(f"npu-smi executable not found: {config.path!r}")
    return NpuSmiBackend(executable, config.timeout_s, sysfs_root=sysfs_root)
