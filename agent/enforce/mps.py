"""Managed MPS (``enforcement.nvidia.mps = "managed"``): the agent runs NVIDIA's MPS control
daemon itself, one per NVIDIA card, as NVIDIA's device plugin does per GPU set.

For each card (NVIDIA's MPS documentation, "Starting and stopping MPS"):

1. its pipe and log directories under the runtime directory
   (:func:`agent.core.ladder.mps_pipe_dir`: slices on the card find it there, through
   ``CUDA_MPS_PIPE_DIRECTORY`` in their environment);
2. a control daemon a previous run left behind in that pipe directory (an agent killed with
   ``kill -9``) is told ``quit`` first, so every start is clean;
3. ``nvidia-smi -i <index> -c EXCLUSIVE_PROCESS`` — only MPS's server may then use the card;
4. ``nvidia-cuda-mps-control -d`` with ``CUDA_VISIBLE_DEVICES=<uuid>`` and the two
   directories;
5. the defaults by device **index** — the daemon sees its one card as ``0`` — set to the
   whole card (``set_default_active_thread_percentage 100``,
   ``set_default_device_pinned_mem_limit 0 <card MiB>M``): a slice's environment lowers
   them for its own clients (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``,
   ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<MiB>M``).

Every ``HEALTH_S`` each daemon is asked ``get_server_list``; one that does not answer is
started again, with a backoff (1 s doubling to 60 s). On stop each daemon gets ``quit``
and its card goes back to ``-c DEFAULT`` — also, with ``mps_quit_when_idle``, when the
card's last slice is released (the next slice starts it again). Every tool call has a
timeout and runs off the event loop (``asyncio`` subprocesses).

MPS limits each *client process*: the agent gives each the slice's whole memory, and its
sampling enforcement, which sums a slice's processes, holds a slice of several to its size.
MPS v2 serves one uid at a time per card: a client of another uid waits until the running
server's clients are gone. The agent records ``enforce.mps`` (``action: waiting``) when a
slice's process on a card belongs to another uid than the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.core import ladder
from agent.core.service import NodeService
from agent.model import Device, Vendor

log = structlog.get_logger(__name__)

CONTROL = "nvidia-cuda-mps-control"
SMI = "nvidia-smi"
#: Seconds between health checks, and a tool call's time limit.
HEALTH_S = 2.0
TOOL_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 60.0


@dataclass(slots=True)
class _Daemon:
    device: Device
    pipes: Path
    logs: Path
    running: bool = False
    failures: int = 0
    next_try: float = 0.0
    #: Slices already reported waiting for another uid's MPS server.
    waiting_told: set[str] = field(default_factory=set)


class MpsDaemons:
    def __init__(self, service: NodeService) -> None:
        self.service = service
        self._runtime = Path(service.config.paths.runtime_dir)
        self._daemons: dict[str, _Daemon] = {}

    # -- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await self.reconcile()
                await asyncio.sleep(HEALTH_S)
        finally:
            await asyncio.shield(self.stop_all())

    async def reconcile(self) -> None:
        """Start the daemons of NVIDIA cards that lack one, check the running ones."""
        for device in self.service.inventory.devices.values():
            if device.vendor is not Vendor.NVIDIA or device.hardware_partitions:
                continue
            daemon = self._daemons.get(device.id)
            if daemon is None:
                pipes = ladder.mps_pipe_dir(self._runtime, device.id)
                daemon = self._daemons[device.id] = _Daemon(device, pipes, pipes.parent / "log")
            if self._idle(device.id):
                if daemon.running:
                    await self._stop(daemon)
                    await self._event(device.id, "stopped", why="no slice left")
                continue
            if daemon.running and await self._healthy(daemon):
                continue
            if daemon.running:
                daemon.running = False
                log.warning("MPS control daemon stopped answering", device=device.id)
                await self._event(device.id, "died")
            if time.monotonic() >= daemon.next_try:
                await self._start(daemon)

    async def stop_all(self) -> None:
        for daemon in self._daemons.values():
            if daemon.running:
                await self._stop(daemon)

    def _idle(self, device_id: str) -> bool:
        """No slice on the card, and the operator asked to stop MPS then."""
        if not self.service.config.enforcement.nvidia.mps_quit_when_idle:
            return False
        return not any(s.device == device_id for s in self.service.live.values())

    async def _stop(self, daemon: _Daemon) -> None:
        await self._control(daemon, "quit")
        daemon.running = False
        await self._tool(SMI, "-i", str(daemon.device.index), "-c", "DEFAULT")
        log.info("MPS control daemon stopped", device=daemon.device.id)

    # -- one daemon --------------------------------------------------------------------------

    async def _start(self, daemon: _Daemon) -> None:
        device = daemon.device
        for folder in (daemon.pipes, daemon.logs):
            folder.mkdir(parents=True, exist_ok=True)
            # Clients of every slice's owner connect through the pipe directory.
            os.chmod(folder, 0o755)  # noqa: S103 - read and traverse only, as MPS needs
        if (daemon.pipes / "control").exists():
            await self._control(daemon, "quit")  # left by a previous run: start clean
        ok = await self._tool(SMI, "-i", str(device.index), "-c", "EXCLUSIVE_PROCESS")
        started = ok and await self._tool(CONTROL, "-d", env=self._env(daemon))
        if started:
            defaults = [
                "set_default_active_thread_percentage 100",
                f"set_default_device_pinned_mem_limit 0 {device.memory_total_mib}M",
            ]
            started = await self._control(daemon, *defaults) is not None
        if not started:
            daemon.failures += 1
            backoff = min(BACKOFF_MAX_S, 2.0 ** (daemon.failures - 1))
            daemon.next_try = time.monotonic() + backoff
            log.warning("MPS control daemon not started", device=device.id, retry_in_s=backoff)
            await self._event(device.id, "start failed", retry_in_s=backoff)
            return
        daemon.running = True
        daemon.failures = 0
        log.info("MPS control daemon started", device=device.id, pipes=str(daemon.pipes))
        await self._event(device.id, "started", pipe_directory=str(daemon.pipes))

    async def _healthy(self, daemon: _Daemon) -> bool:
        answer = await self._control(daemon, "get_server_list")
        if answer is None:
            return False
        await self._note_waiting(daemon, answer.split())
        return True

    async def _note_waiting(self, daemon: _Daemon, server_pids: Sequence[str]) -> None:
        """MPS serves one uid at a time: say so when a slice's process belongs to another."""
        uids = set()
        for pid in server_pids:
            with contextlib.suppress(OSError, ValueError):
                uids.add(os.stat(f"/proc/{int(pid)}").st_uid)
        if not uids:
            return
        for slice_ in self.service.live.values():
            if slice_.device != daemon.device.id or slice_.id in daemon.waiting_told:
                continue
            if slice_.processes and slice_.owner_uid not in uids:
                daemon.waiting_told.add(slice_.id)
                await self._event(
                    daemon.device.id, "waiting", slice=slice_.id, server_uids=sorted(uids)
                )

    def _env(self, daemon: _Daemon) -> Mapping[str, str]:
        return {
            "CUDA_VISIBLE_DEVICES": daemon.device.uuid or str(daemon.device.index),
            "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipes),
            "CUDA_MPS_LOG_DIRECTORY": str(daemon.logs),
        }

    async def _control(self, daemon: _Daemon, *commands: str) -> str | None:
        """Send ``commands`` to the daemon (its stdin protocol); its answer, or ``None``."""
        text = "".join(f"{c}\n" for c in commands)
        return await self._run(CONTROL, env=self._env(daemon), stdin=text)

    async def _tool(self, *argv: str, env: Mapping[str, str] | None = None) -> bool:
        return await self._run(*argv, env=env) is not None

    async def _run(
        self, *argv: str, env: Mapping[str, str] | None = None, stdin: str = ""
    ) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("MPS tool cannot start", tool=argv[0], error=str(exc))
            return None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), TOOL_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.warning("MPS tool timed out", tool=argv[0], timeout_s=TOOL_TIMEOUT_S)
            return None
        if proc.returncode != 0:
            log.debug("MPS tool failed", tool=argv, rc=proc.returncode, error=err.decode()[:200])
            return None
        return out.decode(errors="replace")

    async def _event(self, device_id: str, action: str, **data: object) -> None:
        await self.service.record("enforce.mps", {"device": device_id, "action": action, **data})
