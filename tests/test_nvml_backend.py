"""The NVIDIA backend end to end through a faithful fake of pynvml (and the real one)."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.backends.base import Backend, BackendAbsent
from agent.backends.nvml.backend import NvmlBackend, create
from agent.backends.nvml.binding import (
    Binding,
    ErrorKind,
    EventKind,
    GpuLostError,
    Handle,
    NvmlError,
    NvmlEvent,
)
from agent.backends.nvml.health import APPLICATION_XIDS, classify
from agent.config import NvmlConfig
from agent.errors import BackendError
from agent.model import Health, Vendor
from tests import fake_pynvml as fake
from tests.fake_pynvml import (
    GIB,
    FakeDriver,
    FakeGpu,
    FakeMigInstance,
    FakeNvml,
    FakeProcess,
)
from tests.harness import until

MIB = 1024 * 1024
# Functions the health thread calls; everything else must run on the one worker thread.
EVENT_FUNCTIONS = (
    "nvmlEventSetCreate",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
)


def two_gpus() -> FakeDriver:
    driver = FakeDriver.with_gpus(2)
    driver.gpus[0].processes = [
        FakeProcess(pid=os.getpid(), used_memory_bytes=3 * GIB, sm_pct=30),
        FakeProcess(pid=999_999_999, used_memory_bytes=1 * GIB, sm_pct=None),
    ]
    return driver


async def start(driver: FakeDriver, nvml: FakeNvml | None = None, **kw: float) -> NvmlBackend:
    backend = create(NvmlConfig(event_timeout_ms=20), nvml_module=nvml or FakeNvml(driver), **kw)
    assert isinstance(backend, NvmlBackend)
    return backend


@pytest.fixture
def driver() -> FakeDriver:
    return two_gpus()


@pytest.fixture
async def backend(driver: FakeDriver) -> AsyncIterator[NvmlBackend]:
    b = await start(driver)
    yield b
    await b.close()


async def health_of(backend: Backend, device_id: str) -> tuple[Health, str | None]:
    sample = {s.device_id: s for s in await backend.sample({})}[device_id]
    return sample.health, sample.health_reason


# -- the fake cannot drift from the real pynvml -------------------------------------------


def public_names() -> list[str]:
    return [n for n in dir(FakeNvml) if not n.startswith("_")]


def test_fake_exposes_only_real_names() -> None:
    missing = [n for n in public_names() if not hasattr(pynvml, n)]
    assert missing == []


@pytest.mark.parametrize(
    "name", [n for n in public_names() if inspect.isfunction(getattr(FakeNvml, n))]
)
def test_fake_functions_have_real_signatures(name: str) -> None:
    real = getattr(pynvml, name)
    ours = getattr(FakeNvml(FakeDriver()), name)
    assert inspect.isfunction(real)
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(real).parameters)


@pytest.mark.parametrize("name", [n for n in public_names() if n.startswith("NVMLError_")])
def test_fake_errors_have_real_codes(name: str) -> None:
    real, ours = getattr(pynvml, name), getattr(fake, name)
    assert ours().value == real().value
    assert issubclass(ours, fake.NVMLError)
    # NVMLError(code) builds the subclass, as pynvml's does.
    assert type(fake.NVMLError(real().value)) is ours


def test_fake_constants_and_structs_match_real() -> None:
    for name in fake.EXPORTED:
        value = getattr(fake, name)
        if isinstance(value, int):
            assert value == getattr(pynvml, name), name
        elif name.startswith(("c_nvml", "nvmlPciInfo")):
            real_fields = [f[0] for f in getattr(pynvml, name)._fields_]
            assert [f.name for f in fields(value)] == real_fields, name
    real_process = [f[0] for f in pynvml.c_nvmlProcessInfo_v3_t._fields_]
    assert list(fake.PROCESS_INFO_FIELDS) == real_process


# -- creation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "driver",
    [FakeDriver(library_found=False), FakeDriver(driver_loaded=False)],
    ids=["no-library", "no-driver"],
)
def test_absent_driver_is_backend_absent(driver: FakeDriver) -> None:
    with pytest.raises(BackendAbsent, match="NVIDIA driver not available"):
        create(NvmlConfig(), nvml_module=FakeNvml(driver))


def test_broken_driver_is_a_backend_error() -> None:
    class Mismatched(FakeNvml):
        def nvmlInit(self) -> None:
            raise fake.NVMLError_LibRmVersionMismatch()

    with pytest.raises(BackendError, match="failed to initialise"):
        create(NvmlConfig(), nvml_module=Mismatched(FakeDriver()))


async def test_real_pynvml_is_absent_or_works() -> None:
    """Without a GPU (CI) this is BackendAbsent; on a GPU node it reads real cards."""
    try:
        backend = await asyncio.to_thread(create, NvmlConfig(event_timeout_ms=100))
    except BackendAbsent:
        return
    try:
        devices = await backend.discover()
        samples = await backend.sample({})
        assert devices
        assert all(d.id.startswith("GPU-") and d.memory_total_mib > 0 for d in devices)
        assert {s.device_id for s in samples} == {d.id for d in devices}
        assert all(s.memory_used_mib is not None for s in samples)
    finally:
        await backend.close()


# -- discovery and sampling ---------------------------------------------------------------


async def test_discovery_keys_devices_by_uuid(backend: NvmlBackend, driver: FakeDriver) -> None:
    devices = await backend.discover()
    assert [d.id for d in devices] == [g.uuid for g in driver.gpus]
    first = devices[0]
    assert first.backend == "nvml"
    assert first.vendor is Vendor.NVIDIA
    assert first.uuid == first.id
    assert first.pci_bus_id == "00000000:3B:00.0"
    assert first.model == "NVIDIA H100 80GB HBM3"
    assert first.memory_total_mib == 80 * 1024
    assert first.index == 0
    assert first.health is Health.OK
    assert first.hardware_partitions == ()
    assert first.attributes["driver_version"] == "550.54.15"
    assert "mig_mode" not in first.attributes


async def test_sample_reads_telemetry_and_processes(
    backend: NvmlBackend, driver: FakeDriver
) -> None:
    await backend.discover()
    samples = {s.device_id: s for s in await backend.sample({})}
    s = samples[driver.gpus[0].uuid]
    assert s.memory_used_mib == 2048  # v2: reserved memory is not "used"
    assert s.utilisation_pct == 10.0
    assert s.temperature_c == 40.0
    assert s.power_w == 70.0
    assert s.health is Health.OK
    procs = {p.pid: p for p in s.processes}
    me = procs[os.getpid()]
    assert me.memory_mib == 3 * 1024
    assert me.utilisation_pct == 30.0
    assert me.start_time is not None
    idle = procs[999_999_999]
    assert idle.utilisation_pct == 0.0  # listed, no samples: it ran no kernels
    assert idle.start_time is None  # no such process here
    assert samples[driver.gpus[1].uuid].processes == ()


async def test_sample_before_discover_discovers(backend: NvmlBackend) -> None:
    assert len(await backend.sample({})) == 2


async def test_not_supported_is_none() -> None:
    driver = FakeDriver.with_gpus(1, temperature_c=None, power_mw=None)
    driver.gpus[0].process_util_supported = False
    driver.gpus[0].processes = [FakeProcess(pid=4242, used_memory_bytes=None, sm_pct=50)]
    backend = await start(driver)
    try:
        (s,) = await backend.sample({})
        assert s.temperature_c is None
        assert s.power_w is None
        (p,) = s.processes
        assert p.memory_mib is None
        assert p.utilisation_pct is None
    finally:
        await backend.close()


async def test_old_driver_falls_back_to_memory_v1_once() -> None:
    driver = FakeDriver.with_gpus(2)
    driver.memory_v2 = False
    backend = await start(driver)
    try:
        await backend.discover()
        samples = await backend.sample({})
        await backend.sample({})
        # v1 counts the driver's reservation as used.
        assert samples[0].memory_used_mib == 2048 + 512
        # One failed v2 probe, then v1 for 2 discoveries + 2 x 2 samples.
        assert driver.called("nvmlDeviceGetMemoryInfo") == 1 + 2 + 4
    finally:
        await backend.close()


async def test_missing_processes_v3_falls_back_to_v2_once() -> None:
    driver = two_gpus()
    driver.processes_v3 = False
    backend = await start(driver)
    try:
        for _ in range(3):
            samples = await backend.sample({})
        assert {p.pid for p in samples[0].processes} == {os.getpid(), 999_999_999}
        assert driver.called("nvmlDeviceGetComputeRunningProcesses_v3") == 1
        assert driver.called("nvmlDeviceGetComputeRunningProcesses_v2") == 6
    finally:
        await backend.close()


async def test_no_process_query_at_all_reports_no_processes() -> None:
    driver = two_gpus()
    driver.processes_v3 = driver.processes_v2 = False
    backend = await start(driver)
    try:
        samples = await backend.sample({})
        assert samples[0].processes == ()
        assert samples[0].memory_used_mib == 2048
    finally:
        await backend.close()


async def test_mig_instances_are_hardware_partitions() -> None:
    driver = FakeDriver.with_gpus(
        1, name="NVIDIA A100-SXM4-80GB", mig_mode=fake.NVML_DEVICE_MIG_ENABLE
    )
    driver.gpus[0].mig_instances = [
        FakeMigInstance(uuid="MIG-aaaa", gpu_instance_id=1),
        FakeMigInstance(uuid="MIG-bbbb", gpu_instance_id=2),
    ]
    backend = await start(driver)
    try:
        (device,) = await backend.discover()
        assert device.hardware_partitions == ("MIG-aaaa", "MIG-bbbb")
        assert device.attributes["mig_mode"] == "enabled"
        (s,) = await backend.sample({})
        assert s.utilisation_pct is None  # NVML has no whole-card utilisation under MIG
        assert s.memory_used_mib == 2048
    finally:
        await backend.close()


async def test_mig_capable_but_disabled() -> None:
    driver = FakeDriver.with_gpus(1, mig_mode=fake.NVML_DEVICE_MIG_DISABLE)
    backend = await start(driver)
    try:
        (device,) = await backend.discover()
        assert device.attributes["mig_mode"] == "disabled"
        assert device.hardware_partitions == ()
    finally:
        await backend.close()


# -- health -------------------------------------------------------------------------------


async def test_lost_gpu_is_reported_lost(backend: NvmlBackend, driver: FakeDriver) -> None:
    await backend.discover()
    driver.gpus[1].lost = True
    health = {s.device_id: s.health for s in await backend.sample({})}
    assert health == {driver.gpus[0].uuid: Health.OK, driver.gpus[1].uuid: Health.LOST}
    # Re-discovery keeps the card under its last known identity, still lost.
    devices = {d.id: d for d in await backend.discover()}
    lost = devices[driver.gpus[1].uuid]
    assert lost.health is Health.LOST
    assert lost.health_reason
    assert lost.pci_bus_id == driver.gpus[1].pci_bus_id
    # A card that answers every discovery query again is usable again.
    driver.gpus[1].lost = False
    devices = {d.id: d for d in await backend.discover()}
    assert devices[driver.gpus[1].uuid].health is Health.OK


async def test_gpu_lost_before_first_discovery_is_skipped(driver: FakeDriver) -> None:
    driver.gpus[0].lost = True
    backend = await start(driver)
    try:
        assert [d.id for d in await backend.discover()] == [driver.gpus[1].uuid]
    finally:
        await backend.close()


async def test_application_xid_is_ignored_critical_xid_marks_unhealthy(
    backend: NvmlBackend, driver: FakeDriver
) -> None:
    await backend.discover()
    await until(lambda: driver.called("nvmlDeviceRegisterEvents") == 2)
    gpu0, gpu1 = (g.uuid for g in driver.gpus)
    driver.push_xid(0, 13)
    driver.push_xid(1, 79)
    # Events are handled in order: once gpu1 is marked, the Xid 13 was seen and ignored.
    async with asyncio.timeout(5):
        while (await health_of(backend, gpu1))[0] is not Health.UNHEALTHY:
            await asyncio.sleep(0.01)
    assert await health_of(backend, gpu1) == (Health.UNHEALTHY, "Xid 79")
    assert await health_of(backend, gpu0) == (Health.OK, None)
    devices = {d.id: d for d in await backend.discover()}
    assert devices[gpu1].health is Health.UNHEALTHY
    assert devices[gpu0].health is Health.OK


async def test_double_bit_ecc_marks_unhealthy(backend: NvmlBackend, driver: FakeDriver) -> None:
    await backend.discover()
    await until(lambda: driver.called("nvmlDeviceRegisterEvents") == 2)
    driver.push_event(0, fake.nvmlEventTypeDoubleBitEccError)
    async with asyncio.timeout(5):
        while (await health_of(backend, driver.gpus[0].uuid))[0] is Health.OK:
            await asyncio.sleep(0.01)
    assert await health_of(backend, driver.gpus[0].uuid) == (
        Health.UNHEALTHY,
        "double-bit ECC error",
    )


async def test_lost_outranks_unhealthy(backend: NvmlBackend, driver: FakeDriver) -> None:
    await backend.discover()
    await until(lambda: driver.called("nvmlDeviceRegisterEvents") == 2)
    driver.gpus[0].lost = True
    await backend.sample({})
    driver.push_xid(0, 79)
    await asyncio.sleep(0.2)
    assert (await health_of(backend, driver.gpus[0].uuid))[0] is Health.LOST


async def test_card_without_event_support_still_works() -> None:
    driver = FakeDriver.with_gpus(1, supported_events=0)
    backend = await start(driver)
    try:
        (device,) = await backend.discover()
        assert device.health is Health.OK
        assert driver.called("nvmlDeviceRegisterEvents") == 0
    finally:
        await backend.close()


@pytest.mark.parametrize("xid", sorted(APPLICATION_XIDS))
def test_classify_application_xids(xid: int) -> None:
    event = NvmlEvent(Handle(object()), EventKind.XID, xid, None, None)
    assert classify(event) is None


@pytest.mark.parametrize("xid", [48, 62, 63, 64, 74, 79, 92, 94, 95, 119])
def test_classify_critical_xids(xid: int) -> None:
    event = NvmlEvent(Handle(object()), EventKind.XID, xid, None, None)
    assert classify(event) == (Health.UNHEALTHY, f"Xid {xid}")


# -- threads ------------------------------------------------------------------------------


async def test_no_nvml_call_on_the_event_loop(driver: FakeDriver) -> None:
    loop_thread = threading.get_ident()
    backend = await start(driver)
    await backend.discover()
    await backend.sample({})
    await backend.sample({})
    await until(lambda: driver.called("nvmlEventSetWait_v2") > 0)
    await backend.close()
    assert loop_thread not in driver.threads()
    workers = driver.threads(exclude=EVENT_FUNCTIONS)
    assert len(workers) == 1  # one NVML worker thread for everything but event waits
    assert driver.threads() - workers  # the event wait has its own thread
    assert driver.called("nvmlShutdown") == 1
    assert driver.called("nvmlEventSetFree") == 1


async def test_closed_backend_refuses_calls(backend: NvmlBackend) -> None:
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(BackendError):
        await backend.sample({})


async def test_hung_nvml_call_times_out(driver: FakeDriver) -> None:
    release = threading.Event()

    class Hanging(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle: Any) -> fake.c_nvmlUtilization_t:
            release.wait(5)
            return super().nvmlDeviceGetUtilizationRates(handle)

    backend = await start(driver, Hanging(driver), call_timeout_s=0.2)
    try:
        await backend.discover()
        with pytest.raises(BackendError, match="did not answer"):
            await backend.sample({})
    finally:
        release.set()
        await backend.close()


async def test_rescan_sees_a_hot_plugged_gpu(backend: NvmlBackend, driver: FakeDriver) -> None:
    assert len(await backend.discover()) == 2
    driver.gpus.append(FakeGpu(uuid="GPU-new", pci_bus_id="00000000:5E:00.0"))
    assert len(await backend.discover()) == 2  # NVML enumerates only at init
    backend.request_rescan()
    devices = await backend.discover()
    assert [d.id for d in devices][-1] == "GPU-new"
    await until(lambda: bool(driver.event_sets) and "GPU-new" in driver.event_sets[-1].registered)
    assert len(driver.event_sets) == 1  # the old event set was freed
    driver.push_xid(2, 79)
    async with asyncio.timeout(5):
        while (await health_of(backend, "GPU-new"))[0] is Health.OK:
            await asyncio.sleep(0.01)
    assert await health_of(backend, "GPU-new") == (Health.UNHEALTHY, "Xid 79")


# -- the binding on its own -----------------------------------------------------------------


def binding_for(driver: FakeDriver, nvml: FakeNvml | None = None) -> tuple[Binding, Handle]:
    b = Binding(nvml or FakeNvml(driver))
    b.init()
    return b, b.handle_by_index(0)


def test_binding_translates_errors() -> None:
    driver = FakeDriver.with_gpus(1)
    b, handle = binding_for(driver)
    driver.gpus[0].lost = True
    with pytest.raises(GpuLostError) as lost:
        b.uuid(handle)
    assert lost.value.code == pynvml.NVML_ERROR_GPU_IS_LOST
    assert lost.value.function == "nvmlDeviceGetUUID"
    with pytest.raises(NvmlError) as bad:
        b.handle_by_index(7)
    assert bad.value.kind is ErrorKind.OTHER


def test_binding_reset_required_is_lost() -> None:
    class NeedsReset(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
            raise fake.NVMLError(fake.NVML_ERROR_RESET_REQUIRED)

    driver = FakeDriver.with_gpus(1)
    b, handle = binding_for(driver, NeedsReset(driver))
    with pytest.raises(GpuLostError):
        b.power_mw(handle)


def test_binding_process_utilisation_without_samples_is_empty() -> None:
    class Quirk(FakeNvml):
        # pynvml raises NVMLError(NVML_SUCCESS) when the size query finds nothing.
        def nvmlDeviceGetProcessUtilization(
            self, handle: Any, timeStamp: int
        ) -> list[fake.c_nvmlProcessUtilizationSample_t]:
            raise fake.NVMLError(fake.NVML_SUCCESS)

    driver = FakeDriver.with_gpus(1, processes=[FakeProcess(pid=1, sm_pct=None)])
    b, handle = binding_for(driver)
    assert b.process_utilisation(handle, 0) == ()  # NotFound
    b, handle = binding_for(driver, Quirk(driver))
    assert b.process_utilisation(handle, 0) == ()


def test_binding_event_wait_times_out_to_none() -> None:
    driver = FakeDriver.with_gpus(1)
    b, handle = binding_for(driver)
    event_set = b.create_event_set()
    assert b.register_health_events(handle, event_set) == {EventKind.XID, EventKind.DOUBLE_BIT_ECC}
    assert b.wait_event(event_set, 1) is None
    driver.push_xid(0, 48)
    event = b.wait_event(event_set, 1000)
    assert event is not None
    assert (event.kind, event.data) == (EventKind.XID, 48)
    assert b.uuid(event.handle) == driver.gpus[0].uuid
    b.free_event_set(event_set)


def test_binding_missing_function_in_old_pynvml() -> None:
    class Old(FakeNvml):
        nvmlDeviceGetComputeRunningProcesses_v3 = None  # type: ignore[assignment]

    driver = FakeDriver.with_gpus(1, processes=[FakeProcess(pid=7)])
    b, handle = binding_for(driver, Old(driver))
    assert [p.pid for p in b.compute_processes(handle)] == [7]
    assert driver.called("nvmlDeviceGetComputeRunningProcesses_v2") == 1


# -- kernel-enforced memory limits (nvmlDeviceSetMemoryLimits_v1) --------------------------


async def test_memory_limits_are_set_read_back_and_cleared_per_cgroup(
    backend: NvmlBackend, driver: FakeDriver, tmp_path: Path
) -> None:
    (device, *_), cgroup = await backend.discover(), tmp_path / "s-1"
    cgroup.mkdir()
    assert await backend.memory_limits_refused(device.id, str(tmp_path)) is None
    driver.gpus[0].cgroup_used_bytes[str(cgroup)] = 3 * fake.MIB
    read = await backend.set_memory_limit(device.id, str(cgroup), 2048)
    assert (read.hard_mib, read.used_mib) == (2048, 3)
    # The driver was given bytes, soft = hard (the slice is also what it is guaranteed).
    assert driver.gpus[0].memory_limits == {str(cgroup): (2048 * fake.MIB, 2048 * fake.MIB)}
    cleared = await backend.set_memory_limit(device.id, str(cgroup), None)
    assert cleared.hard_mib is None and driver.gpus[0].memory_limits == {}


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("no-function", "driver 550.54.15 has no memory limits"),
        ("not-supported", "does not support memory limits on this card"),
    ],
)
async def test_memory_limit_refusals_say_why(mode: str, reason: str, tmp_path: Path) -> None:
    driver = two_gpus()
    driver.memory_limits = mode
    b = await start(driver)
    try:
        device = (await b.discover())[0]
        refused = await b.memory_limits_refused(device.id, str(tmp_path))
        assert refused is not None and reason in refused
        with pytest.raises(BackendError):
            await b.set_memory_limit(device.id, str(tmp_path), 1024)
    finally:
        await b.close()


async def test_setting_limits_needs_root(tmp_path: Path) -> None:
    driver = two_gpus()
    driver.privileged = False
    b = await start(driver)
    try:
        device = (await b.discover())[0]
        with pytest.raises(BackendError, match="nvmlDeviceSetMemoryLimits_v1"):
            await b.set_memory_limit(device.id, str(tmp_path), 1024)
    finally:
        await b.close()
