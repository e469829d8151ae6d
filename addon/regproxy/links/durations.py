"""Durations for `--expires` and `link_max_age`, spelled as every duration of the configuration is (`90d`,
`12h`, `30m`, `45s`, or a YAML integer of seconds: limits/settings.py reads them), at least one second."""

from __future__ import annotations

from ..limits.settings import LimitsError
from ..limits.settings import parse_duration as parse_setting


class DurationError(ValueError):
    """Not a duration of at least one second; the message names where and what one looks like."""


def parse_duration(value: object, where: str) -> int:
    """Seconds, from `90d`, `12h`, `30m`, `45s` or an integer (also as digits: a command line's `3600`).
    Raises DurationError naming `where`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    try:
        seconds = parse_setting(value, where)
    except LimitsError as e:
        raise DurationError(str(e)) from None
    if seconds < 1:
        raise DurationError(f"{where}: must be at least 1s")
    return seconds


def format_duration(seconds: int) -> str:
    """The duration in its largest whole unit (`90d`, `36h`, `90m`, `45s`), as parse_duration reads it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
