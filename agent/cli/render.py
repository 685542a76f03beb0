"""Tables for humans; ``--json`` prints the API's JSON unchanged."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

from agent.placement import model_matches, parse_models
from agent.units import format_mib

TYPE_CHECKING = False  # not ``typing``: see agent/cli/xpuctl.py
if TYPE_CHECKING:
    from typing import Any


class Col:
    """A table column. Narrow output (the default) drops columns with ``drop`` > 0, lowest
    first, and then cuts ``shrink`` columns, widest first, until the table fits the
    terminal; ``--wide`` shows everything whole."""

    __slots__ = ("drop", "header", "shrink")

    def __init__(self, header: str, drop: int = 0, shrink: bool = False) -> None:
        self.header = header
        self.drop = drop
        self.shrink = shrink


#: Texttable's layout with a header rule and no vertical lines: one space each side.
_GAP = 3
_ELLIPSIS = "…"
_MIN_CUT = 4
_SOFT_CUT = 24


def terminal_width() -> int:
    """$COLUMNS, then the terminal's own width, else 80 (pipes, CI logs)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


def _width(headers: Sequence[str], rows: list[list[str]]) -> int:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    return sum(widths) + _GAP * (len(widths) - 1)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


def _blank(cells: Iterable[str]) -> bool:
    return all(c in ("", "-") for c in cells)


def fit(
    cols: Sequence[Col], rows: Iterable[Sequence[Any]], width: int | None
) -> tuple[list[str], list[list[str]]]:
    """The headers and cells that fit ``width`` columns (``None``: no limit)."""
    keep = list(cols)
    cells = [[str(c) for c in row] for row in rows]
    if width is None:
        return [c.header for c in keep], cells

    def index(col: Col) -> int:
        return keep.index(col)

    # First cut long names to a readable length, then drop optional columns (empty ones
    # first, then by their drop order), then cut further.
    _shrink(keep, cells, width, _SOFT_CUT)
    optional = sorted(
        (c for c in keep if c.drop),
        key=lambda c: (not _blank(r[index(c)] for r in cells), c.drop),
    )
    for col in optional:
        if _width([c.header for c in keep], cells) <= width:
            break
        i = index(col)
        keep.pop(i)
        for row in cells:
            row.pop(i)
    _shrink(keep, cells, width, _MIN_CUT)
    return [c.header for c in keep], cells


def _shrink(keep: list[Col], cells: list[list[str]], width: int, floor: int) -> None:
    """Cut the widest shrinkable column, never below ``floor`` (or its header)."""
    headers = [c.header for c in keep]
    while (over := _width(headers, cells) - width) > 0:
        candidates = [
            (max((len(r[i]) for r in cells), default=0), i)
            for i, c in enumerate(keep)
            if c.shrink and max((len(r[i]) for r in cells), default=0) > max(floor, len(c.header))
        ]
        if not candidates:
            return  # nothing left to cut at this floor
        longest, i = max(candidates)
        limit = max(floor, len(headers[i]), longest - over)
        for row in cells:
            row[i] = _cut(row[i], limit)


def _draw(rows: list[Sequence[Any]], headers: Sequence[str] | None) -> str:
    # texttable rather than tabulate: tabulate imports importlib.metadata (~25 ms), which
    # alone would double xpuctl's start-up time.
    from texttable import Texttable  # noqa: PLC0415 - only when a table is printed

    width = len(headers) if headers else max((len(r) for r in rows), default=1)
    drawer = Texttable(max_width=0)
    drawer.set_deco(Texttable.HEADER if headers else 0)
    drawer.set_cols_dtype(["t"] * width)
    drawer.set_cols_align(["l"] * width)
    drawer.set_header_align(["l"] * width)
    drawer.set_chars(["-", "|", "+", "-"])
    if headers:
        drawer.header([str(h) for h in headers])
    drawer.add_rows([[str(c) for c in row] for row in rows], header=False)
    return str(drawer.draw())


def table(
    headers: Sequence[str | Col], rows: Iterable[Sequence[Any]], width: int | None = None
) -> str:
    """A table; with ``width``, narrowed to fit it (see :class:`Col`)."""
    cols = [h if isinstance(h, Col) else Col(h) for h in headers]
    names, cells = fit(cols, rows, width)
    return _draw(list(cells), names)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def mib(value: float | None) -> str:
    return format_mib(value)


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    delta = ts - time.time()
    word = "in " if delta > 0 else ""
    delta = abs(delta)
    if delta < 120:
        text = f"{delta:.0f}s"
    elif delta < 7200:
        text = f"{delta / 60:.0f}m"
    else:
        text = f"{delta / 3600:.1f}h"
    return f"{word}{text}" if word else f"{text} ago"


def status_text(node: dict[str, Any]) -> str:
    cap, alloc, free, idle = node["capacity"], node["allocated"], node["free"], node["idle"]
    mqtt = node["mqtt"]
    link = mqtt["state"] + (f" ({mqtt['url']})" if mqtt["url"] else "")
    rows = [
        ("node", f"{node['node']} (zone {node['zone']})"),
        ("agent", f"xpu-agent {node['version']}, up {node['uptime_s']:.0f}s"),
        ("backends", ", ".join(node["backends"]) or "-"),
        ("health", f"{node['health']} ({node['devices_healthy']}/{node['devices']} devices ok)"),
        *(("", f"- {why}") for why in node.get("health_reasons", [])),
        ("mqtt", link),
        (
            "capacity",
            f"{mib(cap['memory_mib'])}, {cap['compute_pct']}% compute, {cap['slices']} slots",
        ),
        (
            "allocated",
            f"{mib(alloc['memory_mib'])}, {alloc['compute_pct']}% compute, "
            f"{alloc['slices']} slices",
        ),
        ("free", f"{mib(free['memory_mib'])}, {free['compute_pct']}% compute"),
        ("lendable", f"{mib(idle['memory_mib'])}, {idle['compute_pct']}% compute"),
    ]
    host = node.get("host")
    if host:
        rows.append(
            (
                "host",
                f"{host['cpu_free_milli'] / 1000:g} of {host['cpu_milli'] / 1000:g} CPUs and "
                f"{mib(host['memory_free_mib'])} of {mib(host['memory_mib'])} free for slices",
            )
        )
        rows.append(("host limits", host["limits"]))
    return _draw(list(rows), None)


def devices_text(devices: list[dict[str, Any]], width: int | None = None) -> str:
    rows = []
    for d in devices:
        used = d["memory_used_mib"]
        rows.append(
            (
                d["id"],
                d["model"],
                f"{mib(used)} / {mib(d['memory_total_mib'])}",
                pct(d["utilisation_pct"]),
                f"{d['slice_count']} ({d['allocated_compute_pct']}%, "
                f"{mib(d['allocated_memory_mib'])})",
                (d.get("enforcement") or {}).get("rung", "-"),
                d["health"] + (f": {d['health_reason']}" if d["health_reason"] else ""),
            )
        )
    cols = (
        Col("ID", shrink=True),
        Col("MODEL", shrink=True),
        Col("MEMORY USED/TOTAL"),
        Col("UTIL", drop=2),
        Col("SLICES", drop=1),
        Col("ENFORCED BY", drop=3),
        Col("HEALTH", shrink=True),
    )
    text = table(cols, rows, width)
    if width is None:  # --wide: why the stronger mechanisms do not hold a card
        refusals = [
            f"{d['id']}: {rung} refused: {why}"
            for d in devices
            for rung, why in ((d.get("enforcement") or {}).get("refused") or {}).items()
        ]
        if refusals:
            text += "\n\n" + "\n".join(refusals)
    slices = [s for d in devices for s in d["slices"]]
    return text + ("\n\n" + slice_usage_text(slices, width) if slices else "")


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def slice_usage_text(slices: list[dict[str, Any]], width: int | None = None) -> str:
    """Per slice: what it uses against its limits, and what the enforcer did."""
    rows = []
    for s in slices:
        usage = s.get("usage") or {}
        rows.append(
            (
                s["id"],
                s["device"],
                f"{mib(usage.get('memory_used_mib'))}/{mib(s['memory_mib'])}",
                f"{pct(usage.get('compute_used_pct'))}/{s['compute_pct']}%",
                _yes_no(usage.get("throttled")),
                usage.get("last_action") or "-",
            )
        )
    # THROTTLED goes first when narrow: LAST ACTION ("compute throttle") says it too.
    cols = (
        Col("SLICE"),
        Col("DEVICE", shrink=True),
        Col("MEM USED/LIMIT"),
        Col("COMPUTE USED/QUOTA"),
        Col("THROTTLED", drop=1),
        Col("LAST ACTION", drop=2, shrink=True),
    )
    return table(cols, rows, width)


def slices_text(slices: list[dict[str, Any]], width: int | None = None) -> str:
    rows = []
    for s in slices:
        usage = s.get("usage") or {}
        rows.append(
            (
                s["id"],
                s["device"],
                mib(s["memory_mib"]),
                f"{s['compute_pct']}%",
                s["owner_uid"],
                s["state"] + (" (throttled)" if usage.get("throttled") else ""),
                mib(usage.get("memory_used_mib")) if usage else "-",
                pct(usage.get("compute_used_pct")) if usage else "-",
                _yes_no(usage.get("throttled")) if usage else "-",
                usage.get("last_action") or "-",
                ",".join(str(p["pid"]) for p in s["processes"]) or "-",
                ago(s["expires_at"]),
                s["borrower"] or "",
            )
        )
    # Narrow: what identifies and bounds a slice stays; measurements and details drop first
    # (THROTTLED is already in STATE).
    cols = (
        Col("ID"),
        Col("DEVICE", shrink=True),
        Col("MEMORY"),
        Col("COMPUTE"),
        Col("UID", drop=8),
        Col("STATE", shrink=True),
        Col("MEM USED", drop=5),
        Col("UTIL", drop=4),
        Col("THROTTLED", drop=1),
        Col("LAST ACTION", drop=2, shrink=True),
        Col("PIDS", drop=6, shrink=True),
        Col("EXPIRES", drop=7),
        Col("BORROWER", drop=3, shrink=True),
    )
    return table(cols, rows, width)


def slice_text(s: dict[str, Any]) -> str:
    lines = [
        f"slice {s['id']} on {s['device']}: {mib(s['memory_mib'])}, {s['compute_pct']}% compute"
        + (f", {s['cpu_milli'] / 1000:g} CPUs" if s.get("cpu_milli") else "")
        + (f", {mib(s['host_memory_mib'])} host memory" if s.get("host_memory_mib") else "")
        + (f", expires {ago(s['expires_at'])}" if s["expires_at"] else "")
    ]
    for key, value in sorted((s.get("env") or {}).items()):
        lines.append(f"  {key}={value}")
    return "\n".join(lines)


def filter_peers(
    peers: list[dict[str, Any]], model: str | None, state: str | None
) -> list[dict[str, Any]]:
    """Peers in one of the ``state`` alternatives with a card of one of the ``model``s
    (matched as everywhere else: :func:`agent.placement.model_matches`)."""
    wanted = parse_models(model)
    states = {s.strip().lower() for s in (state or "").split("|") if s.strip()}
    return [
        p
        for p in peers
        if (not states or p["state"].lower() in states)
        and (not wanted or any(model_matches(d["model"], wanted) for d in p["devices"]))
    ]


def _models(devices: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d["model"]] = counts.get(d["model"], 0) + 1
    return ", ".join(f"{n}x {m}" for m, n in sorted(counts.items())) or "-"


def _largest_free(devices: list[dict[str, Any]]) -> str:
    healthy = [d for d in devices if d["health"] == "ok"]
    if not healthy:
        return "-"
    best = max(healthy, key=lambda d: (d["memory_free_mib"], d["compute_free_pct"]))
    return f"{mib(best['memory_free_mib'])}/{best['compute_free_pct']}%"


def _state(peer: dict[str, Any]) -> str:
    return str(peer["state"]) + ("" if peer["placeable"] else "*")


def pool_text(peers: list[dict[str, Any]], width: int | None = None, wide: bool = False) -> str:
    """One line per peer, sorted by name (``wide``: one line per card, nothing cut)."""
    ordered = sorted(peers, key=lambda p: p["node"])
    if wide:
        return _pool_cards(ordered)
    rows = []
    for p in ordered:
        devices = p["devices"]
        rows.append(
            (
                p["node"],
                _state(p),
                len(devices),
                _models(devices),
                _largest_free(devices),
                f"{mib(sum(d['memory_free_mib'] for d in devices))}"
                f"/{sum(d['compute_free_pct'] for d in devices)}%",
                f"{mib(p['lendable_memory_mib'])}/{p['lendable_compute_pct']}%",
                f"{p['age_s']:.0f}s",
            )
        )
    cols = (
        Col("NODE", shrink=True),
        Col("STATE"),
        Col("CARDS"),
        Col("MODELS", drop=3, shrink=True),
        Col("LARGEST FREE"),
        Col("FREE TOTAL"),
        Col("LENDABLE", drop=1),
        Col("AGE", drop=2),
    )
    text = table(cols, rows, width)
    if any(not p["placeable"] for p in ordered):
        text += "\n* not placeable: not online, or its capacity has not arrived yet"
    return text


def _pool_cards(peers: list[dict[str, Any]]) -> str:
    rows = []
    for p in peers:
        first = True
        for d in p["devices"] or [None]:
            address = p.get("address") or "-"
            peer_cells = (
                (p["node"], _state(p), f"{p['age_s']:.1f}s", address) if first else ("", "", "", "")
            )
            first = False
            if d is None:
                rows.append(
                    (*peer_cells[:2], "-", "-", "-", "-", "-", "-", peer_cells[2], peer_cells[3])
                )
                continue
            rows.append(
                (
                    *peer_cells[:2],
                    d["id"],
                    d["model"],
                    d["health"],
                    f"{mib(d['memory_free_mib'])} / {mib(d['memory_total_mib'])}",
                    f"{d['compute_free_pct']}%",
                    d["slices"],
                    peer_cells[2],
                    peer_cells[3],
                )
            )
    headers = (
        "NODE",
        "STATE",
        "DEVICE",
        "MODEL",
        "HEALTH",
        "FREE/TOTAL MEM",
        "FREE COMPUTE",
        "SLICES",
        "AGE",
        "ADDRESS",
    )
    return table(headers, rows)


def leases_text(leases: list[dict[str, Any]], width: int | None = None) -> str:
    rows = [
        (
            lease["slice_id"],
            lease["lender"],
            lease["device"],
            mib(lease["memory_mib"]),
            f"{lease['compute_pct']}%",
            ago(lease["expires_at"]),
            "-" if lease.get("owner_uid") is None else lease["owner_uid"],
        )
        for lease in leases
    ]
    cols = (
        Col("LEASE"),
        Col("LENDER", shrink=True),
        Col("DEVICE", shrink=True),
        Col("MEMORY"),
        Col("COMPUTE"),
        Col("EXPIRES", drop=2),
        Col("UID", drop=1),
    )
    return table(cols, rows, width)


def candidates_text(candidates: list[dict[str, Any]], width: int | None = None) -> str:
    rows = [
        (
            i + 1,
            c["node"] + (" (this node)" if c["local"] else ""),
            c["device"],
            c["model"],
            f"{c['score']:.4f}",
            f"{mib(c['memory_free_after_mib'])}/{c['compute_free_after_pct']}%",
        )
        for i, c in enumerate(candidates)
    ]
    cols = (
        Col("RANK"),
        Col("NODE", shrink=True),
        Col("DEVICE", shrink=True),
        Col("MODEL", shrink=True),
        Col("SCORE", drop=1),
        Col("FREE AFTER"),
    )
    return table(cols, rows, width)


def event_line(e: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
    data = " ".join(f"{k}={v}" for k, v in sorted(e["data"].items()) if v is not None)
    slice_id = f" {e['slice_id']}" if e["slice_id"] else ""
    return f"{when} #{e['seq']} {e['kind']}{slice_id} {data}".rstrip()


def json_line(data: Any) -> str:
    return json.dumps(data, sort_keys=True)
