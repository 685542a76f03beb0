"""GPU health from NVML events, watched on a dedicated thread.

``nvmlEventSetWait`` blocks, so it cannot share the backend's single NVML worker (sampling
would stall behind it) and must never run on the event loop. It waits with a timeout so
that :meth:`HealthWatcher.stop` is honoured within one timeout. Findings reach the event
loop through ``loop.call_soon_threadsafe``; the backend applies them there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping

import structlog

from agent.backends.nvml.binding import (
    Binding,
    EventKind,
    EventSet,
    GpuLostError,
    Handle,
    NvmlError,
    NvmlEvent,
)
from agent.model import Health

log = structlog.get_logger(__name__)

#: Xids caused by the application, not the card: graphics engine exception (13), MMU fault
#: from a bad access (31), GPU stopped processing (43), preemptive cleanup (45), video
#: processor exception (68), context-switch timeout (109). The card stays usable; the same
#: list is the NVIDIA device plugin's default.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

#: Called on the event loop with (uuid, health, reason).
HealthCallback = Callable[[str, Health, str], None]


def classify(
    event: NvmlEvent, application_xids: frozenset[int] = APPLICATION_XIDS
) -> tuple[Health, str] | None:
    """What an NVML event means for the card's health; ``None`` when it does not matter."""
    if event.kind is EventKind.XID:
        if event.data in application_xids:
            return None
        return Health.UNHEALTHY, f"Xid {event.data}"
    if event.kind is EventKind.DOUBLE_BIT_ECC:
        return Health.UNHEALTHY, "double-bit ECC error"
    return None


class HealthWatcher:
    """Registers Xid/ECC events for a set of GPUs and reports health changes."""

    def __init__(
        self,
        binding: Binding,
        loop: asyncio.AbstractEventLoop,
        on_health: HealthCallback,
        *,
        timeout_ms: int = 1000,
        application_xids: frozenset[int] = APPLICATION_XIDS,
    ) -> None:
        self._binding = binding
        self._loop = loop
        self._on_health = on_health
        self._timeout_ms = timeout_ms
        self._application_xids = application_xids
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: dict[str, Handle] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, handles: Mapping[str, Handle]) -> None:
        """Watch ``handles`` (uuid -> handle) on a new thread."""
        if self._thread is not None:
            raise RuntimeError("HealthWatcher already started")
        self._handles = dict(handles)
        self._thread = threading.Thread(target=self._run, name="nvml-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait for it (at most about one wait timeout). Blocks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout_ms / 1000 + 5.0)
            if self._thread.is_alive():
                log.warning("nvml health thread did not stop in time")

    # -- the thread -----------------------------------------------------------------------

    def _report(self, uuid: str, health: Health, reason: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_health, uuid, health, reason)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()

    def _register(self, event_set: EventSet) -> None:
        for uuid, handle in self._handles.items():
            try:
                kinds = self._binding.register_health_events(handle, event_set)
            except GpuLostError as exc:
                self._report(uuid, Health.LOST, exc.message)
                continue
            except NvmlError as exc:
                log.info("nvml health events unavailable", uuid=uuid, error=str(exc))
                continue
            if not kinds:
                log.info("nvml health events not supported", uuid=uuid)

    def _device_of(self, event: NvmlEvent) -> str | None:
        try:
            return self._binding.uuid(event.handle)
        except NvmlError:
            # The card that raised the event may no longer answer; with one card it is known.
            if len(self._handles) == 1:
                return next(iter(self._handles))
            return None

    def _run(self) -> None:
        try:
            event_set = self._binding.create_event_set()
        except NvmlError as exc:
            log.warning("nvml event set unavailable; no Xid health", error=str(exc))
            return
        try:
            self._register(event_set)
            while not self._stop.is_set():
                try:
                    event = self._binding.wait_event(event_set, self._timeout_ms)
                except NvmlError as exc:
                    log.warning("nvml event wait failed", error=str(exc))
                    self._stop.wait(self._timeout_ms / 1000)
                    continue
                if event is None:
                    continue
                verdict = classify(event, self._application_xids)
                if verdict is None:
                    log.info("nvml event ignored", kind=event.kind.value, data=event.data)
                    continue
                uuid = self._device_of(event)
                if uuid is None:
                    log.warning("nvml event for an unknown device", reason=verdict[1])
                    continue
                self._report(uuid, *verdict)
        finally:
            try:
                self._binding.free_event_set(event_set)
            except NvmlError as exc:
                log.debug("nvml event set free failed", error=str(exc))
