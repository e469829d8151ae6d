"""Durations as operators write them: `90d`, `14d`, `12h`, `1h30m`, `45s`, `2w` (or a number of seconds)."""

from __future__ import annotations

import re

UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"(?:\d{1,9}[wdhms])+")
_PART_RE = re.compile(r"(\d+)([wdhms])")


class DurationError(ValueError):
    """Not a duration; the message says what one looks like."""


def parse_duration(value: object) -> int:
    """Seconds, from an integer or a text such as `90d` or `1h30m`; at least one second."""
    if isinstance(value, bool):
        raise DurationError("must be a duration such as 90d, 12h, 1h30m or 45s")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip().lower()):
        seconds = sum(int(n) * UNITS[u] for n, u in _PART_RE.findall(value.strip().lower()))
    else:
        raise DurationError("must be a duration such as 90d, 12h, 1h30m or 45s")
    if seconds < 1:
        raise DurationError("must be at least one second")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest spelling `parse_duration` reads back as `seconds` (`90d`, `1h30m`, `45s`)."""
    parts = []
    for unit, size in UNITS.items():
        if unit == "w":
            continue
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"
