"""Pure parsers of ``npu-smi`` output: text in, frozen dataclasses out.

``npu-smi`` has no machine-readable mode, and its layout changed across driver versions
(20.x to 26.x), chips (310 without HBM, 910A with DDR and HBM, 910C with two dies under
one NPU id) and contexts (vNPU containers, pasted rows without a header). So the parsers
read *structure* (``|``-separated cells, ``key : value`` lines, column headers) rather than
fixed character offsets, and take column meaning from the header whenever one is printed.

Values ``npu-smi`` prints for "not supported" (``NA``, ``-``) become ``None``. Anything
else that cannot be read raises :class:`agent.errors.BackendError` naming the line, so a
new format surfaces as a clear error instead of wrong numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.errors import BackendError
from agent.model import Health

__all__ = [
    "BoardInfo",
    "CardList",
    "ChipCommon",
    "ChipHealth",
    "ChipMapping",
    "ChipMemory",
    "ChipRow",
    "ChipUsage",
    "InfoTable",
    "NpuCommon",
    "NpuEntry",
    "NpuUsages",
    "ProcMemory",
    "ProcessRow",
    "Topology",
    "Vnpu",
    "VnpuInfo",
    "VnpuTemplate",
    "health_of",
    "parse_board",
    "parse_card_list",
    "parse_chip_map",
    "parse_common",
    "parse_health",
    "parse_info",
    "parse_key_values",
    "parse_memory",
    "parse_proc_mem",
    "parse_topology",
    "parse_usages",
    "parse_vnpu_info",
    "parse_vnpu_templates",
    "vnpu_template_of",
]

_NOT_SUPPORTED = frozenset({"", "NA", "N/A", "-", "--"})
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_SLASH = re.compile(r"\s*/\s*")
_KEY_VALUE = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_VNPU_NAME = re.compile(r"vir\d+$")


def _fail(what: str, line: str | None = None) -> BackendError:
    if line is None:
        return BackendError(f"npu-smi output: {what}")
    return BackendError(f"npu-smi output: {what}: {line.strip()!r}", line=line.strip())


def _float(text: str, what: str, line: str) -> float | None:
    text = text.strip()
    if text.upper() in _NOT_SUPPORTED:
        return None
    try:
        return float(text)
    except ValueError:
        raise _fail(f"{what} is not a number", line) from None


def _int(text: str, what: str, line: str) -> int | None:
    value = _float(text, what, line)
    if value is None:
        return None
    if not value.is_integer():
        raise _fail(f"{what} is not an integer", line)
    return int(value)


def _hex(text: str, what: str) -> int | None:
    text = text.strip()
    if text.upper() in _NOT_SUPPORTED:
        return None
    try:
        return int(text, 16)
    except ValueError:
        raise _fail(f"{what} is not hexadecimal", text) from None


def _pair(text: str, what: str, line: str) -> tuple[int | None, int | None]:
    """``"3338 / 65536"`` → (3338, 65536); ``NA`` → (None, None)."""
    text = text.strip()
    if text.upper() in _NOT_SUPPORTED:
        return None, None
    parts = _SLASH.split(text)
    if len(parts) != 2:
        raise _fail(f"{what} is not 'used / total'", line)
    return _int(parts[0], what, line), _int(parts[1], what, line)


def _cells(line: str) -> list[str] | None:
    """Cells of a ``| a | b |`` row; ``None`` for borders and non-table lines.

    A row missing its closing ``|`` (pasted or cut off) still counts.
    """
    stripped = line.strip()
    if not stripped.startswith("|"):
        return None
    inner = stripped[1:]
    if inner.endswith("|"):
        inner = inner[:-1]
    return [cell.strip() for cell in inner.split("|")]


# --------------------------------------------------------------------------- health


def health_of(status: str) -> tuple[Health, str | None]:
    """Map ``npu-smi``'s health word to ours, with a reason for anything but OK.

    Huawei documents five states: OK, Warning (minor alarm), Alarm (major alarm),
    Critical (urgent alarm) and UNKNOWN (chip absent or not started). A minor alarm leaves
    the chip working (capture 04 shows Warning chips under full load), so it stays usable
    with its reason kept visible; major and critical alarms make it unusable.
    """
    word = status.strip()
    key = word.lower()
    if key == "ok":
        return Health.OK, None
    if key == "warning":
        return Health.OK, "npu-smi health Warning (minor alarm)"
    if key == "alarm":
        return Health.UNHEALTHY, "npu-smi health Alarm (major alarm)"
    if key == "critical":
        return Health.UNHEALTHY, "npu-smi health Critical (urgent alarm)"
    if key in {"unknown", "na", "-", ""}:
        return Health.UNKNOWN, f"npu-smi health {word or 'empty'} (chip absent or not started)"
    return Health.UNKNOWN, f"npu-smi health {word!r} not understood"


# --------------------------------------------------------------------------- npu-smi info


@dataclass(frozen=True, slots=True)
class ChipRow:
    """One chip (die) of the ``npu-smi info`` overview: an NPU row plus its chip row.

    ``memory_*`` is the "Memory-Usage(MB)" column: the only device memory on 310/310P
    (DDR), the control CPU's DDR on 910A, ``0 / 0`` on 910B. ``hbm_*`` is "HBM-Usage(MB)"
    where printed. ``logic_id`` is the 310-class "Device" column; ``phy_id`` the 910C
    "Phy-ID" column.
    """

    npu_id: int
    chip_id: int
    name: str
    health: str
    bus_id: str | None
    power_w: float | None
    temperature_c: float | None
    aicore_pct: float | None
    memory_used_mib: int | None
    memory_total_mib: int | None
    hbm_used_mib: int | None = None
    hbm_total_mib: int | None = None
    hugepages_used: int | None = None
    hugepages_total: int | None = None
    logic_id: int | None = None
    phy_id: int | None = None

    @property
    def memory_kind(self) -> str:
        """``"HBM"`` where the chip has HBM (910 family), else ``"DDR"`` (310 family)."""
        return "HBM" if self.hbm_total_mib else "DDR"

    @property
    def device_memory_used_mib(self) -> int | None:
        """The memory workloads allocate from: HBM where present, else DDR."""
        return self.hbm_used_mib if self.hbm_total_mib else self.memory_used_mib

    @property
    def device_memory_total_mib(self) -> int | None:
        return self.hbm_total_mib if self.hbm_total_mib else self.memory_total_mib


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One row of the process table under the overview; ``pid`` is the host's pid."""

    npu_id: int
    chip_id: int
    pid: int
    name: str
    memory_mib: int | None
    container_pid: int | None = None


@dataclass(frozen=True, slots=True)
class InfoTable:
    """``npu-smi info``. ``process_table`` tells "no processes" from "table not printed"."""

    version: str | None
    chips: tuple[ChipRow, ...]
    processes: tuple[ProcessRow, ...] = ()
    process_table: bool = False


# Column names of the overview's value cells, keyed by the lower-case header word before
# its unit. Used when a header is printed; the defaults are the order every version uses.
_NPU_VALUE_KEYS = {"power": "power", "temp": "temp", "hugepages-usage": "hugepages"}
_CHIP_VALUE_KEYS = {"aicore": "aicore", "memory-usage": "memory", "hbm-usage": "hbm"}
_DEFAULT_NPU_VALUES = ("power", "temp", "hugepages")
_DEFAULT_CHIP_VALUES = ("aicore", "memory", "hbm")


def _value_columns(header_cell: str, known: Mapping[str, str]) -> tuple[str, ...]:
    names = []
    for word in header_cell.split():
        base = word.split("(", 1)[0].lower()
        names.append(known.get(base, base))
    return tuple(names)


def _values(cell: str, columns: Sequence[str], line: str) -> dict[str, str]:
    """Split a value cell (``"102.8  55  0 / 0"``) into named values, keeping pairs whole."""
    tokens = _SLASH.sub("/", cell).split()
    if len(tokens) > len(columns):
        raise _fail(f"{len(tokens)} values under {len(columns)} columns", line)
    if len(tokens) < 2:
        raise _fail("row has too few values", line)
    return dict(zip(columns, tokens, strict=False))


@dataclass(slots=True)
class _PendingNpu:
    npu_id: int
    name: str
    health: str
    values: dict[str, str]
    line: str


def _is_bus_id(text: str) -> bool:
    return bool(_BUS_ID.match(text))


def parse_info(text: str) -> InfoTable:
    """Parse the ``npu-smi info`` overview (chips and, when printed, the process table).

    Lines outside the table (prompts, warnings, environment dumps) are ignored. Rows pasted
    without a header are read in the default column order. A chip whose NPU row has no
    chip row under it means truncated output and is an error.
    """
    version: str | None = None
    npu_columns: tuple[str, ...] = _DEFAULT_NPU_VALUES
    chip_columns: tuple[str, ...] = _DEFAULT_CHIP_VALUES
    second_id = "logic"  # meaning of a second number in the chip row's first cell
    process_columns: dict[str, int] = {"pid": 1, "name": 2, "memory": 3, "container_pid": 4}
    chips: list[ChipRow] = []
    processes: list[ProcessRow] = []
    process_table = False
    saw_table = False
    pending: _PendingNpu | None = None
    seen: set[tuple[int, int]] = set()

    for line in text.splitlines():
        cells = _cells(line)
        if cells is None:
            continue
        saw_table = True
        first = cells[0]
        if len(cells) == 1:
            if match := re.search(r"Version:\s*(\S+)", first):
                version = match.group(1)
            elif first.startswith("No running processes"):
                process_table = True
            continue
        if len(cells) == 3:
            if not first[:1].isdigit():  # a header row
                if cells[1].lower().startswith("health"):
                    npu_columns = _value_columns(cells[2], _NPU_VALUE_KEYS)
                elif cells[1].lower().startswith("bus-id"):
                    chip_columns = _value_columns(cells[2], _CHIP_VALUE_KEYS)
                    words = first.lower().split()
                    second_id = "phy" if len(words) > 1 and words[1].startswith("phy") else "logic"
                continue
            if pending is not None:
                # An NPU row is always followed by its chip row, whose second cell is the
                # bus id; anything else means the chip row is missing.
                if not (_is_bus_id(cells[1]) or cells[1].upper() in _NOT_SUPPORTED):
                    raise _fail(f"NPU {pending.npu_id} has no chip row (truncated?)", pending.line)
                chip = _chip_row(pending, cells, chip_columns, second_id, line)
                if (chip.npu_id, chip.chip_id) in seen:
                    raise _fail(f"NPU {chip.npu_id} chip {chip.chip_id} listed twice", line)
                seen.add((chip.npu_id, chip.chip_id))
                chips.append(chip)
                pending = None
                continue
            if _is_bus_id(cells[1]):
                raise _fail("chip row without an NPU row above it", line)
            # Names may be digits ("310"), so "0  310" is read as NPU id and name here.
            match = re.match(r"^(\d+)\s+(\S.*)$", first)
            if match is None:
                raise _fail("NPU row without an NPU id and a name", line)
            pending = _PendingNpu(
                npu_id=int(match.group(1)),
                name=match.group(2).strip(),
                health=cells[1],
                values=_values(cells[2], npu_columns, line),
                line=line,
            )
            continue
        if len(cells) in (4, 5):
            process_table = True
            if not first[:1].isdigit():
                process_columns = _process_columns(cells) or process_columns
                continue
            processes.append(_process_row(cells, process_columns, line))
            continue
        raise _fail(f"row with {len(cells)} cells not understood", line)

    if pending is not None:
        raise _fail(f"NPU {pending.npu_id} has no chip row (truncated?)", pending.line)
    if not saw_table:
        raise _fail("no table found" if text.strip() else "empty")
    return InfoTable(
        version=version,
        chips=tuple(chips),
        processes=tuple(processes),
        process_table=process_table,
    )


def _chip_row(
    npu: _PendingNpu, cells: list[str], columns: Sequence[str], second_id: str, line: str
) -> ChipRow:
    ids = cells[0].split()
    if not ids or len(ids) > 2 or not all(i.isdigit() for i in ids):
        raise _fail("chip row without a chip id", line)
    second = int(ids[1]) if len(ids) == 2 else None
    values = _values(cells[2], columns, line)
    if "aicore" not in values or "memory" not in values:
        raise _fail("chip row lacks AICore or Memory-Usage", line)
    mem_used, mem_total = _pair(values["memory"], "Memory-Usage", line)
    hbm_used, hbm_total = _pair(values.get("hbm", "NA"), "HBM-Usage", line)
    pages_used, pages_total = _pair(npu.values.get("hugepages", "NA"), "Hugepages", npu.line)
    return ChipRow(
        npu_id=npu.npu_id,
        chip_id=int(ids[0]),
        name=npu.name,
        health=npu.health,
        bus_id=cells[1] if _is_bus_id(cells[1]) else None,
        power_w=_float(npu.values.get("power", "NA"), "Power", npu.line),
        temperature_c=_float(npu.values.get("temp", "NA"), "Temp", npu.line),
        aicore_pct=_float(values["aicore"], "AICore", line),
        memory_used_mib=mem_used,
        memory_total_mib=mem_total,
        hbm_used_mib=hbm_used,
        hbm_total_mib=hbm_total,
        hugepages_used=pages_used,
        hugepages_total=pages_total,
        logic_id=second if second_id == "logic" else None,
        phy_id=second if second_id == "phy" else None,
    )


def _process_columns(header: list[str]) -> dict[str, int]:
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        key = name.lower()
        if key.startswith("process id in container"):
            columns["container_pid"] = index
        elif key.startswith("process id"):
            columns["pid"] = index
        elif key.startswith("process name"):
            columns["name"] = index
        elif key.startswith("process memory"):
            columns["memory"] = index
    return columns if {"pid", "name", "memory"} <= columns.keys() else {}


def _process_row(cells: list[str], columns: Mapping[str, int], line: str) -> ProcessRow:
    ids = cells[0].split()
    if len(ids) != 2 or not all(i.isdigit() for i in ids):
        raise _fail("process row without NPU and chip ids", line)

    def cell(key: str) -> str:
        index = columns.get(key)
        return cells[index] if index is not None and index < len(cells) else "NA"

    pid = _int(cell("pid"), "Process id", line)
    if pid is None:
        raise _fail("process row without a pid", line)
    return ProcessRow(
        npu_id=int(ids[0]),
        chip_id=int(ids[1]),
        pid=pid,
        name=cell("name"),
        memory_mib=_int(cell("memory"), "Process memory", line),
        container_pid=_int(cell("container_pid"), "Process id in container", line),
    )


# --------------------------------------------------------------------------- key : value


def parse_key_values(text: str) -> tuple[Mapping[str, str], ...]:
    """Blocks of ``Key : value`` lines, split at blank lines (``info -t ...``, ``-l``).

    Lines without a colon are ignored; output without any pair is an error.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        match = _KEY_VALUE.match(line)
        if match is None:
            continue
        key, value = match.groups()
        if key in current:  # a repeated key starts a new block even without a blank line
            blocks.append(current)
            current = {}
        current[key] = value
    if current:
        blocks.append(current)
    if not blocks:
        raise _fail("no 'key : value' lines" if text.strip() else "empty")
    return tuple(blocks)


def _get(block: Mapping[str, str], key: str) -> str:
    """Look a key up ignoring case (npu-smi spells ``MHz`` and ``MHZ`` both ways)."""
    wanted = key.lower()
    for name, value in block.items():
        if name.lower() == wanted:
            return value
    return "NA"


def _has(block: Mapping[str, str], key: str) -> bool:
    wanted = key.lower()
    return any(name.lower() == wanted for name in block)


def _block_int(block: Mapping[str, str], key: str) -> int | None:
    return _int(_get(block, key), key, f"{key} : {_get(block, key)}")


def _block_float(block: Mapping[str, str], key: str) -> float | None:
    return _float(_get(block, key), key, f"{key} : {_get(block, key)}")


@dataclass(frozen=True, slots=True)
class NpuEntry:
    npu_id: int
    chip_count: int | None
    product_name: str | None = None


@dataclass(frozen=True, slots=True)
class CardList:
    """``npu-smi info -l``. ``total_count`` may exceed ``len(npus)`` in partial pastes."""

    total_count: int | None
    npus: tuple[NpuEntry, ...]


def parse_card_list(text: str) -> CardList:
    """Parse ``npu-smi info -l``: the NPU ids and how many chips each carries."""
    total: int | None = None
    npus: list[NpuEntry] = []
    for block in parse_key_values(text):
        if _has(block, "Total Count"):
            total = _block_int(block, "Total Count")
        if _has(block, "NPU ID"):
            npu_id = _block_int(block, "NPU ID")
            if npu_id is None:
                raise _fail("NPU ID missing", _get(block, "NPU ID"))
            product = _get(block, "Product Name")
            npus.append(
                NpuEntry(
                    npu_id=npu_id,
                    chip_count=_block_int(block, "Chip Count"),
                    product_name=None if product.upper() in _NOT_SUPPORTED else product,
                )
            )
    if total is None and not npus:
        raise _fail("no 'Total Count' or 'NPU ID' in npu-smi info -l")
    return CardList(total_count=total, npus=tuple(npus))


@dataclass(frozen=True, slots=True)
class ChipMapping:
    """One row of ``npu-smi info -m``. ``logic_id`` is None for non-compute chips (Mcu).

    The logic id is what ``ASCEND_RT_VISIBLE_DEVICES`` takes.
    """

    npu_id: int
    chip_id: int
    logic_id: int | None
    chip_name: str
    phy_id: int | None = None

    @property
    def is_compute(self) -> bool:
        return self.logic_id is not None


_MAP_COLUMNS = {
    "npu id": "npu",
    "chip id": "chip",
    "chip logic id": "logic",
    "chip phy-id": "phy",
    "chip name": "name",
}


def parse_chip_map(text: str) -> tuple[ChipMapping, ...]:
    """Parse ``npu-smi info -m``, columns by header (two or more spaces separate them)."""
    columns: list[str] = ["npu", "chip", "logic", "name"]
    rows: list[ChipMapping] = []
    header_seen = False
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = re.split(r"\s{2,}|\t", line.strip())
        if fields[0].lower() == "npu id":
            columns = [_MAP_COLUMNS.get(f.lower(), f.lower()) for f in fields]
            header_seen = True
            continue
        if not fields[0].isdigit():
            continue
        if len(fields) != len(columns):
            raise _fail(f"{len(fields)} fields under {len(columns)} columns", line)
        row = dict(zip(columns, fields, strict=True))
        npu_id = _int(row.get("npu", "NA"), "NPU ID", line)
        chip_id = _int(row.get("chip", "NA"), "Chip ID", line)
        if npu_id is None or chip_id is None:
            raise _fail("row without NPU ID or Chip ID", line)
        rows.append(
            ChipMapping(
                npu_id=npu_id,
                chip_id=chip_id,
                logic_id=_int(row.get("logic", "NA"), "Chip Logic ID", line),
                chip_name=row.get("name", ""),
                phy_id=_int(row.get("phy", "NA"), "Chip Phy-ID", line),
            )
        )
    if not rows and not header_seen:
        raise _fail("no chip mapping table" if text.strip() else "empty")
    return tuple(rows)


def _npu_header(blocks: Sequence[Mapping[str, str]]) -> tuple[int | None, int | None]:
    for block in blocks:
        if _has(block, "NPU ID"):
            return _block_int(block, "NPU ID"), _block_int(block, "Chip Count")
    return None, None


@dataclass(frozen=True, slots=True)
class ChipUsage:
    """Per-chip ``npu-smi info -t usages``: capacities in MiB, rates in percent."""

    chip_id: int | None
    ddr_capacity_mib: int | None
    ddr_usage_pct: float | None
    hbm_capacity_mib: int | None
    hbm_usage_pct: float | None
    aicore_pct: float | None
    aicpu_pct: float | None
    ctrlcpu_pct: float | None


@dataclass(frozen=True, slots=True)
class NpuUsages:
    npu_id: int | None
    chip_count: int | None
    chips: tuple[ChipUsage, ...]


_USAGE_KEYS = ("DDR Capacity(MB)", "HBM Capacity(MB)")


def parse_usages(text: str) -> NpuUsages:
    """Parse ``npu-smi info -t usages -i N``; its ``Chip ID`` line ends each chip's block."""
    blocks = parse_key_values(text)
    npu_id, chip_count = _npu_header(blocks)
    chips = tuple(
        ChipUsage(
            chip_id=_block_int(block, "Chip ID"),
            ddr_capacity_mib=_block_int(block, "DDR Capacity(MB)"),
            ddr_usage_pct=_block_float(block, "DDR Usage Rate(%)"),
            hbm_capacity_mib=_block_int(block, "HBM Capacity(MB)"),
            hbm_usage_pct=_block_float(block, "HBM Usage Rate(%)"),
            aicore_pct=_block_float(block, "Aicore Usage Rate(%)"),
            aicpu_pct=_block_float(block, "Aicpu Usage Rate(%)"),
            ctrlcpu_pct=_block_float(block, "Ctrlcpu Usage Rate(%)"),
        )
        for block in blocks
        if any(_has(block, key) for key in _USAGE_KEYS)
    )
    if not chips:
        raise _fail("no usage figures in npu-smi info -t usages")
    return NpuUsages(npu_id=npu_id, chip_count=chip_count, chips=chips)


@dataclass(frozen=True, slots=True)
class ChipCommon:
    """Per-chip ``npu-smi info -t common``."""

    chip_id: int
    memory_usage_pct: float | None
    hbm_usage_pct: float | None
    aicore_pct: float | None
    aicore_count: int | None
    aicore_freq_mhz: int | None
    aicore_cur_freq_mhz: int | None
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True, slots=True)
class NpuCommon:
    """``npu-smi info -t common -i N``. On 310P the card's power and its MCU temperature
    come in a trailing ``Chip Name : mcu`` block without a chip id."""

    npu_id: int | None
    chip_count: int | None
    chips: tuple[ChipCommon, ...]
    mcu_temperature_c: float | None = None
    power_w: float | None = None


def parse_common(text: str) -> NpuCommon:
    """Parse ``npu-smi info -t common -i N``; ``Chip ID`` opens each chip's block."""
    blocks = parse_key_values(text)
    npu_id, chip_count = _npu_header(blocks)
    chips: list[ChipCommon] = []
    mcu_temperature: float | None = None
    card_power: float | None = None
    for block in blocks:
        if _has(block, "Chip ID"):
            chip_id = _block_int(block, "Chip ID")
            if chip_id is None:
                raise _fail("Chip ID missing", _get(block, "Chip ID"))
            chips.append(
                ChipCommon(
                    chip_id=chip_id,
                    memory_usage_pct=_block_float(block, "Memory Usage Rate(%)"),
                    hbm_usage_pct=_block_float(block, "HBM Usage Rate(%)"),
                    aicore_pct=_block_float(block, "Aicore Usage Rate(%)"),
                    aicore_count=_block_int(block, "Aicore Count"),
                    aicore_freq_mhz=_block_int(block, "Aicore Freq(MHZ)"),
                    aicore_cur_freq_mhz=_block_int(block, "Aicore curFreq(MHZ)"),
                    temperature_c=_block_float(block, "Temperature(C)"),
                    power_w=_block_float(block, "NPU Real-time Power(W)"),
                )
            )
        elif _get(block, "Chip Name").lower() == "mcu":
            mcu_temperature = _block_float(block, "Temperature(C)")
            card_power = _block_float(block, "NPU Real-time Power(W)")
    if not chips:
        raise _fail("no 'Chip ID' block in npu-smi info -t common")
    if card_power is None and len(chips) == 1:
        card_power = chips[0].power_w
    return NpuCommon(
        npu_id=npu_id,
        chip_count=chip_count,
        chips=tuple(chips),
        mcu_temperature_c=mcu_temperature,
        power_w=card_power,
    )


@dataclass(frozen=True, slots=True)
class ChipMemory:
    """``npu-smi info -t memory -i N -c M`` (some versions omit the id lines)."""

    npu_id: int | None
    chip_id: int | None
    ddr_capacity_mib: int | None
    ddr_clock_mhz: int | None
    hbm_capacity_mib: int | None
    hbm_clock_mhz: int | None
    hbm_temperature_c: float | None

    @property
    def device_memory_mib(self) -> int | None:
        """HBM where the chip has it, else DDR (310 family)."""
        return self.hbm_capacity_mib or self.ddr_capacity_mib or None


def parse_memory(text: str) -> ChipMemory:
    """Parse ``npu-smi info -t memory -i N -c M`` into one chip's memory facts."""
    merged: dict[str, str] = {}
    for block in parse_key_values(text):
        merged.update(block)
    if not (_has(merged, "DDR Capacity(MB)") or _has(merged, "HBM Capacity(MB)")):
        raise _fail("no DDR or HBM capacity in npu-smi info -t memory")
    return ChipMemory(
        npu_id=_block_int(merged, "NPU ID"),
        chip_id=_block_int(merged, "Chip ID"),
        ddr_capacity_mib=_block_int(merged, "DDR Capacity(MB)"),
        ddr_clock_mhz=_block_int(merged, "DDR Clock Speed(MHz)"),
        hbm_capacity_mib=_block_int(merged, "HBM Capacity(MB)"),
        hbm_clock_mhz=_block_int(merged, "HBM Clock Speed(MHz)"),
        hbm_temperature_c=_block_float(merged, "HBM Temperature(C)"),
    )


@dataclass(frozen=True, slots=True)
class ProcMemory:
    pid: int
    name: str
    memory_mib: int | None


_PROC_MEM = re.compile(
    r"Process id:\s*(\d+)\s+Process name:\s*(.*?)\s+Process memory\(MB\):\s*(\S+)"
)


def parse_proc_mem(text: str) -> tuple[ProcMemory, ...]:
    """Parse ``npu-smi info -t proc-mem -i N -c M``; no process lines means none run."""
    found: list[ProcMemory] = []
    for line in text.splitlines():
        if "Process id" not in line:
            continue
        match = _PROC_MEM.search(line)
        if match is None:
            raise _fail("process line not understood", line)
        pid, name, memory = match.groups()
        found.append(
            ProcMemory(pid=int(pid), name=name, memory_mib=_int(memory, "Process memory", line))
        )
    return tuple(found)


@dataclass(frozen=True, slots=True)
class ChipHealth:
    """``npu-smi info -t health -i N -c M``."""

    status: str
    error_code: str | None
    error_information: str | None

    @property
    def health(self) -> tuple[Health, str | None]:
        return health_of(self.status)


def parse_health(text: str) -> ChipHealth:
    merged: dict[str, str] = {}
    for block in parse_key_values(text):
        merged.update(block)
    if not _has(merged, "Health Status"):
        raise _fail("no 'Health Status' in npu-smi info -t health")

    def optional(key: str) -> str | None:
        value = _get(merged, key)
        return None if value.upper() in _NOT_SUPPORTED else value

    return ChipHealth(
        status=_get(merged, "Health Status"),
        error_code=optional("Error Code"),
        error_information=optional("Error Information"),
    )


@dataclass(frozen=True, slots=True)
class BoardInfo:
    """``npu-smi info -t board -i N [-c M]``: identity and PCI ids of a card or chip."""

    npu_id: int | None
    chip_id: int | None
    bus_id: str | None
    pci_vendor_id: int | None
    pci_device_id: int | None
    chip_name: str | None
    software_version: str | None
    firmware_version: str | None
    chip_count: int | None


def parse_board(text: str) -> BoardInfo:
    merged: dict[str, str] = {}
    for block in parse_key_values(text):
        merged.update(block)

    def optional(key: str) -> str | None:
        value = _get(merged, key)
        return None if value.upper() in _NOT_SUPPORTED else value

    return BoardInfo(
        npu_id=_block_int(merged, "NPU ID"),
        chip_id=_block_int(merged, "Chip ID"),
        bus_id=optional("PCIe Bus Info"),
        pci_vendor_id=_hex(_get(merged, "PCI Vendor ID"), "PCI Vendor ID"),
        pci_device_id=_hex(_get(merged, "PCI Device ID"), "PCI Device ID"),
        chip_name=optional("Chip Name"),
        software_version=optional("Software Version"),
        firmware_version=optional("Firmware Version"),
        chip_count=_block_int(merged, "Chip Count"),
    )


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True, slots=True)
class Topology:
    """``npu-smi info -t topo``: link kind between NPUs (``HCCS``, ``PIX``, ``SYS``...) and
    each NPU's CPU affinity (a cpulist such as ``144-167``)."""

    npus: tuple[str, ...]
    links: Mapping[tuple[str, str], str] = field(default_factory=dict)
    cpu_affinity: Mapping[str, str] = field(default_factory=dict)


def parse_topology(text: str) -> Topology:
    """Parse the topology matrix; the legend under it is ignored."""
    header: list[str] | None = None
    header_has_affinity = False
    links: dict[tuple[str, str], str] = {}
    affinity: dict[str, str] = {}
    npus: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            if header is not None and npus:
                break  # the legend follows the matrix after a blank line
            continue
        if header is None:
            if re.match(r"^\s*NPU\d+\b", line):
                header = re.findall(r"NPU\d+", line)
                header_has_affinity = "CPU Affinity" in line
            continue
        fields = line.split()
        if not fields or not re.fullmatch(r"NPU\d+", fields[0]):
            continue
        row, values = fields[0], fields[1:]
        if len(values) < len(header):
            raise _fail("topology row shorter than its header", line)
        npus.append(row)
        for column, kind in zip(header, values, strict=False):
            links[(row, column)] = kind
        if header_has_affinity and len(values) > len(header):
            affinity[row] = values[len(header)]
    if header is None or not npus:
        raise _fail("no topology matrix" if text.strip() else "empty")
    return Topology(npus=tuple(npus), links=links, cpu_affinity=affinity)


# --------------------------------------------------------------------------- vNPU


@dataclass(frozen=True, slots=True)
class VnpuTemplate:
    """One template of ``npu-smi info -t template-info`` (memory in GB as printed)."""

    name: str
    aicore: int | None
    memory_gb: int | None
    aicpu: int | None


def parse_vnpu_templates(text: str) -> tuple[VnpuTemplate, ...]:
    """Parse ``npu-smi info -t template-info``; continuation rows (no name) are skipped."""
    templates: list[VnpuTemplate] = []
    for line in text.splitlines():
        cells = _cells(line)
        if cells is None:
            continue
        fields = cells[0].split()
        if len(fields) < 4 or not re.fullmatch(r"[A-Za-z]\w*", fields[0]):
            continue
        if fields[0].lower() == "name" or not fields[1].isdigit():
            continue
        templates.append(
            VnpuTemplate(
                name=fields[0],
                aicore=_int(fields[1], "AICORE", line),
                memory_gb=_int(fields[2], "Memory", line),
                aicpu=_int(fields[3], "AICPU", line),
            )
        )
    if not templates:
        raise _fail("no vNPU template rows")
    return tuple(templates)


@dataclass(frozen=True, slots=True)
class Vnpu:
    """One vNPU of ``npu-smi info -t info-vnpu``; ``status`` 1 means in use by a container."""

    vnpu_id: int
    vgroup_id: int | None
    container_id: str | None
    status: int | None
    template: str


@dataclass(frozen=True, slots=True)
class VnpuInfo:
    """``npu-smi info -t info-vnpu -i N -c M``: free/total per resource and the vNPUs.

    ``resources`` maps the printed names (``AICORE``, ``Memory`` in GB, ``AICPU``...) to
    (free, total). Pasted tails may lack the resource table or the count.
    """

    resources: Mapping[str, tuple[int | None, int | None]]
    total_vnpus: int | None
    vnpus: tuple[Vnpu, ...]


def parse_vnpu_info(text: str) -> VnpuInfo:
    resources: dict[str, tuple[int | None, int | None]] = {}
    resource_names: list[str] | None = None
    total: int | None = None
    vnpus: list[Vnpu] = []
    for line in text.splitlines():
        cells = _cells(line)
        if cells is None:
            continue
        if len(cells) == 1:
            cell = cells[0]
            if match := re.match(r"Total number of vnpu:\s*(\d+)", cell):
                total = int(match.group(1))
            elif cell.startswith("AICORE"):
                resource_names = cell.split()
            elif resource_names is not None and "/" in cell:
                for name, pair in zip(resource_names, cell.split(), strict=False):
                    resources[name] = _pair(pair, name, line)
                resource_names = None
            continue
        if len(cells) == 5 and cells[0].isdigit():
            container = cells[2]
            vnpus.append(
                Vnpu(
                    vnpu_id=int(cells[0]),
                    vgroup_id=_int(cells[1], "Vgroup ID", line),
                    container_id=None if container.upper() in _NOT_SUPPORTED else container,
                    status=_int(cells[3], "Status", line),
                    template=cells[4],
                )
            )
    if not resources and total is None and not vnpus:
        raise _fail("no vNPU information" if text.strip() else "empty")
    return VnpuInfo(resources=resources, total_vnpus=total, vnpus=tuple(vnpus))


def vnpu_template_of(name: str) -> str | None:
    """Inside a vNPU container the Name column reads e.g. ``310Pvir02``: the template."""
    match = _VNPU_NAME.search(name)
    return match.group(0) if match else None
