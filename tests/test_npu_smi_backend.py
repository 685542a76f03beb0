"""The npu-smi backend end to end: real subprocesses of tests/fake_npu_smi.py.

Each test copies a scenario directory (tests/data/npu-smi/fake/, see its README) to a
temporary directory, so that it can rewrite answers between calls, and logs the fake's
invocations to count them.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from agent.backends.ascend.backend import NpuSmiBackend, create, run_npu_smi
from agent.backends.base import BackendAbsent
from agent.config import NpuSmiConfig
from agent.errors import BackendError
from agent.model import Device, DeviceSample, Health, Vendor

TESTS = Path(__file__).parent
FAKE = TESTS / "fake_npu_smi.py"
DATA = TESTS / "data" / "npu-smi"


class Fake:
    """One scenario of the fake npu-smi, with its call log."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp_path / "scenario"
        self.log = tmp_path / "calls.log"
        self.sysfs = tmp_path / "sys"
        self._monkeypatch = monkeypatch
        monkeypatch.setenv("FAKE_NPU_SMI_LOG", str(self.log))
        monkeypatch.setenv("FAKE_NPU_SMI_DIR", str(self.dir))
        monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")  # the backend must override it
        for name in ("FAKE_NPU_SMI_HANG", "FAKE_NPU_SMI_FAIL"):
            monkeypatch.delenv(name, raising=False)

    def use(self, scenario: str) -> Fake:
        shutil.copytree(DATA / "fake" / scenario, self.dir)
        return self

    def write(self, name: str, text: str) -> None:
        self.dir.mkdir(exist_ok=True)
        (self.dir / name).write_text(text, encoding="utf-8")

    def read(self, name: str) -> str:
        return (self.dir / name).read_text(encoding="utf-8")

    def env(self, name: str, value: str) -> None:
        self._monkeypatch.setenv(name, value)

    def calls(self) -> list[str]:
        """``LC_ALL=<value> <args>`` per call, oldest first; the pid column dropped."""
        if not self.log.exists():
            return []
        return [line.split(" ", 1)[1] for line in self.log.read_text().splitlines()]

    def pids(self) -> list[int]:
        return [int(line.split(" ", 1)[0]) for line in self.log.read_text().splitlines()]

    def pci(self, bus_id: str, device: int) -> None:
        device_dir = self.sysfs / "bus" / "pci" / "devices" / bus_id
        device_dir.mkdir(parents=True)
        (device_dir / "vendor").write_text("0x19e5\n", encoding="ascii")
        (device_dir / "device").write_text(f"0x{device:04x}\n", encoding="ascii")

    def backend(self, timeout_s: float = 10.0) -> NpuSmiBackend:
        return NpuSmiBackend(
            str(FAKE), timeout_s, sysfs_root=self.sysfs, process_start=lambda pid: 1000.0 + pid
        )


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    return Fake(tmp_path, monkeypatch)


def by_id(devices: Sequence[Device]) -> dict[str, Device]:
    return {d.id: d for d in devices}


def by_device(samples: Sequence[DeviceSample]) -> dict[str, DeviceSample]:
    return {s.device_id: s for s in samples}


# --------------------------------------------------------------------------- create


def test_create_finds_the_executable_or_reports_absence(tmp_path: Path) -> None:
    backend = create(NpuSmiConfig(path=str(FAKE), timeout_s=3))
    assert backend.name == "npu-smi"
    with pytest.raises(BackendAbsent):
        create(NpuSmiConfig(path=str(tmp_path / "npu-smi")))
    with pytest.raises(BackendAbsent):
        create(NpuSmiConfig(path="npu-smi-not-installed-here"))
    not_executable = tmp_path / "npu-smi"
    not_executable.write_text("#!/bin/sh\n")
    with pytest.raises(BackendAbsent):
        create(NpuSmiConfig(path=str(not_executable)))


# --------------------------------------------------------------------------- discover/sample


async def test_atlas800_discovery_and_sample(fake: Fake) -> None:
    fake.use("atlas800-9010").pci("0000:c1:00.0", 0xD801)
    backend = create(NpuSmiConfig(path=str(FAKE), timeout_s=10), sysfs_root=fake.sysfs)

    devices = await backend.discover()
    assert fake.calls() == ["LC_ALL=C info", "LC_ALL=C info -m"]
    assert [d.id for d in devices] == [f"npu-{i}-0" for i in range(8)]
    first = devices[0]
    assert (first.backend, first.vendor, first.model) == ("npu-smi", Vendor.ASCEND, "Ascendxxx")
    assert (first.index, first.memory_total_mib, first.pci_bus_id) == (0, 32768, "0000:C1:00.0")
    assert first.health is Health.OK
    assert first.uuid is None
    assert dict(first.attributes) == {
        "npu_id": "0",
        "chip_id": "0",
        "logic_id": "0",
        "memory_kind": "HBM",
        "chip_name": "Ascend 910A",
        "npu_smi_version": "24.1.RC2",
        "pci_device_id": "0xd801",
        "card_type": "910",
    }
    assert "card_type" not in devices[1].attributes  # no sysfs entry for its bus id
    warned = devices[3]
    assert (warned.health, warned.health_reason) == (
        Health.OK,
        "npu-smi health Warning (minor alarm)",
    )
    assert devices[7].index == 7

    # Re-discovery with the same chips asks `info` only.
    await backend.discover()
    assert fake.calls()[2:] == ["LC_ALL=C info"]


async def test_sample_is_one_call_with_processes(fake: Fake) -> None:
    fake.use("atlas800-9010")
    backend = fake.backend()
    await backend.discover()
    before = len(fake.calls())

    samples = by_device(await backend.sample({}))
    assert fake.calls()[before:] == ["LC_ALL=C info"]
    assert len(samples) == 8
    npu0 = samples["npu-0-0"]
    assert npu0.memory_used_mib == 0.0  # HBM used, not the 4252 MiB of control-CPU DDR
    assert npu0.utilisation_pct == 0.0
    assert (npu0.temperature_c, npu0.power_w) == (42.0, 70.5)
    assert [p.pid for p in npu0.processes] == [37656, 37664, 37640, 37648]
    assert {(p.memory_mib, p.utilisation_pct) for p in npu0.processes} == {(686.0, None)}
    assert npu0.processes[0].start_time == 1000.0 + 37656
    npu7 = samples["npu-7-0"]
    assert (npu7.health, npu7.health_reason) == (Health.OK, "npu-smi health Warning (minor alarm)")
    assert npu7.power_w == 203.2


async def test_910c_two_devices_per_npu_without_info_m(fake: Fake) -> None:
    fake.use("a3-910c").pci("0000:97:00.0", 0xD803)
    backend = fake.backend()

    devices = by_id(await backend.discover())
    assert fake.calls() == ["LC_ALL=C info", "LC_ALL=C info -m"]  # -m refused: carry on
    assert sorted(devices) == ["npu-2-0", "npu-2-1"]
    die1 = devices["npu-2-1"]
    assert (die1.model, die1.index, die1.memory_total_mib) == ("Ascend910", 1, 65536)
    assert die1.attributes["phy_id"] == "5"
    assert die1.attributes["card_type"] == "910C"
    assert "logic_id" not in die1.attributes

    samples = by_device(await backend.sample({}))
    assert samples["npu-2-0"].power_w == 176.3
    assert samples["npu-2-1"].power_w is None
    assert samples["npu-2-1"].memory_used_mib == 3208.0


async def test_310_ddr_memory_and_logic_ids_from_the_overview(fake: Fake) -> None:
    fake.write("info.txt", (DATA / "09_310_info_old_20.2.0_no_hugepages.txt").read_text())
    fake.write("info-m.txt", (DATA / "08_310_mapping_info-m_with_Mcu.txt").read_text())
    devices = list(await fake.backend().discover())
    assert [(d.id, d.index) for d in devices] == [(f"npu-215-{i}", i) for i in range(4)]
    assert {(d.model, d.memory_total_mib) for d in devices} == {("Ascend310", 8192)}
    assert devices[0].attributes["memory_kind"] == "DDR"


async def test_vnpu_container_device(fake: Fake) -> None:
    text = (DATA / "24_310P3_vnpu_in-container_and_host_info-vnpu_HAMi-lab.txt").read_text()
    fake.write("info.txt", text.split("\n### ")[1].split("\n", 1)[1])  # the vir02 pod
    (device,) = await fake.backend().discover()
    assert (device.id, device.model, device.memory_total_mib) == (
        "npu-7-0",
        "Ascend310Pvir02",
        5381,
    )
    assert device.attributes["vnpu_template"] == "vir02"


async def test_memory_size_from_details_when_the_overview_lacks_it(fake: Fake) -> None:
    fake.use("a3-910c")
    fake.write("info.txt", fake.read("info.txt").replace("3411 / 65536", "NA          "))
    memory = (DATA / "20_910B3_memory-procmem-list-mapping_v25.5.1.txt").read_text()
    snippet = memory.split("\n### $ npu-smi info -t memory")[1].split("\n###")[0]
    fake.write("info-t-memory.txt", snippet.split("\n", 1)[1])
    backend = fake.backend()

    devices = by_id(await backend.discover())
    assert devices["npu-2-0"].memory_total_mib == 65536
    assert devices["npu-2-0"].health is Health.OK
    assert fake.calls().count("LC_ALL=C info -t memory -i 2 -c 0") == 1
    await backend.discover()
    assert fake.calls().count("LC_ALL=C info -t memory -i 2 -c 0") == 1  # cached


async def test_memory_size_unknown_marks_the_device_unknown(fake: Fake) -> None:
    fake.use("a3-910c")
    fake.write("info.txt", fake.read("info.txt").replace("3411 / 65536", "NA          "))
    devices = by_id(await fake.backend().discover())
    die0 = devices["npu-2-0"]
    assert (die0.health, die0.memory_total_mib) == (Health.UNKNOWN, 0)
    assert die0.health_reason == "npu-smi shows no memory size for this chip"
    assert devices["npu-2-1"].health is Health.OK


async def test_lost_chip_and_alarm_in_later_samples(fake: Fake) -> None:
    fake.use("atlas800-9010")
    backend = fake.backend()
    await backend.discover()
    lines = fake.read("info.txt").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("| 7     xxx"))
    del lines[start : start + 3]  # NPU 7's two rows and the border under them
    text = "".join(lines).replace(
        "| 2     xxx            | OK     ", "| 2     xxx            | Alarm  "
    )
    fake.write("info.txt", text)

    samples = by_device(await backend.sample({}))
    assert (samples["npu-7-0"].health, samples["npu-7-0"].memory_used_mib) == (Health.UNKNOWN, None)
    assert samples["npu-7-0"].health_reason == "chip missing from npu-smi info output"
    assert samples["npu-2-0"].health is Health.UNHEALTHY
    assert samples["npu-2-0"].health_reason == "npu-smi health Alarm (major alarm)"

    devices = by_id(await backend.discover())
    assert "npu-7-0" not in devices
    assert fake.calls()[-1] == "LC_ALL=C info -m"  # the chip set changed: ask again


# --------------------------------------------------------------------------- failures


async def test_hung_npu_smi_is_killed_and_reported(fake: Fake) -> None:
    fake.use("atlas800-9010")
    fake.env("FAKE_NPU_SMI_HANG", "1")
    backend = fake.backend(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"`npu-smi info` did not answer within 0.5 s"):
        await backend.sample({})
    assert time.monotonic() - started < 5
    (pid,) = fake.pids()
    assert not psutil.pid_exists(pid)


async def test_endless_output_is_cut_off_and_costs_no_memory(tmp_path: Path) -> None:
    """A broken tool that writes 50 MB: refused after 8 MiB, killed, RSS barely moves."""
    tool = tmp_path / "npu-smi"
    tool.write_text("#!/bin/sh\nexec head -c 52428800 /dev/zero\n")
    tool.chmod(0o755)
    before = psutil.Process().memory_info().rss
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"wrote more than 8 MiB; killed"):
        await run_npu_smi(str(tool), ["info"], 30.0)
    assert time.monotonic() - started < 10
    assert psutil.Process().memory_info().rss - before < 40 * 2**20


async def test_hung_info_m_does_not_stop_discovery(fake: Fake) -> None:
    fake.use("atlas800-9010")
    fake.env("FAKE_NPU_SMI_HANG", "info-m")
    devices = await fake.backend(timeout_s=0.5).discover()
    assert len(devices) == 8
    assert "logic_id" not in devices[0].attributes
    assert devices[5].index == 5  # the row order stands in


async def test_cancelled_call_kills_npu_smi(fake: Fake) -> None:
    fake.use("atlas800-9010")
    fake.env("FAKE_NPU_SMI_HANG", "1")
    task = asyncio.create_task(fake.backend(timeout_s=60).discover())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if fake.log.exists():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (pid,) = fake.pids()
    assert not psutil.pid_exists(pid)


async def test_failing_npu_smi_is_a_backend_error(fake: Fake) -> None:
    fake.use("atlas800-9010")
    fake.env("FAKE_NPU_SMI_FAIL", "1")
    with pytest.raises(BackendError, match=r"`npu-smi info` exited with status 1: dcmi model"):
        await fake.backend().discover()
    with pytest.raises(BackendError, match="exited with status 1"):
        await fake.backend().sample({})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "npu-smi output: empty"),
        ("Segmentation fault\n", "no table found"),
        ("| 0     910B3   | OK   | 102.8   55   0 / 0  |\n", "NPU 0 has no chip row"),
        (
            "| 0     910B3   | OK   | 102.8   hot  0 / 0  |\n| 0  | 0000:C1:00.0 | 0  0 / 0 |\n",
            "Temp is not a number",
        ),
    ],
)
async def test_unparsable_output_is_a_backend_error(fake: Fake, text: str, message: str) -> None:
    fake.write("info.txt", text)
    backend = fake.backend()
    with pytest.raises(BackendError, match=message):
        await backend.discover()
    with pytest.raises(BackendError, match=message):
        await backend.sample({})


async def test_missing_executable_after_create(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot run"):
        await run_npu_smi(str(tmp_path / "gone"), ["info"], 1.0)


async def test_sample_before_discover_reports_what_npu_smi_shows(fake: Fake) -> None:
    fake.use("a3-910c")
    samples = await fake.backend().sample({})
    assert [s.device_id for s in samples] == ["npu-2-0", "npu-2-1"]


def test_fake_documents_daemon_use() -> None:
    header = FAKE.read_text().split('"""')[1]
    assert 'enabled = ["npu-smi"]' in header
    assert "FAKE_NPU_SMI_DIR" in header
    assert FAKE.stat().st_mode & 0o111
