"""``xpuctl top``: a live view of the node's cards, their slices and the pool.

The screen is built by one pure function, :func:`frame`, from what the API returns (node,
devices, pool) into lines of styled text. ``--once`` prints that frame as plain text, so
scripts and tests read exactly what the live view shows; the live view paints the same
lines with curses. curses is imported only when the live view starts: ``xpuctl``'s other
commands must stay light, and ``--once`` must work where no terminal exists.

Bars are split by slice: each slice owns a run of cells labelled with its letter (the
legend lists the letters); the part of that run its processes actually use is drawn in
capitals, the rest in lower case — so a glance tells an idle reservation from a busy one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.cli import render
from agent.client.http import AgentClient, ClientError

if TYPE_CHECKING:  # curses is imported lazily, only for the live view
    import curses

#: Below this the live view says the terminal is too small instead of drawing garbage.
MIN_WIDTH = 40
MIN_HEIGHT = 6
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FREE_CELL = "."

# Styles: what a piece of text means, mapped to curses attributes only when painting.
NORMAL = "normal"
TITLE = "title"
HEADER = "header"
DIM = "dim"
WARN = "warn"  # throttled, unsliced processes, a degraded node
ALERT = "alert"  # over its memory limit, an unhealthy card, the agent unreachable
GOOD = "good"
SLICE_STYLES = tuple(f"slice{i}" for i in range(6))

Segment = tuple[str, str]


@dataclass(slots=True)
class Line:
    segments: list[Segment] = field(default_factory=list)

    def add(self, text: str, style: str = NORMAL) -> Line:
        if text:
            self.segments.append((text, style))
        return self

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One refresh: the three API reads, or why they failed."""

    node: dict[str, Any] | None
    devices: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    error: str | None
    taken_at: float


def fetch(client: AgentClient, clock: Callable[[], float] = time.time) -> Snapshot:
    try:
        node = client.get("/v1/node")
        devices = client.get("/v1/devices")
        pool = client.get("/v1/pool")
    except ClientError as exc:
        return Snapshot(None, [], [], str(exc), clock())
    return Snapshot(node, devices, pool, None, clock())


# -- the frame (pure) -----------------------------------------------------------------------


def _slice_style(index: int) -> str:
    return SLICE_STYLES[index % len(SLICE_STYLES)]


def _letter(index: int) -> str:
    return LETTERS[index % len(LETTERS)]


def _over_limit(s: dict[str, Any]) -> bool:
    usage = s.get("usage") or {}
    return bool(usage) and usage.get("memory_used_mib", 0) > s["memory_mib"]


def _cells(part: float, whole: float, width: int) -> int:
    return 0 if whole <= 0 else round(width * max(0.0, part) / whole)


def _bar(
    slices: Sequence[dict[str, Any]],
    whole: float,
    width: int,
    quota: Callable[[dict[str, Any]], float],
    used: Callable[[dict[str, Any]], float],
) -> list[Segment]:
    """``[AAaaBBbb....]``: one run per slice, its used part in capitals."""
    segments: list[Segment] = [("[", DIM)]
    drawn = 0
    for i, s in enumerate(slices):
        run = min(_cells(quota(s), whole, width), width - drawn)
        if run <= 0:
            continue
        busy = min(run, _cells(used(s), whole, width))
        letter = _letter(i)
        style = ALERT if _over_limit(s) else _slice_style(i)
        segments.append((letter * busy + letter.lower() * (run - busy), style))
        drawn += run
    segments.append((FREE_CELL * (width - drawn), DIM))
    segments.append(("]", DIM))
    return segments


def _mem_used(s: dict[str, Any]) -> float:
    return float((s.get("usage") or {}).get("memory_used_mib") or 0.0)


def _compute_used(s: dict[str, Any]) -> float:
    return float((s.get("usage") or {}).get("compute_used_pct") or 0.0)


def _header(snapshot: Snapshot, width: int) -> list[Line]:
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    node = snapshot.node
    if node is None:
        title = Line().add("xpuctl top", TITLE).add(f"  {clock}", DIM)
        return [title, Line().add(f"agent unreachable: {snapshot.error}", ALERT)]
    mqtt = node["mqtt"]
    left = f"xpu-agent {node['version']} on {node['node']} (zone {node['zone']})"
    right = f"up {_duration(node['uptime_s'])}  {clock}"
    gap = max(1, width - len(left) - len(right))
    title = Line().add(left, TITLE).add(" " * gap).add(right, DIM)
    health_style = GOOD if node["health"] == "ok" else WARN
    cap, alloc, idle = node["capacity"], node["allocated"], node["idle"]
    status = (
        Line()
        .add("health ")
        .add(node["health"], health_style)
        .add(f" ({node['devices_healthy']}/{node['devices']} devices ok)  backends ")
        .add(", ".join(node["backends"]) or "-")
        .add("  mqtt ")
        .add(mqtt["state"], GOOD if mqtt["connected"] else DIM)
    )
    totals = Line().add(
        f"allocated {render.mib(alloc['memory_mib'])}/{render.mib(cap['memory_mib'])} memory, "
        f"{alloc['compute_pct']}/{cap['compute_pct']}% compute, "
        f"{alloc['slices']}/{cap['slices']} slices"
    )
    lendable = Line().add(
        f"lendable {render.mib(idle['memory_mib'])}, {idle['compute_pct']}% compute"
    )
    lines = [title, status, totals, lendable]
    if snapshot.error:
        lines.append(Line().add(f"refresh failed: {snapshot.error}", ALERT))
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def _device_block(device: dict[str, Any], width: int) -> list[Line]:
    slices = sorted(device["slices"], key=lambda s: (s["created_at"], s["id"]))
    health = device["health"]
    head = (
        Line()
        .add(device["id"], HEADER)
        .add(f"  {device['model']}  ")
        .add(health, GOOD if health == "ok" else ALERT)
    )
    if device.get("health_reason"):
        head.add(f" ({device['health_reason']})", ALERT)
    util = device.get("utilisation_pct")
    used = device.get("memory_used_mib")
    head.add(f"  util {render.pct(util)}  used {render.mib(used)}", DIM)
    total = device["memory_total_mib"]
    mem_text = (
        f" {render.mib(device['allocated_memory_mib'])}/{render.mib(total)} "
        f"({_share(device['allocated_memory_mib'], total)})"
    )
    cmp_text = f" {device['allocated_compute_pct']}/100%"
    # "  mem " + "[" + cells + "]" + figures fills the width exactly.
    bar_width = max(10, width - len("  mem []") - max(len(mem_text), len(cmp_text)))
    mem = Line().add("  mem ", DIM)
    for seg in _bar(slices, total, bar_width, lambda s: s["memory_mib"], _mem_used):
        mem.add(*seg)
    mem.add(mem_text)
    cmp = Line().add("  cmp ", DIM)
    for seg in _bar(slices, 100, bar_width, lambda s: s["compute_pct"], _compute_used):
        cmp.add(*seg)
    cmp.add(cmp_text)
    lines = [head, mem, cmp]
    for i, s in enumerate(slices):
        lines.append(_slice_line(i, s))
    if device.get("unsliced_pids"):
        pids = ", ".join(str(p) for p in device["unsliced_pids"])
        lines.append(Line().add(f"    unsliced processes: {pids}", WARN))
    if not slices:
        lines.append(Line().add("    no slices", DIM))
    return lines


def _share(part: float, whole: float) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:.0f}%"


def _slice_line(index: int, s: dict[str, Any]) -> Line:
    usage = s.get("usage") or {}
    over = _over_limit(s)
    throttled = bool(usage.get("throttled"))
    line = Line().add("    ").add(f"{_letter(index)} ", _slice_style(index))
    line.add(f"{s['id']:<16}")
    line.add(f" uid {s['owner_uid']:<6}", DIM)
    mem_used = usage.get("memory_used_mib") if usage else None
    line.add(
        f" mem {render.mib(mem_used):>9}/{render.mib(s['memory_mib']):<9}",
        ALERT if over else NORMAL,
    )
    cpu_used = usage.get("compute_used_pct") if usage else None
    line.add(
        f" cmp {render.pct(cpu_used):>4}/{s['compute_pct']}%",
        WARN if throttled else NORMAL,
    )
    pids = ",".join(str(p["pid"]) for p in s["processes"]) or "-"
    line.add(f"  pids {pids}", DIM)
    if s.get("state") != "active":
        line.add(f"  {s['state'].upper()}", ALERT)
    if over:
        line.add("  OVER LIMIT", ALERT)
    if throttled:
        line.add("  THROTTLED", WARN)
    if s.get("borrower"):
        line.add(f"  lent to {s['borrower']}", DIM)
    if usage.get("last_action"):
        line.add(f"  last action: {usage['last_action']}", DIM)
    return line


def _pool_block(snapshot: Snapshot) -> list[Line]:
    node = snapshot.node or {}
    peers = snapshot.pool
    if not peers:
        mqtt = (node.get("mqtt") or {}).get("state", "?")
        why = "no MQTT bus configured" if mqtt == "standalone" else f"bus {mqtt}"
        return [Line().add("pool", HEADER).add(f"  no peers ({why})", DIM)]
    placeable = sum(1 for p in peers if p["placeable"])
    lend_mem = sum(p["lendable_memory_mib"] for p in peers)
    lend_cmp = sum(p["lendable_compute_pct"] for p in peers)
    lines = [
        Line()
        .add("pool", HEADER)
        .add(
            f"  {len(peers)} peer(s), {placeable} placeable; lendable "
            f"{render.mib(lend_mem)}, {lend_cmp}% compute"
        ),
        Line().add(
            f"  {'NODE':<20} {'STATE':<12} {'DEVICES':>7} {'FREE MEM':>10} "
            f"{'FREE CMP':>8} {'LENDABLE':>18} {'AGE':>7}",
            DIM,
        ),
    ]
    for p in sorted(peers, key=lambda p: p["node"]):
        free_mem = sum(d["memory_free_mib"] for d in p["devices"])
        free_cmp = sum(d["compute_free_pct"] for d in p["devices"])
        lendable = f"{render.mib(p['lendable_memory_mib'])}/{p['lendable_compute_pct']}%"
        state = p["state"] + ("" if p["placeable"] else "*")
        lines.append(
            Line().add(
                f"  {p['node']:<20} {state:<12} {len(p['devices']):>7} "
                f"{render.mib(free_mem):>10} {free_cmp:>7}% {lendable:>18} "
                f"{p['age_s']:>6.1f}s",
                NORMAL if p["placeable"] else DIM,
            )
        )
    return lines


def frame(snapshot: Snapshot, width: int) -> list[Line]:
    """Everything the view shows, top to bottom, for a screen ``width`` columns wide."""
    lines = _header(snapshot, width)
    if snapshot.node is None:
        return lines
    for device in snapshot.devices:
        lines.append(Line())
        lines.extend(_device_block(device, width))
    lines.append(Line())
    lines.extend(_pool_block(snapshot))
    return lines


def plain(lines: Sequence[Line], width: int | None = None) -> str:
    texts = [line.text if width is None else line.text[:width] for line in lines]
    return "\n".join(t.rstrip() for t in texts)


# -- entry point ----------------------------------------------------------------------------


def run(client: AgentClient, args: argparse.Namespace) -> int:
    client = AgentClient(client.socket_path, timeout_s=min(client.timeout_s, 5.0))
    if args.json:
        snapshot = _fetch_or_raise(client)
        render.emit_json(
            {"node": snapshot.node, "devices": snapshot.devices, "pool": snapshot.pool}
        )
        return 0
    if args.once or not (sys.stdin.isatty() and sys.stdout.isatty()):
        snapshot = _fetch_or_raise(client)
        width = shutil.get_terminal_size((120, 40)).columns
        print(plain(frame(snapshot, width)))
        return 0
    return LiveView(client, args.interval).run()


def _fetch_or_raise(client: AgentClient) -> Snapshot:
    """For one-shot output the agent's absence is an error (exit 1), not a screen."""
    node = client.get("/v1/node")
    return Snapshot(node, client.get("/v1/devices"), client.get("/v1/pool"), None, time.time())


# -- the live view (curses) -----------------------------------------------------------------


class LiveView:
    """Paints :func:`frame` with curses until ``q``. Keys: q quit, r refresh now, arrows /
    j k / PgUp PgDn / Home scroll. Resizes redraw at once; nothing needs a mouse."""

    def __init__(self, client: AgentClient, interval_s: float) -> None:
        self._client = client
        self._interval_s = max(0.2, interval_s)
        self._scroll = 0
        self._attrs: dict[str, int] = {}

    def run(self) -> int:
        import curses  # noqa: PLC0415 - only the live view needs it

        # ncurses prefers $LINES/$COLUMNS to the terminal's real size; they go stale on the
        # first resize (and some shells export a default size), so ask the terminal.
        for name in ("LINES", "COLUMNS"):
            os.environ.pop(name, None)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C leaves like q
            curses.wrapper(self._main)
        return 0

    def _setup(self, screen: curses.window) -> None:
        import curses  # noqa: PLC0415

        with contextlib.suppress(curses.error):  # terminals without cursor control work too
            curses.curs_set(0)
        screen.keypad(True)
        bold, dim, reverse = curses.A_BOLD, curses.A_DIM, curses.A_REVERSE
        self._attrs = {NORMAL: 0, TITLE: bold, HEADER: bold, DIM: dim}
        self._attrs.update({WARN: bold, ALERT: bold | reverse, GOOD: 0})
        for i, style in enumerate(SLICE_STYLES):
            self._attrs[style] = bold if i % 2 == 0 else 0
        if not curses.has_colors():
            return
        curses.start_color()
        try:
            curses.use_default_colors()
            background = -1
        except curses.error:
            background = curses.COLOR_BLACK
        palette = {
            WARN: curses.COLOR_YELLOW,
            ALERT: curses.COLOR_RED,
            GOOD: curses.COLOR_GREEN,
            TITLE: curses.COLOR_CYAN,
        }
        slice_colors = (
            curses.COLOR_BLUE,
            curses.COLOR_MAGENTA,
            curses.COLOR_CYAN,
            curses.COLOR_GREEN,
            curses.COLOR_YELLOW,
            curses.COLOR_WHITE,
        )
        palette.update(zip(SLICE_STYLES, slice_colors, strict=True))
        for pair, (style, color) in enumerate(palette.items(), start=1):
            if pair >= curses.COLOR_PAIRS:
                break
            curses.init_pair(pair, color, background)
            extra = curses.A_BOLD if style in (ALERT, WARN, TITLE) else 0
            self._attrs[style] = curses.color_pair(pair) | extra

    def _main(self, screen: curses.window) -> None:
        import curses  # noqa: PLC0415

        self._setup(screen)
        snapshot = fetch(self._client)
        due = time.monotonic() + self._interval_s
        while True:
            self._paint(screen, snapshot)
            screen.timeout(max(10, int((due - time.monotonic()) * 1000)))
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                continue
            if key in (ord("r"), ord("R")) or time.monotonic() >= due:
                snapshot = fetch(self._client)
                due = time.monotonic() + self._interval_s
                continue
            self._scroll = _scrolled(self._scroll, key, screen.getmaxyx()[0] - 1)

    def _paint(self, screen: curses.window, snapshot: Snapshot) -> None:
        screen.erase()
        height, width = screen.getmaxyx()
        if height < MIN_HEIGHT or width < MIN_WIDTH:
            # Say so in short lines that fit even a tiny window; resizing redraws at once.
            words = ("terminal too small", f"{width}x{height}, need", f"{MIN_WIDTH}x{MIN_HEIGHT}")
            for y, text in enumerate((*words, "q quits")[:height]):
                self._put(screen, y, 0, text, ALERT if y < len(words) else DIM, width)
            screen.refresh()
            return
        lines = frame(snapshot, width - 1)
        body = height - 1
        self._scroll = max(0, min(self._scroll, len(lines) - body))
        for y, line in enumerate(lines[self._scroll : self._scroll + body]):
            x = 0
            for text, style in line.segments:
                if x >= width - 1:
                    break
                self._put(screen, y, x, text, style, width)
                x += len(text)
        more = f"  lines {self._scroll + 1}-{min(len(lines), self._scroll + body)}/{len(lines)}"
        footer = f"q quit  r refresh  up/down scroll  every {self._interval_s:g}s"
        footer += more if len(lines) > body else ""
        self._put(screen, height - 1, 0, footer, DIM, width)
        screen.refresh()

    def _put(
        self, screen: curses.window, y: int, x: int, text: str, style: str, width: int
    ) -> None:
        import curses  # noqa: PLC0415

        room = width - 1 - x
        if room <= 0:
            return
        with contextlib.suppress(curses.error):  # writing the screen's last cell "fails"
            screen.addnstr(y, x, text, room, self._attrs.get(style, 0))


def _scrolled(offset: int, key: int, page: int) -> int:
    import curses  # noqa: PLC0415

    moves = {
        curses.KEY_DOWN: 1,
        ord("j"): 1,
        curses.KEY_UP: -1,
        ord("k"): -1,
        curses.KEY_NPAGE: max(1, page - 1),
        ord(" "): max(1, page - 1),
        curses.KEY_PPAGE: -max(1, page - 1),
    }
    if key == curses.KEY_HOME:
        return 0
    return max(0, offset + moves.get(key, 0))
