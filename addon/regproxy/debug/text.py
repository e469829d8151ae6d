"""Values of OCI documents on one line, as the OCI view shows them: sizes as people read them, digests
shortened, any value clipped to one line, lists cut with a count of the rest, rows as aligned columns.

Pure and total: every function takes whatever a hostile document holds and returns text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

MAX_ENTRIES = 200  # platforms, layers, env names, history steps, annotations listed; the rest counted
MAX_VALUE = 160  # characters of one value (a command, an annotation) shown
DIGEST_HEX = 12  # hex digits of a shortened digest, as `docker images` shows them


def human_size(n: object) -> str:
    """A byte count as people read it (`512 B`, `1.5 KiB`, `3.2 GiB`); `?` for anything but a count."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return "?"
    if n < 1024:
        return f"{n} B"
    if n >= 1 << 50:
        return "over 1024 TiB"  # and no float overflow for absurd counts
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def short_digest(digest: object) -> str:
    """`sha256:` and the first 12 hex digits; `?` for a missing or malformed digest."""
    if not isinstance(digest, str) or ":" not in digest:
        return "?"
    algorithm, _, encoded = digest.partition(":")
    if not algorithm or not encoded:
        return "?"
    return clip(f"{algorithm}:{encoded[:DIGEST_HEX]}")


def table(rows: list[Sequence[str]]) -> list[str]:
    """Rows as aligned columns (the last one ragged), two spaces in."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip() for r in rows]


def more(total: int) -> list[str]:
    return [f"  … and {total - MAX_ENTRIES} more"] if total > MAX_ENTRIES else []


def joined(names: Sequence[str], total: int) -> str:
    """The first MAX_ENTRIES names, clipped, comma-separated, with how many of `total` were left out."""
    rest = f", … {total - MAX_ENTRIES} more" if total > MAX_ENTRIES else ""
    return ", ".join(clip(n) for n in names[:MAX_ENTRIES]) + rest


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def as_list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


def as_dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def one_line(v: object) -> str:
    """A value on one line: strings as they are, anything else as JSON; cut at MAX_VALUE."""
    if v is None:
        return "-"
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)[: MAX_VALUE + 1]
    return clip(s)


def clip(s: str, limit: int = MAX_VALUE) -> str:
    s = " ".join(s[: limit * 4].split())  # one line: no newlines or tabs from the document
    return s if len(s) <= limit else s[: limit - 1] + "…"
