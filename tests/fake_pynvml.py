# ruff: noqa: N801 - every name mirrors pynvml (see test_nvml_backend)
"""A stand-in for ``pynvml`` that behaves like it on a configurable node.

:class:`FakeNvml` exposes, under their real names and signatures, the functions, error
classes, constants and struct types the NVML binding uses; ``test_nvml_backend`` checks
each of them against the installed ``pynvml`` so this file cannot drift. The node itself is
a :class:`FakeDriver` (GPUs, driver age, lost cards, pending events) that tests change while
the backend runs. Every call is logged with the calling thread's id.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

GIB = 1024**3
MIB = 1024**2

# -- constants (values as in nvml.h / pynvml) -------------------------------------------------

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MEMORY_LIMIT_MAX = 0xFFFFFFFFFFFFFFFF
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
nvmlMemory_v2 = 0x02000028

nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypePState = 0x4
nvmlEventTypeXidCriticalError = 0x8
nvmlEventTypeNone = 0x0


# -- errors -----------------------------------------------------------------------------------


class NVMLError(Exception):
    """Like pynvml's: ``NVMLError(code)`` builds the subclass for that code; ``.value``."""

    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    code: ClassVar[int | None] = None
    value: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code is not None:
            NVMLError._by_code[cls.code] = cls

    def __new__(cls, value: int | None = None) -> NVMLError:
        code = cls.code if cls.code is not None else value
        target = cls
        if cls is NVMLError and code is not None:
            target = NVMLError._by_code.get(code, cls)
        error = Exception.__new__(target)
        error.value = code if code is not None else NVML_ERROR_UNKNOWN
        return error

    def __str__(self) -> str:
        return f"NVML error {self.value} ({type(self).__name__})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    # pynvml's errors compare by value, which makes them unhashable; so are these.
    __hash__ = None  # type: ignore[assignment]


class NVMLError_Uninitialized(NVMLError):
    code = NVML_ERROR_UNINITIALIZED


class NVMLError_InvalidArgument(NVMLError):
    code = NVML_ERROR_INVALID_ARGUMENT


class NVMLError_NotSupported(NVMLError):
    code = NVML_ERROR_NOT_SUPPORTED


class NVMLError_NoPermission(NVMLError):
    code = NVML_ERROR_NO_PERMISSION


class NVMLError_NotFound(NVMLError):
    code = NVML_ERROR_NOT_FOUND


class NVMLError_DriverNotLoaded(NVMLError):
    code = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_Timeout(NVMLError):
    code = NVML_ERROR_TIMEOUT


class NVMLError_LibraryNotFound(NVMLError):
    code = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    code = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    code = NVML_ERROR_GPU_IS_LOST


class NVMLError_ResetRequired(NVMLError):
    code = NVML_ERROR_RESET_REQUIRED


class NVMLError_LibRmVersionMismatch(NVMLError):
    code = NVML_ERROR_LIB_RM_VERSION_MISMATCH


class NVMLError_ArgumentVersionMismatch(NVMLError):
    code = NVML_ERROR_ARGUMENT_VERSION_MISMATCH


class NVMLError_Unknown(NVMLError):
    code = NVML_ERROR_UNKNOWN


class NVMLLibraryMismatchError(Exception):
    """pynvml's error for an unversioned wrapper whose versioned C symbol is missing."""


# -- struct-like return values (the real field names) ----------------------------------------


@dataclass
class c_nvmlMemory_t:
    total: int = 0
    free: int = 0
    used: int = 0


@dataclass
class c_nvmlMemory_v2_t:
    version: int = 0
    total: int = 0
    reserved: int = 0
    free: int = 0
    used: int = 0


@dataclass
class c_nvmlSetMemoryLimits_v1_t:
    nameSpace: bytes | None = None
    softLimit: int = 0
    hardLimit: int = 0


@dataclass
class c_nvmlGetMemoryLimits_v1_t:
    nameSpace: bytes | None = None
    softLimit: int = 0
    hardLimit: int = 0
    currentUsed: int = 0


@dataclass
class c_nvmlUtilization_t:
    gpu: int = 0
    memory: int = 0


@dataclass
class nvmlPciInfo_t:
    busIdLegacy: str = ""
    domain: int = 0
    bus: int = 0
    device: int = 0
    pciDeviceId: int = 0
    pciSubSystemId: int = 0
    busId: str = ""


@dataclass
class c_nvmlProcessUtilizationSample_t:
    pid: int = 0
    timeStamp: int = 0
    smUtil: int = 0
    memUtil: int = 0
    encUtil: int = 0
    decUtil: int = 0


@dataclass
class c_nvmlEventData_t:
    device: object = None
    eventType: int = 0
    eventData: int = 0
    gpuInstanceId: int = 0
    computeInstanceId: int = 0


#: The fields of c_nvmlProcessInfo_v2_t / _v3_t, which pynvml returns as friendly objects.
PROCESS_INFO_FIELDS = ("pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId")


class nvmlFriendlyObject:
    """pynvml's attribute bag for process lists: one attribute per struct field."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key, value in dictionary.items():
            setattr(self, key, value)


# -- the node being faked ---------------------------------------------------------------------


@dataclass
class FakeProcess:
    pid: int
    #: None: the driver cannot attribute memory (pynvml reports usedGpuMemory=None).
    used_memory_bytes: int | None = 1 * GIB
    #: SM utilisation samples since the last query; None: no sample (the process was idle).
    sm_pct: int | None = None
    gpu_instance_id: int = 0xFFFFFFFF
    compute_instance_id: int = 0xFFFFFFFF


@dataclass
class FakeMigInstance:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    memory_total_bytes: int = 10 * GIB
    gpu_instance_id: int = 1
    compute_instance_id: int = 0


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    pci_bus_id: str = "00000000:3B:00.0"
    pci_device_id: int = 0x233010DE
    memory_total_bytes: int = 80 * GIB
    memory_used_bytes: int = 2 * GIB
    memory_reserved_bytes: int = 512 * MIB
    gpu_util_pct: int = 10
    memory_util_pct: int = 5
    #: None: the sensor is not supported (NVMLError_NotSupported).
    temperature_c: int | None = 40
    power_mw: int | None = 70_000
    process_util_supported: bool = True
    processes: list[FakeProcess] = field(default_factory=list)
    #: None: MIG not supported; otherwise NVML_DEVICE_MIG_DISABLE / _ENABLE.
    mig_mode: int | None = None
    mig_instances: list[FakeMigInstance] = field(default_factory=list)
    max_mig_devices: int = 7
    #: Every query of a lost card raises NVMLError_GpuIsLost.
    lost: bool = False
    #: Device-memory limits per cgroup path: (soft, hard) bytes; bytes used per cgroup.
    memory_limits: dict[str, tuple[int, int]] = field(default_factory=dict)
    cgroup_used_bytes: dict[str, int] = field(default_factory=dict)
    supported_events: int = (
        nvmlEventTypeSingleBitEccError
        | nvmlEventTypeDoubleBitEccError
        | nvmlEventTypePState
        | nvmlEventTypeXidCriticalError
    )


@dataclass
class FakeDriver:
    """The node's NVIDIA driver and cards, as a scenario tests can change while it runs."""

    gpus: list[FakeGpu] = field(default_factory=list)
    library_found: bool = True
    driver_loaded: bool = True
    driver_version: str = "550.54.15"
    #: An old driver (< 510) lacks nvmlDeviceGetMemoryInfo_v2.
    memory_v2: bool = True
    #: Drivers before 510 lack ..._v3, before 470 lack ..._v2.
    processes_v3: bool = True
    processes_v2: bool = True
    #: Cgroup memory limits: "yes"; "no-function" (a driver without the symbols: pynvml
    #: raises FunctionNotFound); "not-supported" (the card or kernel refuses).
    memory_limits: str = "yes"
    #: Whether the caller is root (setting limits needs it).
    privileged: bool = True
    #: (function name, threading.get_ident()) per call, in call order.
    calls: list[tuple[str, int]] = field(default_factory=list)
    event_sets: list[_EventSet] = field(default_factory=list)

    @classmethod
    def with_gpus(cls, count: int, **gpu: Any) -> FakeDriver:
        return cls(
            gpus=[
                FakeGpu(
                    uuid=f"GPU-{i:08x}-0000-0000-0000-00000000000{i}",
                    pci_bus_id=f"00000000:{0x3B + i:02X}:00.0",
                    **gpu,
                )
                for i in range(count)
            ]
        )

    def push_event(self, gpu_index: int, event_type: int, data: int = 0) -> None:
        """Deliver an event to every event set that registered it for that GPU."""
        gpu = self.gpus[gpu_index]
        for event_set in list(self.event_sets):
            if event_set.registered.get(gpu.uuid, 0) & event_type:
                event_set.pending.put((gpu, event_type, data))

    def push_xid(self, gpu_index: int, xid: int) -> None:
        self.push_event(gpu_index, nvmlEventTypeXidCriticalError, xid)

    def threads(self, *, exclude: tuple[str, ...] = ()) -> set[int]:
        return {ident for name, ident in self.calls if name not in exclude}

    def called(self, name: str) -> int:
        return sum(1 for called, _ in self.calls if called == name)


@dataclass(eq=False)
class _Handle:
    """A device handle; like the real pointers, compared by identity."""

    gpu: FakeGpu
    mig: FakeMigInstance | None = None


@dataclass(eq=False)
class _EventSet:
    registered: dict[str, int] = field(default_factory=dict)
    pending: queue.Queue[tuple[FakeGpu, int, int]] = field(default_factory=queue.Queue)


class FakeNvml:
    """The ``pynvml`` module as seen through one :class:`FakeDriver`."""

    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver
        self._lock = threading.Lock()
        self._refcount = 0
        self._visible: list[_Handle] = []

    # -- helpers ------------------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self._driver.calls.append((name, threading.get_ident()))

    def _initialised(self, name: str) -> None:
        self._enter(name)
        if self._refcount == 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, name: str, handle: _Handle) -> FakeGpu:
        self._initialised(name)
        if handle.gpu.lost:
            raise NVMLError_GpuIsLost()
        return handle.gpu

    # -- library ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if not self._driver.library_found:
            raise NVMLError_LibraryNotFound()
        if not self._driver.driver_loaded:
            raise NVMLError_DriverNotLoaded()
        with self._lock:
            if self._refcount == 0:
                # NVML enumerates GPUs when it initialises, not later.
                self._visible = [_Handle(gpu) for gpu in self._driver.gpus]
            self._refcount += 1

    def nvmlShutdown(self) -> None:
        self._initialised("nvmlShutdown")
        with self._lock:
            self._refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._initialised("nvmlSystemGetDriverVersion")
        return self._driver.driver_version

    # -- devices ------------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._initialised("nvmlDeviceGetCount")
        return len(self._visible)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._initialised("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self._visible):
            raise NVMLError_InvalidArgument()
        return self._visible[index]

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        gpu = self._gpu("nvmlDeviceGetIndex", handle)
        return next(i for i, h in enumerate(self._visible) if h.gpu is gpu)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        gpu = self._gpu("nvmlDeviceGetUUID", handle)
        return handle.mig.uuid if handle.mig else gpu.uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        gpu = self._gpu("nvmlDeviceGetName", handle)
        return handle.mig.name if handle.mig else gpu.name

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> nvmlPciInfo_t:
        gpu = self._gpu("nvmlDeviceGetPciInfo", handle)
        domain, bus, rest = gpu.pci_bus_id.split(":")
        return nvmlPciInfo_t(
            busIdLegacy=gpu.pci_bus_id[4:],
            domain=int(domain, 16),
            bus=int(bus, 16),
            device=int(rest.split(".")[0], 16),
            pciDeviceId=gpu.pci_device_id,
            pciSubSystemId=0x16C110DE,
            busId=gpu.pci_bus_id,
        )

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> c_nvmlMemory_t | c_nvmlMemory_v2_t:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if handle.mig is not None:
            total, used, reserved = handle.mig.memory_total_bytes, 0, 0
        else:
            total, used, reserved = (
                gpu.memory_total_bytes,
                gpu.memory_used_bytes,
                gpu.memory_reserved_bytes,
            )
        if not version:
            # v1 counts the driver's reservation as used.
            return c_nvmlMemory_t(total=total, free=total - used - reserved, used=used + reserved)
        if not self._driver.memory_v2:
            raise NVMLError_FunctionNotFound()
        if version != nvmlMemory_v2:
            raise NVMLError_ArgumentVersionMismatch()
        return c_nvmlMemory_v2_t(
            version=version, total=total, reserved=reserved, free=total - used - reserved, used=used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> c_nvmlUtilization_t:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if gpu.mig_mode == NVML_DEVICE_MIG_ENABLE:
            raise NVMLError_NotSupported()
        return c_nvmlUtilization_t(gpu=gpu.gpu_util_pct, memory=gpu.memory_util_pct)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if gpu.temperature_c is None or sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_NotSupported()
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        gpu = self._gpu("nvmlDeviceGetPowerUsage", handle)
        if gpu.power_mw is None:
            raise NVMLError_NotSupported()
        return gpu.power_mw

    def _processes(self, name: str, handle: _Handle) -> list[nvmlFriendlyObject]:
        gpu = self._gpu(name, handle)
        return [
            nvmlFriendlyObject(
                dict(
                    zip(
                        PROCESS_INFO_FIELDS,
                        (p.pid, p.used_memory_bytes, p.gpu_instance_id, p.compute_instance_id),
                        strict=True,
                    )
                )
            )
            for p in gpu.processes
        ]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: _Handle) -> list[Any]:
        if not self._driver.processes_v3:
            self._enter("nvmlDeviceGetComputeRunningProcesses_v3")
            raise NVMLError_FunctionNotFound()
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle) -> list[Any]:
        if not self._driver.processes_v2:
            self._enter("nvmlDeviceGetComputeRunningProcesses_v2")
            raise NVMLError_FunctionNotFound()
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        # pynvml 13 delegates the unversioned name to _v3 and reports a missing symbol so.
        if not self._driver.processes_v3:
            self._enter("nvmlDeviceGetComputeRunningProcesses")
            raise NVMLLibraryMismatchError("Unversioned function called ...")
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle)

    def nvmlDeviceGetProcessUtilization(
        self, handle: _Handle, timeStamp: int
    ) -> list[c_nvmlProcessUtilizationSample_t]:
        gpu = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        if not gpu.process_util_supported or gpu.mig_mode == NVML_DEVICE_MIG_ENABLE:
            raise NVMLError_NotSupported()
        now_us = int(time.time() * 1_000_000)
        samples = [
            c_nvmlProcessUtilizationSample_t(pid=p.pid, timeStamp=now_us, smUtil=p.sm_pct)
            for p in gpu.processes
            if p.sm_pct is not None and now_us > timeStamp
        ]
        if not samples:
            raise NVMLError_NotFound()
        return samples

    # -- MIG ----------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, device: _Handle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetMigMode", device)
        if gpu.mig_mode is None:
            raise NVMLError_NotSupported()
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: _Handle) -> int:
        gpu = self._gpu("nvmlDeviceGetMaxMigDeviceCount", device)
        if gpu.mig_mode is None:
            raise NVMLError_NotSupported()
        return gpu.max_mig_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: _Handle, index: int) -> _Handle:
        gpu = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if gpu.mig_mode is None or index >= gpu.max_mig_devices:
            raise NVMLError_InvalidArgument()
        if gpu.mig_mode != NVML_DEVICE_MIG_ENABLE or index >= len(gpu.mig_instances):
            raise NVMLError_NotFound()
        return _Handle(gpu, gpu.mig_instances[index])

    def nvmlDeviceGetGpuInstanceId(self, device: _Handle) -> int:
        self._gpu("nvmlDeviceGetGpuInstanceId", device)
        if device.mig is None:
            raise NVMLError_InvalidArgument()
        return device.mig.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, device: _Handle) -> int:
        self._gpu("nvmlDeviceGetComputeInstanceId", device)
        if device.mig is None:
            raise NVMLError_InvalidArgument()
        return device.mig.compute_instance_id

    # -- events -------------------------------------------------------------------------------

    # -- cgroup memory limits ---------------------------------------------------------------

    def _limits_gpu(self, name: str, device: _Handle, namespace: bytes | None) -> FakeGpu:
        gpu = self._gpu(name, device)
        if self._driver.memory_limits == "no-function":
            raise NVMLError_FunctionNotFound()
        if self._driver.memory_limits == "not-supported" or device.mig is not None:
            raise NVMLError_NotSupported()
        if not namespace or not os.path.isdir(namespace.decode()):
            raise NVMLError_InvalidArgument()  # the cgroup must exist
        return gpu

    def nvmlDeviceSetMemoryLimits_v1(self, device: _Handle, limits: Any) -> None:
        gpu = self._limits_gpu("nvmlDeviceSetMemoryLimits_v1", device, limits.nameSpace)
        if not self._driver.privileged:
            raise NVMLError_NoPermission()
        key = limits.nameSpace.decode()
        if limits.softLimit == 0 and limits.hardLimit == NVML_DEVICE_MEMORY_LIMIT_MAX:
            gpu.memory_limits.pop(key, None)
        else:
            gpu.memory_limits[key] = (limits.softLimit, limits.hardLimit)

    def nvmlDeviceGetMemoryLimits_v1(self, device: _Handle, limits: Any) -> None:
        gpu = self._limits_gpu("nvmlDeviceGetMemoryLimits_v1", device, limits.nameSpace)
        key = limits.nameSpace.decode()
        soft, hard = gpu.memory_limits.get(key, (0, NVML_DEVICE_MEMORY_LIMIT_MAX))
        limits.softLimit, limits.hardLimit = soft, hard
        limits.currentUsed = gpu.cgroup_used_bytes.get(key, 0)

    def nvmlEventSetCreate(self) -> _EventSet:
        self._initialised("nvmlEventSetCreate")
        event_set = _EventSet()
        self._driver.event_sets.append(event_set)
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: _Handle) -> int:
        return self._gpu("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(
        self, handle: _Handle, eventTypes: int, eventSet: _EventSet
    ) -> None:
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        if eventTypes & ~gpu.supported_events:
            raise NVMLError_NotSupported()
        eventSet.registered[gpu.uuid] = eventSet.registered.get(gpu.uuid, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: _EventSet, timeoutms: int) -> c_nvmlEventData_t:
        self._initialised("nvmlEventSetWait_v2")
        try:
            gpu, event_type, data = eventSet.pending.get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise NVMLError_Timeout() from None
        handle = next((h for h in self._visible if h.gpu is gpu), _Handle(gpu))
        return c_nvmlEventData_t(
            device=handle,
            eventType=event_type,
            eventData=data,
            gpuInstanceId=0xFFFFFFFF,
            computeInstanceId=0xFFFFFFFF,
        )

    def nvmlEventSetFree(self, eventSet: _EventSet) -> None:
        self._initialised("nvmlEventSetFree")
        if eventSet in self._driver.event_sets:
            self._driver.event_sets.remove(eventSet)


#: Module-level names FakeNvml exposes as attributes, as pynvml does.
EXPORTED = tuple(
    name
    for name in dict(globals())
    if name.startswith(("NVML_", "nvmlEventType", "NVMLError", "c_nvml", "nvmlPciInfo"))
    or name in ("nvmlMemory_v2", "nvmlFriendlyObject", "NVMLLibraryMismatchError")
)
for _name in EXPORTED:
    setattr(FakeNvml, _name, globals()[_name])
