"""Typed wrappers over ``pynvml``: the only module in the project that touches it.

``pynvml`` is untyped, raises one generated exception class per NVML return code and grows
versioned twins of functions (``_v2``, ``_v3``) that old drivers lack. All of that stays here:
callers get frozen dataclasses with units in their names, ``None`` for "not supported", and
three exception types they handle differently. Versioned functions are probed once and the
answer cached, so callers never see a suffix.

A :class:`Binding` is not synchronised: the backend calls it from one worker thread only,
except the event functions, which the health thread uses (NVML itself is thread-safe).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NewType

import structlog

log = structlog.get_logger(__name__)

#: An NVML device handle (a ctypes pointer in the real binding); opaque to callers.
Handle = NewType("Handle", object)
#: An NVML event set; opaque to callers.
EventSet = NewType("EventSet", object)


class ErrorKind(enum.Enum):
    NOT_SUPPORTED = "not supported"
    NOT_FOUND = "not found"
    FUNCTION_NOT_FOUND = "function not found"
    ARGUMENT_VERSION_MISMATCH = "argument version mismatch"
    NO_PERMISSION = "no permission"
    TIMEOUT = "timeout"
    GPU_LOST = "gpu lost"
    ABSENT = "absent"
    OTHER = "other"


class NvmlError(Exception):
    """An NVML call failed; ``code`` is the NVML return code, ``function`` what was called."""

    def __init__(self, kind: ErrorKind, code: int | None, function: str, message: str) -> None:
        super().__init__(f"{function}: {message}")
        self.kind = kind
        self.code = code
        self.function = function
        self.message = message


class GpuLostError(NvmlError):
    """The GPU fell off the bus or needs a reset (``GpuIsLost`` / ``ResetRequired``)."""


class LibraryAbsentError(NvmlError):
    """No NVML library or no loaded driver on this node: the backend does not apply here."""


# NVML return-code constant names -> what callers need to know about them.
_KIND_BY_CONSTANT = {
    "NVML_ERROR_NOT_SUPPORTED": ErrorKind.NOT_SUPPORTED,
    "NVML_ERROR_NOT_FOUND": ErrorKind.NOT_FOUND,
    "NVML_ERROR_FUNCTION_NOT_FOUND": ErrorKind.FUNCTION_NOT_FOUND,
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": ErrorKind.ARGUMENT_VERSION_MISMATCH,
    "NVML_ERROR_NO_PERMISSION": ErrorKind.NO_PERMISSION,
    "NVML_ERROR_TIMEOUT": ErrorKind.TIMEOUT,
    "NVML_ERROR_GPU_IS_LOST": ErrorKind.GPU_LOST,
    "NVML_ERROR_RESET_REQUIRED": ErrorKind.GPU_LOST,
    "NVML_ERROR_LIBRARY_NOT_FOUND": ErrorKind.ABSENT,
    "NVML_ERROR_DRIVER_NOT_LOADED": ErrorKind.ABSENT,
}

# Readings where these mean "this card cannot tell us", i.e. a value of None.
_UNAVAILABLE = frozenset({ErrorKind.NOT_SUPPORTED, ErrorKind.NO_PERMISSION})

MIB = 1024 * 1024

# Newest first; the driver may lack the newer symbols.
_PROCESS_FUNCTIONS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)


@dataclass(frozen=True, slots=True)
class MemoryLimits:
    """A cgroup's device-memory limits as the driver holds them (``None``: no limit)."""

    soft_mib: int | None
    hard_mib: int | None
    used_mib: int


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    total_bytes: int
    used_bytes: int
    free_bytes: int
    #: Driver-reserved memory; only the v2 query reports it (and excludes it from ``used``).
    reserved_bytes: int | None


@dataclass(frozen=True, slots=True)
class Utilisation:
    gpu_pct: int
    memory_pct: int


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    pid: int
    #: None where the driver cannot attribute memory (e.g. WDDM, some MIG setups).
    used_memory_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None


@dataclass(frozen=True, slots=True)
class ProcessUtilSample:
    pid: int
    timestamp_us: int
    sm_pct: int
    memory_pct: int
    encoder_pct: int
    decoder_pct: int


@dataclass(frozen=True, slots=True)
class MigMode:
    enabled: bool
    pending_enabled: bool


@dataclass(frozen=True, slots=True)
class MigInstance:
    """A MIG device: a fixed hardware slice of its parent GPU."""

    uuid: str
    name: str | None
    memory_total_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None


class EventKind(enum.Enum):
    XID = "xid"
    DOUBLE_BIT_ECC = "double-bit ecc"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class NvmlEvent:
    handle: Handle
    kind: EventKind
    #: The Xid number for ``EventKind.XID``; the raw event data otherwise.
    data: int
    gpu_instance_id: int | None
    compute_instance_id: int | None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


class Binding:
    """NVML through an injectable ``pynvml``-like module (tests pass a fake)."""

    def __init__(self, nvml_module: Any = None) -> None:
        self._module: Any = nvml_module
        self._kinds: dict[int, ErrorKind] = {}
        # Probe results: None = not probed yet.
        self._memory_v2: bool | None = None
        self._process_function: str | None = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def _nvml(self) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as exc:
                raise LibraryAbsentError(
                    ErrorKind.ABSENT, None, "import pynvml", "nvidia-ml-py is not installed"
                ) from exc
            self._kinds = {}
        if not self._kinds:
            for constant, kind in _KIND_BY_CONSTANT.items():
                code = getattr(self._module, constant, None)
                if isinstance(code, int):
                    self._kinds[code] = kind
        return self._module

    def _error(self, function: str, exc: BaseException) -> NvmlError:
        code = _int_or_none(getattr(exc, "value", None))
        kind = self._kinds.get(code, ErrorKind.OTHER) if code is not None else ErrorKind.OTHER
        if kind is ErrorKind.GPU_LOST:
            return GpuLostError(kind, code, function, str(exc))
        if kind is ErrorKind.ABSENT:
            return LibraryAbsentError(kind, code, function, str(exc))
        return NvmlError(kind, code, function, str(exc))

    def _call(self, function: str, *args: object, **kwargs: object) -> Any:
        """Call ``pynvml.<function>``, turning its exceptions into ours."""
        nvml = self._nvml
        fn: Callable[..., Any] | None = getattr(nvml, function, None)
        if fn is None:
            # An older nvidia-ml-py that does not know the function at all.
            raise NvmlError(
                ErrorKind.FUNCTION_NOT_FOUND, None, function, "not in this nvidia-ml-py"
            )
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        try:
            return fn(*args, **kwargs)
        except nvml.NVMLError as exc:
            raise self._error(function, exc) from exc
        except Exception as exc:
            # pynvml raises NVMLLibraryMismatchError from unversioned wrappers whose
            # versioned C symbol the driver lacks: the same as a missing function.
            if mismatch is not None and isinstance(exc, mismatch):
                raise NvmlError(ErrorKind.FUNCTION_NOT_FOUND, None, function, str(exc)) from exc
            raise

    def _optional(self, function: str, *args: object) -> Any:
        """Like :meth:`_call`, but "not supported" (or not permitted) is ``None``."""
        try:
            return self._call(function, *args)
        except NvmlError as exc:
            if exc.kind in _UNAVAILABLE:
                return None
            raise

    # -- library --------------------------------------------------------------------------

    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def driver_version(self) -> str | None:
        value = self._optional("nvmlSystemGetDriverVersion")
        return None if value is None else _text(value)

    # -- kernel-enforced memory limits (a cgroup's share of a card) ------------------------

    def _limit_struct(self, name: str, function: str) -> Any:
        struct = getattr(self._nvml, name, None)
        if struct is None:
            raise NvmlError(
                ErrorKind.FUNCTION_NOT_FOUND, None, function, "not in this nvidia-ml-py"
            )
        return struct()

    def memory_limits(self, handle: Handle, namespace: str) -> MemoryLimits:
        """``nvmlDeviceGetMemoryLimits_v1`` for the cgroup at ``namespace`` (its sysfs path):
        soft 0 and hard ``NVML_DEVICE_MEMORY_LIMIT_MAX`` mean no limit."""
        function = "nvmlDeviceGetMemoryLimits_v1"
        limits = self._limit_struct("c_nvmlGetMemoryLimits_v1_t", function)
        limits.nameSpace = namespace.encode()
        self._call(function, handle, limits)
        unlimited = getattr(self._nvml, "NVML_DEVICE_MEMORY_LIMIT_MAX", 2**64 - 1)
        return MemoryLimits(
            soft_mib=int(limits.softLimit) // MIB or None,
            hard_mib=None if limits.hardLimit == unlimited else int(limits.hardLimit) // MIB,
            used_mib=int(limits.currentUsed) // MIB,
        )

    def set_memory_limits(self, handle: Handle, namespace: str, mib: int | None) -> None:
        """``nvmlDeviceSetMemoryLimits_v1``: allocations of the cgroup at ``namespace`` beyond
        ``mib`` fail (soft = hard: the slice's size is also what it is guaranteed);
        ``None`` clears them. Needs root; MIG handles are not supported."""
        function = "nvmlDeviceSetMemoryLimits_v1"
        limits = self._limit_struct("c_nvmlSetMemoryLimits_v1_t", function)
        limits.nameSpace = namespace.encode()
        unlimited = getattr(self._nvml, "NVML_DEVICE_MEMORY_LIMIT_MAX", 2**64 - 1)
        limits.softLimit = 0 if mib is None else mib * MIB
        limits.hardLimit = unlimited if mib is None else mib * MIB
        self._call(function, handle, limits)

    # -- devices --------------------------------------------------------------------------

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle_by_index(self, index: int) -> Handle:
        return Handle(self._call("nvmlDeviceGetHandleByIndex", index))

    def uuid(self, handle: Handle) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    def name(self, handle: Handle) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def pci_bus_id(self, handle: Handle) -> str | None:
        info = self._optional("nvmlDeviceGetPciInfo", handle)
        return None if info is None else _text(info.busId)

    def memory(self, handle: Handle) -> MemoryInfo:
        """Memory figures; the v2 query where the driver has it (v1 counts reserved as used)."""
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if self._memory_v2 is None and version is None:
            self._memory_v2 = False
        if self._memory_v2 is not False:
            try:
                info = self._call("nvmlDeviceGetMemoryInfo", handle, version=version)
            except NvmlError as exc:
                if exc.kind not in (
                    ErrorKind.FUNCTION_NOT_FOUND,
                    ErrorKind.ARGUMENT_VERSION_MISMATCH,
                ):
                    raise
                self._memory_v2 = False
                log.debug("nvml memory v2 unavailable, using v1", error=str(exc))
            else:
                self._memory_v2 = True
                return MemoryInfo(
                    total_bytes=int(info.total),
                    used_bytes=int(info.used),
                    free_bytes=int(info.free),
                    reserved_bytes=int(info.reserved),
                )
        info = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(
            total_bytes=int(info.total),
            used_bytes=int(info.used),
            free_bytes=int(info.free),
            reserved_bytes=None,
        )

    def utilisation(self, handle: Handle) -> Utilisation | None:
        rates = self._optional("nvmlDeviceGetUtilizationRates", handle)
        if rates is None:
            return None
        return Utilisation(gpu_pct=int(rates.gpu), memory_pct=int(rates.memory))

    def temperature_c(self, handle: Handle) -> int | None:
        nvml = self._nvml
        value = self._optional("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
        return None if value is None else int(value)

    def power_mw(self, handle: Handle) -> int | None:
        value = self._optional("nvmlDeviceGetPowerUsage", handle)
        return None if value is None else int(value)

    def compute_processes(self, handle: Handle) -> tuple[ProcessMemory, ...]:
        """Compute processes and their memory; newest versioned query the driver has."""
        candidates: tuple[str, ...] = _PROCESS_FUNCTIONS
        if self._process_function is not None:
            candidates = (self._process_function,)
        for function in candidates:
            try:
                raw = self._call(function, handle)
            except NvmlError as exc:
                if exc.kind is not ErrorKind.FUNCTION_NOT_FOUND or function == candidates[-1]:
                    raise
                log.debug("nvml function unavailable, trying older", function=function)
                continue
            if self._process_function is None:
                self._process_function = function
                log.debug("nvml process query chosen", function=function)
            return tuple(
                ProcessMemory(
                    pid=int(p.pid),
                    used_memory_bytes=_int_or_none(p.usedGpuMemory),
                    gpu_instance_id=_int_or_none(getattr(p, "gpuInstanceId", None)),
                    compute_instance_id=_int_or_none(getattr(p, "computeInstanceId", None)),
                )
                for p in raw
            )
        raise AssertionError("unreachable: the last candidate re-raises")  # pragma: no cover

    def process_utilisation(
        self, handle: Handle, since_us: int
    ) -> tuple[ProcessUtilSample, ...] | None:
        """Samples newer than ``since_us``; empty when none (NVML says "not found").

        ``None`` when the card cannot report per-process utilisation at all.
        """
        try:
            raw = self._call("nvmlDeviceGetProcessUtilization", handle, since_us)
        except NvmlError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                return ()
            if exc.kind in _UNAVAILABLE:
                return None
            # pynvml raises NVMLError(NVML_SUCCESS) when the size query finds no samples.
            if exc.code == getattr(self._nvml, "NVML_SUCCESS", 0):
                return ()
            raise
        return tuple(
            ProcessUtilSample(
                pid=int(s.pid),
                timestamp_us=int(s.timeStamp),
                sm_pct=int(s.smUtil),
                memory_pct=int(s.memUtil),
                encoder_pct=int(s.encUtil),
                decoder_pct=int(s.decUtil),
            )
            for s in raw
        )

    def mig_mode(self, handle: Handle) -> MigMode | None:
        modes = self._optional("nvmlDeviceGetMigMode", handle)
        if modes is None:
            return None
        enable = self._nvml.NVML_DEVICE_MIG_ENABLE
        current, pending = modes
        return MigMode(enabled=current == enable, pending_enabled=pending == enable)

    def mig_instances(self, handle: Handle) -> tuple[MigInstance, ...]:
        """The MIG devices configured on a MIG-enabled GPU (empty slots are skipped)."""
        count = self._optional("nvmlDeviceGetMaxMigDeviceCount", handle)
        found = []
        for slot in range(int(count or 0)):
            try:
                mig = self._call("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            except NvmlError as exc:
                if exc.kind is ErrorKind.NOT_FOUND:
                    continue
                raise
            name = self._optional("nvmlDeviceGetName", mig)
            memory = self._optional("nvmlDeviceGetMemoryInfo", mig)
            gpu_instance = self._optional("nvmlDeviceGetGpuInstanceId", mig)
            compute_instance = self._optional("nvmlDeviceGetComputeInstanceId", mig)
            found.append(
                MigInstance(
                    uuid=_text(self._call("nvmlDeviceGetUUID", mig)),
                    name=None if name is None else _text(name),
                    memory_total_bytes=None if memory is None else int(memory.total),
                    gpu_instance_id=_int_or_none(gpu_instance),
                    compute_instance_id=_int_or_none(compute_instance),
                )
            )
        return tuple(found)

    # -- events (used by the health thread) -------------------------------------------------

    def create_event_set(self) -> EventSet:
        return EventSet(self._call("nvmlEventSetCreate"))

    def free_event_set(self, event_set: EventSet) -> None:
        self._call("nvmlEventSetFree", event_set)

    def register_health_events(self, handle: Handle, event_set: EventSet) -> frozenset[EventKind]:
        """Watch Xid and double-bit ECC events where the card supports them; says which."""
        nvml = self._nvml
        wanted = {
            EventKind.XID: int(nvml.nvmlEventTypeXidCriticalError),
            EventKind.DOUBLE_BIT_ECC: int(nvml.nvmlEventTypeDoubleBitEccError),
        }
        supported = int(self._call("nvmlDeviceGetSupportedEventTypes", handle))
        kinds = frozenset(kind for kind, bit in wanted.items() if supported & bit)
        mask = 0
        for kind in kinds:
            mask |= wanted[kind]
        if mask:
            self._call("nvmlDeviceRegisterEvents", handle, mask, event_set)
        return kinds

    def wait_event(self, event_set: EventSet, timeout_ms: int) -> NvmlEvent | None:
        """The next event, or ``None`` after ``timeout_ms`` without one."""
        nvml = self._nvml
        try:
            data = self._call("nvmlEventSetWait_v2", event_set, timeout_ms)
        except NvmlError as exc:
            if exc.kind is ErrorKind.TIMEOUT:
                return None
            raise
        event_type = int(data.eventType)
        if event_type & int(nvml.nvmlEventTypeXidCriticalError):
            kind = EventKind.XID
        elif event_type & int(nvml.nvmlEventTypeDoubleBitEccError):
            kind = EventKind.DOUBLE_BIT_ECC
        else:
            kind = EventKind.OTHER
        return NvmlEvent(
            handle=Handle(data.device),
            kind=kind,
            data=int(data.eventData),
            gpu_instance_id=_int_or_none(getattr(data, "gpuInstanceId", None)),
            compute_instance_id=_int_or_none(getattr(data, "computeInstanceId", None)),
        )
