"""The npu-smi parsers against every real capture in tests/data/npu-smi (see its README).

One test per capture file, asserting values read off the capture by eye; then malformed,
truncated and empty output, which must raise BackendError and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backends.ascend import parser as p
from agent.backends.ascend.pci import CARD_TYPES, PciId, read_pci_id, sysfs_bus_id
from agent.errors import BackendError
from agent.model import Health

DATA = Path(__file__).parent / "data" / "npu-smi"


def capture(name: str) -> str:
    """A capture's text without its ``# source:`` line."""
    text = (DATA / name).read_text(encoding="utf-8")
    assert text.startswith("# source:")
    return text.split("\n", 1)[1]


def snippets(name: str) -> list[tuple[str, str]]:
    """A multi-snippet capture as (title after ``### ``, body) pairs, in file order."""
    parts: list[tuple[str, str]] = []
    title: str | None = None
    lines: list[str] = []
    for line in capture(name).splitlines(keepends=True):
        if line.startswith("### "):
            if title is not None:
                parts.append((title, "".join(lines)))
            title, lines = line[4:].strip(), []
        else:
            lines.append(line)
    if title is not None:
        parts.append((title, "".join(lines)))
    return parts


def chip(table: p.InfoTable, npu_id: int, chip_id: int = 0) -> p.ChipRow:
    (row,) = [c for c in table.chips if (c.npu_id, c.chip_id) == (npu_id, chip_id)]
    return row


# --------------------------------------------------------------------------- one per capture


def test_00_910b3_x8_idle_with_empty_process_table() -> None:
    table = p.parse_info(capture("00_910B3_x8_info_vllm-ascend-198.txt"))
    assert table.version == "23.0.7"
    assert [(c.npu_id, c.chip_id) for c in table.chips] == [(i, 0) for i in range(8)]
    first = chip(table, 0)
    assert first.name == "910B3"
    assert first.health == "OK"
    assert first.bus_id == "0000:C1:00.0"
    assert (first.power_w, first.temperature_c, first.aicore_pct) == (102.8, 55.0, 0.0)
    assert (first.memory_used_mib, first.memory_total_mib) == (0, 0)
    assert (first.hbm_used_mib, first.hbm_total_mib) == (3338, 65536)
    assert first.memory_kind == "HBM"
    assert (first.device_memory_used_mib, first.device_memory_total_mib) == (3338, 65536)
    assert chip(table, 7).temperature_c == 59.0
    assert chip(table, 6).bus_id == "0000:41:00.0"
    assert table.process_table is True
    assert table.processes == ()


def test_01_910a_shown_as_910b_ddr_and_hbm_columns() -> None:
    table = p.parse_info(capture("01_910A-as-910B_info_8card.txt"))
    assert table.version == "24.1.0"
    assert len(table.chips) == 8
    assert {c.name for c in table.chips} == {"910B"}
    npu0 = chip(table, 0)
    assert (npu0.memory_used_mib, npu0.memory_total_mib) == (1197, 13553)
    assert (npu0.device_memory_used_mib, npu0.device_memory_total_mib) == (1365, 32768)
    npu3 = chip(table, 3)
    assert (npu3.bus_id, npu3.power_w, npu3.temperature_c) == ("0000:01:00.0", 67.2, 33.0)
    assert (npu3.memory_used_mib, npu3.memory_total_mib, npu3.hbm_used_mib) == (2472, 15567, 3)
    assert table.process_table is False


def test_02_310_chip_device_header_no_hbm() -> None:
    table = p.parse_info(capture("02_310_info_atlas300-3000.txt"))
    assert table.version == "23.0.0"
    (only,) = table.chips
    assert (only.npu_id, only.chip_id, only.logic_id, only.name) == (0, 0, 0, "310")
    assert (only.power_w, only.temperature_c) == (12.8, 61.0)
    assert (only.hugepages_used, only.hugepages_total) == (0, 969)
    assert (only.memory_used_mib, only.memory_total_mib) == (577, 7759)
    assert only.hbm_total_mib is None
    assert only.memory_kind == "DDR"
    assert only.device_memory_total_mib == 7759
    assert table.process_table is True
    assert table.processes == ()


def test_03_310p3_power_na() -> None:
    table = p.parse_info(capture("03_310P3_info_single.txt"))
    assert table.version == "25.3.rc1"
    (only,) = table.chips
    assert (only.npu_id, only.chip_id, only.name) == (6, 0, "310P3")
    assert only.power_w is None
    assert only.temperature_c == 50.0
    assert only.bus_id == "0000:84:00.0"
    assert (only.device_memory_used_mib, only.device_memory_total_mib) == (1839, 21525)


def test_04_910a_warning_chips_and_processes() -> None:
    table = p.parse_info(capture("04_910A_info_24.1.RC2_with_processes_warning.txt"))
    assert table.version == "24.1.RC2"
    assert len(table.chips) == 8
    assert [c.npu_id for c in table.chips if c.health == "Warning"] == [3, 7]
    assert p.health_of(chip(table, 3).health) == (
        Health.OK,
        "npu-smi health Warning (minor alarm)",
    )
    npu3 = chip(table, 3)
    assert (npu3.power_w, npu3.memory_used_mib, npu3.memory_total_mib) == (206.9, 3616, 15039)
    assert (npu3.hbm_used_mib, npu3.hbm_total_mib) == (0, 32768)
    assert (npu3.hugepages_used, npu3.hugepages_total) == (1232, 1232)
    assert len(table.processes) == 32
    npu0 = [r for r in table.processes if r.npu_id == 0]
    assert [r.pid for r in npu0] == [37656, 37664, 37640, 37648]
    assert {(r.chip_id, r.name, r.memory_mib) for r in table.processes} == {
        (0, "hlt_host_devmm_", 686)
    }
    assert table.processes[-1].pid == 37663
    assert table.processes[-1].npu_id == 7


def test_05_910a_chip_map() -> None:
    rows = p.parse_chip_map(capture("05_910A_mapping_info-m.txt"))
    assert [(r.npu_id, r.chip_id, r.logic_id) for r in rows] == [(i, 0, i) for i in range(8)]
    assert {r.chip_name for r in rows} == {"Ascend 910A"}
    assert all(r.is_compute for r in rows)


def test_06_910a_22_0_3_1_without_process_table() -> None:
    table = p.parse_info(capture("06_910A_info_22.0.3.1.txt"))
    assert table.version == "22.0.3.1"
    assert len(table.chips) == 8
    npu3 = chip(table, 3)
    assert (npu3.name, npu3.power_w, npu3.bus_id) == ("910A", 191.7, "0000:3E:00.0")
    assert (npu3.hugepages_used, npu3.hugepages_total) == (15, 15)
    assert (npu3.memory_used_mib, npu3.memory_total_mib) == (1866, 15077)
    assert (npu3.hbm_used_mib, npu3.hbm_total_mib) == (0, 32768)
    assert table.process_table is False


def test_08_310_chip_map_with_mcu_row() -> None:
    rows = p.parse_chip_map(capture("08_310_mapping_info-m_with_Mcu.txt"))
    assert len(rows) == 5
    compute = [r for r in rows if r.is_compute]
    assert [(r.npu_id, r.chip_id, r.logic_id) for r in compute] == [(6, i, i) for i in range(4)]
    assert {r.chip_name for r in compute} == {"MiniD"}
    mcu = rows[-1]
    assert (mcu.chip_id, mcu.logic_id, mcu.chip_name) == (4, None, "Mcu")


def test_09_310_oldest_layout_no_hugepages_four_chips() -> None:
    table = p.parse_info(capture("09_310_info_old_20.2.0_no_hugepages.txt"))
    assert table.version == "20.2.0"
    assert [(c.npu_id, c.chip_id, c.logic_id) for c in table.chips] == [
        (215, i, i) for i in range(4)
    ]
    first = chip(table, 215, 0)
    assert (first.bus_id, first.temperature_c, first.power_w) == ("0000:DA:00.0", 56.0, 12.8)
    assert first.hugepages_total is None
    assert (first.device_memory_used_mib, first.device_memory_total_mib) == (2703, 8192)
    assert chip(table, 215, 3).bus_id == "0000:DB:00.0"


def test_10_910b3_atlas800_a2() -> None:
    table = p.parse_info(capture("10_910B3_info_8card_atlas800A2.txt"))
    assert table.version == "24.1.rc1.b030"
    assert len(table.chips) == 8
    npu0 = chip(table, 0)
    assert (npu0.power_w, npu0.temperature_c) == (101.8, 43.0)
    assert (npu0.hbm_used_mib, npu0.hbm_total_mib) == (3318, 65536)
    assert chip(table, 7).hbm_used_mib == 3315
    assert table.process_table is False


def test_11_910b3_topology() -> None:
    topo = p.parse_topology(capture("11_910B3_topo.txt"))
    assert topo.npus == tuple(f"NPU{i}" for i in range(8))
    assert topo.links[("NPU0", "NPU1")] == "HCCS"
    assert topo.links[("NPU5", "NPU5")] == "X"
    assert len(topo.links) == 64
    assert topo.cpu_affinity["NPU0"] == "144-167"
    assert topo.cpu_affinity["NPU2"] == "96-119"
    assert topo.cpu_affinity["NPU7"] == "48-71"


def test_12_910c_two_chips_under_one_npu() -> None:
    table = p.parse_info(capture("12_910C_A3_info_single-npu-2chips.txt"))
    assert table.version == "24.1.rc3.7"
    assert [(c.npu_id, c.chip_id, c.phy_id) for c in table.chips] == [(2, 0, 4), (2, 1, 5)]
    die0, die1 = table.chips
    assert die0.name == "Ascend910"
    assert (die0.power_w, die0.bus_id, die0.hbm_used_mib) == (176.3, "0000:95:00.0", 3411)
    assert die1.power_w is None  # "-": the card's power is reported on the first die
    assert (die1.bus_id, die1.hbm_used_mib, die1.hbm_total_mib) == ("0000:97:00.0", 3208, 65536)
    assert die0.logic_id is None
    assert table.process_table is True


def test_14_910b4_wide_26x_layout_with_container_pid_column() -> None:
    text = capture("14_910B4_info_26.0.rc1_wide_format_container-pid-column.txt")
    table = p.parse_info(text)  # the shell prompt line before the table is ignored
    assert table.version == "26.0.rc1"
    (only,) = table.chips
    assert (only.name, only.power_w, only.temperature_c) == ("910B4", 82.6, 32.0)
    assert (only.hbm_used_mib, only.hbm_total_mib) == (2871, 32768)
    assert table.process_table is True
    assert table.processes == ()
    # The same table with a process row under its five-column header.
    busy = "\n".join(
        "| 0     0     | 4242     | python     | 1024     | 17     |"
        if line.startswith("| No running processes")
        else line
        for line in text.splitlines()
    )
    (proc,) = p.parse_info(busy).processes
    assert (proc.pid, proc.name, proc.memory_mib, proc.container_pid) == (4242, "python", 1024, 17)


def test_17_usages() -> None:
    usages = p.parse_usages(capture("17_910-32GB_usages_-t-usages.txt"))
    assert (usages.npu_id, usages.chip_count) == (0, 1)
    (only,) = usages.chips
    assert only.chip_id == 0
    assert (only.ddr_capacity_mib, only.ddr_usage_pct) == (15171, 3.0)
    assert (only.hbm_capacity_mib, only.hbm_usage_pct) == (32768, 0.0)
    assert (only.aicore_pct, only.aicpu_pct, only.ctrlcpu_pct) == (0.0, 0.0, 9.0)


def test_19_common_910_and_310p_with_mcu_block() -> None:
    text = capture("19_910-and-310P_common_-t-common.txt")
    first, second = text.split("### ---\n")
    npu910 = p.parse_common(first)
    assert (npu910.npu_id, npu910.chip_count) == (0, 1)
    (c910,) = npu910.chips
    assert (c910.chip_id, c910.aicore_count, c910.aicore_freq_mhz) == (0, 32, 1000)
    assert (c910.memory_usage_pct, c910.hbm_usage_pct) == (6.0, 0.0)
    assert (c910.temperature_c, c910.power_w) == (46.0, 69.0)
    assert npu910.power_w == 69.0
    assert npu910.mcu_temperature_c is None
    npu310p = p.parse_common(second)
    assert npu310p.npu_id == 1
    (c310p,) = npu310p.chips
    assert (c310p.aicore_freq_mhz, c310p.aicore_cur_freq_mhz) == (1080, 960)
    assert (c310p.temperature_c, c310p.hbm_usage_pct, c310p.power_w) == (43.0, None, None)
    assert (npu310p.mcu_temperature_c, npu310p.power_w) == (41.0, 13.4)


def test_20_910b3_list_map_memory_procmem() -> None:
    parts = dict(snippets("20_910B3_memory-procmem-list-mapping_v25.5.1.txt"))
    cards = p.parse_card_list(parts["$ npu-smi info -l"])
    assert cards.total_count == 8
    assert [(n.npu_id, n.chip_count) for n in cards.npus] == [(0, 1), (1, 1)]  # partial paste
    rows = p.parse_chip_map(parts["$ npu-smi info -m"])
    assert [(r.npu_id, r.chip_id, r.logic_id, r.chip_name) for r in rows] == [
        (0, 0, 0, "Ascend 910B3"),
        (0, 1, None, "Mcu"),
    ]
    memory = p.parse_memory(parts["$ npu-smi info -t memory -i <id> -c <chip_id>"])
    assert (memory.npu_id, memory.chip_id) == (None, None)  # id lines omitted as published
    assert (memory.hbm_capacity_mib, memory.hbm_clock_mhz, memory.hbm_temperature_c) == (
        65536,
        1600,
        52.0,
    )
    assert (memory.ddr_capacity_mib, memory.device_memory_mib) == (0, 65536)
    (proc,) = p.parse_proc_mem(parts["$ npu-smi info -t proc-mem -i <id> -c <chip_id>"])
    assert (proc.pid, proc.name, proc.memory_mib) == (207795, "VLLMEngineCor", 55436)


def test_21_board_usages_health_ecc() -> None:
    parts = snippets("21_910-32GB_board-usages-health_mindcluster-doc.txt")
    board = p.parse_board(parts[0][1])
    assert (board.npu_id, board.chip_id, board.chip_count) == (0, None, 1)
    assert (board.bus_id, board.software_version) == ("0000:61:00.0", "23.0.5")
    assert (board.pci_vendor_id, board.pci_device_id) == (0x19E5, 0xD801)
    assert board.pci_vendor_id is not None
    assert board.pci_device_id is not None
    assert PciId(board.pci_vendor_id, board.pci_device_id).card_type == "910"
    chip_board = p.parse_board(parts[1][1])
    assert (chip_board.chip_id, chip_board.chip_name, chip_board.firmware_version) == (
        0,
        "xxx",
        "7.1.0.7.220",
    )
    usages = p.parse_usages(parts[2][1])
    assert (usages.chips[0].ddr_capacity_mib, usages.chips[0].hbm_capacity_mib) == (13553, 32768)
    health = p.parse_health(parts[3][1])
    assert (health.status, health.error_code, health.error_information) == ("OK", None, None)
    assert health.health == (Health.OK, None)
    (ecc_head, ecc) = p.parse_key_values(parts[4][1])
    assert ecc_head["NPU ID"] == "1"
    assert ecc["HBM Double Bit Error Count"] == "0"
    assert ecc["Chip ID"] == "0"


def test_23_vnpu_templates_and_info_vnpu() -> None:
    parts = snippets("23_910B4-32GB_vnpu_template-info_info-vnpu_create-destroy.txt")
    assert p.parse_key_values(parts[0][1]) == ({"vnpu-mode": "docker"},)
    templates = p.parse_vnpu_templates(parts[1][1])
    assert [t.name for t in templates] == [
        "vir10_3c_16g",
        "vir10_4c_16g_m",
        "vir10_3c_16g_nm",
        "vir05_1c_8g",
    ]
    assert (templates[0].aicore, templates[0].memory_gb, templates[0].aicpu) == (10, 16, 3)
    assert (templates[3].aicore, templates[3].memory_gb, templates[3].aicpu) == (5, 8, 1)
    before = p.parse_vnpu_info(parts[2][1])
    assert before.resources["AICORE"] == (20, 20)
    assert before.resources["Memory"] == (28, 32)
    assert before.resources["PNGD"] == (None, None)
    assert (before.total_vnpus, before.vnpus) == (0, ())
    after = p.parse_vnpu_info(parts[3][1])
    assert after.resources["AICORE"] == (0, 20)
    assert after.total_vnpus == 2
    assert after.vnpus == (
        p.Vnpu(100, 0, "ffffffffffff", 1, "vir10_3c_16g"),
        p.Vnpu(101, 1, "000000000000", 0, "vir10_3c_16g"),
    )
    assert [v.vnpu_id for v in p.parse_vnpu_info(parts[4][1]).vnpus] == [116, 117]
    (created,) = p.parse_key_values(parts[5][1])
    assert created == {"Status": "OK", "Message": "Create vnpu success"}
    (destroyed,) = p.parse_key_values(parts[6][1])
    assert destroyed["Message"] == "Destroy vnpu 100 success"


def test_24_310p3_vnpu_inside_pods_and_host() -> None:
    parts = snippets("24_310P3_vnpu_in-container_and_host_info-vnpu_HAMi-lab.txt")
    assert len(parts) == 6
    (vir02,) = p.parse_info(parts[0][1]).chips  # rows pasted without a header
    assert (vir02.npu_id, vir02.chip_id, vir02.name) == (7, 0, "310Pvir02")
    assert p.vnpu_template_of(vir02.name) == "vir02"
    assert (vir02.power_w, vir02.temperature_c, vir02.bus_id) == (None, 28.0, "0000:00:07.0")
    assert (vir02.device_memory_used_mib, vir02.device_memory_total_mib) == (497, 5381)
    (vir04,) = p.parse_info(parts[1][1]).chips
    assert (vir04.name, vir04.memory_used_mib, vir04.memory_total_mib) == ("310Pvir04", 995, 10763)
    (full,) = p.parse_info(parts[2][1]).chips  # "10763/ 10763": no space before '/'
    assert (full.memory_used_mib, full.memory_total_mib) == (10763, 10763)
    assert (full.hugepages_used, full.hugepages_total, full.temperature_c) == (3092, 3092, 33.0)
    host = p.parse_vnpu_info(parts[3][1])
    assert host.total_vnpus == 3
    assert [(v.vnpu_id, v.template) for v in host.vnpus] == [
        (100, "vir01"),
        (101, "vir02"),
        (102, "vir04"),
    ]
    seven = p.parse_vnpu_info(parts[4][1])
    assert seven.total_vnpus == 7
    assert [v.vnpu_id for v in seven.vnpus] == list(range(100, 107))
    assert [v.vgroup_id for v in seven.vnpus] == [0, 0, 1, 1, 2, 2, 3]
    assert {v.template for v in seven.vnpus} == {"vir01"}
    whole = p.parse_info(parts[5][1])  # environment lines before the table are ignored
    assert whole.version == "22.0.4"
    (card,) = whole.chips
    assert (card.name, card.memory_used_mib, card.memory_total_mib) == ("310P3", 1805, 21527)
    assert p.vnpu_template_of(card.name) is None


def test_every_capture_has_a_test() -> None:
    """A new capture dropped into tests/data/npu-smi needs a test here too."""
    source = Path(__file__).read_text(encoding="utf-8")
    for path in sorted(DATA.glob("*.txt")):
        assert f"def test_{path.name[:2]}_" in source, path.name


# --------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    ("word", "health"),
    [
        ("OK", Health.OK),
        ("Warning", Health.OK),
        ("Alarm", Health.UNHEALTHY),
        ("Critical", Health.UNHEALTHY),
        ("UNKNOWN", Health.UNKNOWN),
        ("NA", Health.UNKNOWN),
        ("Exploded", Health.UNKNOWN),
    ],
)
def test_health_words(word: str, health: Health) -> None:
    mapped, reason = p.health_of(word)
    assert mapped is health
    assert (reason is None) == (word == "OK")
    if word != "OK":
        assert word in (reason or "")


# --------------------------------------------------------------------------- malformed

INFO_00 = capture("00_910B3_x8_info_vllm-ascend-198.txt")


@pytest.mark.parametrize("text", ["", "   \n\n", "dcmi module initialize failed. ret is -8005\n"])
def test_info_without_table_is_an_error(text: str) -> None:
    with pytest.raises(BackendError, match="npu-smi output"):
        p.parse_info(text)


def test_info_cut_after_an_npu_row_is_an_error() -> None:
    lines = INFO_00.splitlines()
    cut = "\n".join(lines[: lines.index(next(ln for ln in lines if ln.startswith("| 3 "))) + 1])
    with pytest.raises(BackendError, match="NPU 3 has no chip row"):
        p.parse_info(cut)


def test_info_missing_a_chip_row_in_the_middle_is_an_error() -> None:
    lines = INFO_00.splitlines()
    index = lines.index(next(ln for ln in lines if ln.startswith("| 2 ")))
    del lines[index + 1]
    with pytest.raises(BackendError, match="NPU 2 has no chip row"):
        p.parse_info("\n".join(lines))


def test_info_header_only_means_no_chips() -> None:
    lines = INFO_00.splitlines()
    assert p.parse_info("\n".join(lines[:6])).chips == ()


def test_info_unreadable_number_is_an_error() -> None:
    bad = INFO_00.replace("| 102.8       55  ", "| 102.8       hot ")
    with pytest.raises(BackendError, match="Temp is not a number"):
        p.parse_info(bad)


def test_info_extra_values_are_an_error() -> None:
    bad = INFO_00.replace("3338 / 65536     ", "3338 / 65536  7  ", 1)
    with pytest.raises(BackendError, match="4 values under 3 columns"):
        p.parse_info(bad)


def test_info_duplicate_chip_is_an_error() -> None:
    lines = INFO_00.splitlines()
    npu0 = lines.index(next(ln for ln in lines if ln.startswith("| 0     910B3")))
    doubled = [*lines[: npu0 + 2], *lines[npu0 : npu0 + 2], *lines[npu0 + 2 :]]
    with pytest.raises(BackendError, match="NPU 0 chip 0 listed twice"):
        p.parse_info("\n".join(doubled))


def test_info_process_row_without_pid_is_an_error() -> None:
    bad = capture("04_910A_info_24.1.RC2_with_processes_warning.txt").replace(
        "| 37656 ", "| -     "
    )
    with pytest.raises(BackendError, match="without a pid"):
        p.parse_info(bad)


@pytest.mark.parametrize(
    "parse",
    [
        p.parse_key_values,
        p.parse_card_list,
        p.parse_chip_map,
        p.parse_usages,
        p.parse_common,
        p.parse_memory,
        p.parse_health,
        p.parse_topology,
        p.parse_vnpu_templates,
        p.parse_vnpu_info,
    ],
)
@pytest.mark.parametrize("text", ["", "dcmi module initialize failed. ret is -8005\n"])
def test_detail_parsers_refuse_empty_and_garbage(parse: object, text: str) -> None:
    assert callable(parse)
    with pytest.raises(BackendError):
        parse(text)


def test_detail_parsers_refuse_each_others_output() -> None:
    with pytest.raises(BackendError):
        p.parse_usages(capture("19_910-and-310P_common_-t-common.txt").split("### ---")[0])
    with pytest.raises(BackendError):
        p.parse_memory(capture("17_910-32GB_usages_-t-usages.txt").replace("Capacity", "Size"))
    with pytest.raises(BackendError):
        p.parse_chip_map(INFO_00)
    with pytest.raises(BackendError, match="not a number"):
        p.parse_usages(capture("17_910-32GB_usages_-t-usages.txt").replace(": 15171", ": many"))
    for parse in (
        p.parse_usages,
        p.parse_common,
        p.parse_memory,
        p.parse_health,
        p.parse_card_list,
    ):
        with pytest.raises(BackendError):
            parse("Error: npu-smi could not reach the driver\n")
    assert p.parse_proc_mem("") == ()
    with pytest.raises(BackendError, match="process line"):
        p.parse_proc_mem("Process id: garbled")


ALL_TEXT = [capture(path.name) for path in sorted(DATA.glob("*.txt"))]


@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(ALL_TEXT),
    cut=st.integers(min_value=0, max_value=8000),
    drop=st.integers(min_value=0, max_value=200),
)
def test_truncated_or_mangled_output_never_crashes(source: str, cut: int, drop: int) -> None:
    """Any prefix of a capture, with any one line dropped: a result or a BackendError."""
    lines = source[:cut].splitlines()
    if lines:
        del lines[drop % len(lines)]
    text = "\n".join(lines)
    for parse in (p.parse_info, p.parse_chip_map, p.parse_usages, p.parse_common):
        try:
            parse(text)
        except BackendError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("|+-=:/ 0123456789.ANOKx\n")), max_size=400))
def test_table_like_noise_never_crashes(text: str) -> None:
    for parse in (p.parse_info, p.parse_chip_map, p.parse_vnpu_info, p.parse_topology):
        try:
            parse(text)
        except BackendError:
            pass


# --------------------------------------------------------------------------- PCI ids


def _fake_sysfs(root: Path, bus_id: str, vendor: str, device: str) -> None:
    device_dir = root / "bus" / "pci" / "devices" / bus_id
    device_dir.mkdir(parents=True)
    (device_dir / "vendor").write_text(f"{vendor}\n", encoding="ascii")
    (device_dir / "device").write_text(f"{device}\n", encoding="ascii")


@pytest.mark.parametrize(("device", "card"), sorted(CARD_TYPES.items()))
def test_card_type_from_sysfs(tmp_path: Path, device: int, card: str) -> None:
    _fake_sysfs(tmp_path, "0000:c1:00.0", "0x19e5", f"0x{device:04x}")
    pci = read_pci_id("0000:C1:00.0", tmp_path)
    assert pci == PciId(0x19E5, device)
    assert pci.card_type == card


def test_card_type_unknown_or_absent(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path, "0000:01:00.0", "0x10de", "0x2330")  # an NVIDIA H100
    pci = read_pci_id("0000:01:00.0", tmp_path)
    assert pci is not None
    assert pci.card_type is None
    assert PciId(0x19E5, 0x1234).card_type is None
    assert read_pci_id("0000:02:00.0", tmp_path) is None
    _fake_sysfs(tmp_path, "0000:03:00.0", "garbage", "0xd802")
    assert read_pci_id("0000:03:00.0", tmp_path) is None


def test_sysfs_bus_id_form() -> None:
    assert sysfs_bus_id("0000:C1:00.0") == "0000:c1:00.0"
    assert sysfs_bus_id("00000000:C1:00.0") == "0000:c1:00.0"
