"""Tables for humans; ``--json`` prints the API's JSON unchanged."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from texttable import Texttable

from agent.units import format_mib


def _draw(rows: list[Sequence[Any]], headers: Sequence[str] | None) -> str:
    # texttable rather than tabulate: tabulate imports importlib.metadata (~25 ms), which
    # alone would double xpuctl's start-up time.
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


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return _draw(list(rows), headers)


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
    return _draw(list(rows), None)


def devices_text(devices: list[dict[str, Any]]) -> str:
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
                d["health"] + (f": {d['health_reason']}" if d["health_reason"] else ""),
            )
        )
    text = table(("ID", "MODEL", "MEMORY USED/TOTAL", "UTIL", "SLICES", "HEALTH"), rows)
    slices = [s for d in devices for s in d["slices"]]
    return text + ("\n\n" + slice_usage_text(slices) if slices else "")


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def slice_usage_text(slices: list[dict[str, Any]]) -> str:
    """Per slice: what it uses against its limits, and what the enforcer did."""
    rows = []
    for s in slices:
        usage = s.get("usage") or {}
        rows.append(
            (
                s["id"],
                s["device"],
                f"{mib(usage.get('memory_used_mib'))} / {mib(s['memory_mib'])}",
                f"{pct(usage.get('compute_used_pct'))} / {s['compute_pct']}%",
                _yes_no(usage.get("throttled")),
                usage.get("last_action") or "-",
            )
        )
    headers = ("SLICE", "DEVICE", "MEMORY USED/LIMIT", "COMPUTE USED/QUOTA", "THROTTLED")
    return table((*headers, "LAST ACTION"), rows)


def slices_text(slices: list[dict[str, Any]]) -> str:
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
    headers = (
        "ID",
        "DEVICE",
        "MEMORY",
        "COMPUTE",
        "UID",
        "STATE",
        "MEM USED",
        "UTIL",
        "THROTTLED",
        "LAST ACTION",
        "PIDS",
        "EXPIRES",
        "BORROWER",
    )
    return table(headers, rows)


def slice_text(s: dict[str, Any]) -> str:
    lines = [
        f"slice {s['id']} on {s['device']}: {mib(s['memory_mib'])}, {s['compute_pct']}% compute"
        + (f", expires {ago(s['expires_at'])}" if s["expires_at"] else "")
    ]
    for key, value in sorted((s.get("env") or {}).items()):
        lines.append(f"  {key}={value}")
    return "\n".join(lines)


def pool_text(peers: list[dict[str, Any]]) -> str:
    rows = []
    for p in peers:
        free = ", ".join(
            f"{d['id']}:{mib(d['memory_free_mib'])}/{d['compute_free_pct']}%" for d in p["devices"]
        )
        rows.append(
            (
                p["node"],
                p["state"] + ("" if p["placeable"] else " (not placeable)"),
                len(p["devices"]),
                free or "-",
                f"{mib(p['lendable_memory_mib'])}/{p['lendable_compute_pct']}%",
                f"{p['age_s']:.1f}s",
            )
        )
    return table(("NODE", "STATE", "DEVICES", "FREE (MEM/COMPUTE)", "LENDABLE", "AGE"), rows)


def leases_text(leases: list[dict[str, Any]]) -> str:
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
    return table(("LEASE", "LENDER", "DEVICE", "MEMORY", "COMPUTE", "EXPIRES", "UID"), rows)


def candidates_text(candidates: list[dict[str, Any]]) -> str:
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
    return table(("RANK", "NODE", "DEVICE", "MODEL", "SCORE", "FREE AFTER"), rows)


def event_line(e: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
    data = " ".join(f"{k}={v}" for k, v in sorted(e["data"].items()) if v is not None)
    slice_id = f" {e['slice_id']}" if e["slice_id"] else ""
    return f"{when} #{e['seq']} {e['kind']}{slice_id} {data}".rstrip()


def json_line(data: Any) -> str:
    return json.dumps(data, sort_keys=True)
