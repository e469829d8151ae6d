"""Durations for `--expires` and `link_max_age`, spelled as every duration of the configuration is (`90d`,
`12h`, `30m`, `45s`, or a YAML integer of seconds: limits/settings.py reads and writes them), at least one
second."""

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
