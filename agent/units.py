"""Parsing of user-facing sizes, percentages and durations (CLI and config share it).

Kept free of third-party imports so that ``xpuctl`` starts fast.
"""

from __future__ import annotations

import re

SIZE_FORMS = "a MiB integer or a size such as 512MiB, 8GiB, 8G, 1TiB"
COMPUTE_FORMS = "a percentage 1-100 such as 30 or 30%"
DURATION_FORMS = "seconds or a duration such as 90s, 10m, 1h, 2d"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_MIB_PER_UNIT = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size_mib(text: str | int) -> int:
    """``"8GiB"`` → 8192. A bare number is MiB. Decimal suffixes are read as binary, as
    ``nvidia-smi`` and ``npu-smi`` users expect ("8G" on a card means GiB)."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"must be positive, got {text}")
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not {SIZE_FORMS}")
    number, unit, _ = match.groups()
    mib = float(number) * _MIB_PER_UNIT[unit.lower()]
    if mib < 1:
        raise ValueError(f"{text!r} is smaller than 1 MiB")
    return round(mib)


def parse_compute_pct(text: str | int) -> int:
    if isinstance(text, int):
        value = text
    else:
        stripped = text.strip().removesuffix("%").strip()
        if not stripped.isdigit():
            raise ValueError(f"{text!r} is not {COMPUTE_FORMS}")
        value = int(stripped)
    if not 1 <= value <= 100:
        raise ValueError(f"{value} is not {COMPUTE_FORMS}")
    return value


def parse_duration_s(text: str | float) -> float:
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"must be positive, got {text}")
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not {DURATION_FORMS}")
    number, unit = match.groups()
    seconds = float(number) * _SECONDS_PER_UNIT[unit.lower()]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be positive")
    return seconds


def format_mib(mib: float | None) -> str:
    if mib is None:
        return "-"
    if mib >= 1024:
        return f"{mib / 1024:.1f}GiB"
    return f"{mib:.0f}MiB"
