"""Limits configuration: the `limits:`, `redis_url` and `trusted_proxies` keys, validated strictly.

```yaml
limits:                          # top level: the defaults of every mapping
  client_requests: 600/10m       # per client: a token bucket refilled at 600 per 10 minutes...
  client_burst: 100              # ...holding at most 100 (default: the rate's count)
  manifest_gets: 100/6h          # per mapping: manifest GETs per window (the upstream-quota guard)
  count_heads: false             # also count manifest HEADs (Docker Hub does not)
  mapping_bytes: 50GiB/1d        # per mapping: bytes sent per window (the bandwidth circuit breaker)
  client_bytes: 5GiB/1h          # per client: the same
  client_transfers: 4            # per client: blob transfers at once
  on_store_failure: open         # top level only: open (serve unlimited) or closed (503) when Redis fails
redis_url: redis://127.0.0.1:6379/0   # shared state for replicas and --workers (default: in memory)
trusted_proxies: [127.0.0.1, 10.0.0.0/8]   # front ends whose X-Forwarded-For / Forwarded is believed
proxies:
  "bp/":
    limits: {manifest_gets: 20/1h, client_bytes: unlimited}   # only the keys named are overridden
```

Absent means unlimited. Windows are fixed, aligned on the Unix epoch (see limits/buckets.py). Errors
are `LimitsError` with one line naming the key; config/load.py turns them into its `ConfigError`.
Nothing here imports mitmproxy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FailMode = Literal["open", "closed"]

UNLIMITED = "unlimited"
MAX_WINDOW = 366 * 24 * 3600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_RATE_RE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z]*)\s*/\s*(?P<w>[0-9]*)\s*(?P<wu>[smhd]?)")


class LimitsError(ValueError):
    """A limits setting that is not valid, as one line naming the key."""


@dataclass(frozen=True)
class Rate:
    """`amount` per `window` seconds."""

    amount: int
    window: int

    @property
    def per_second(self) -> float:
        return self.amount / self.window


@dataclass(frozen=True)
class Rules:
    """The limits of one mapping (or the top-level defaults); None means unlimited.

    `given` names the keys a mapping's `limits:` set itself: only those override the defaults.
    """

    client_requests: Rate | None = None
    client_burst: int | None = None
    manifest_gets: Rate | None = None
    count_heads: bool = False
    mapping_bytes: Rate | None = None
    client_bytes: Rate | None = None
    client_transfers: int | None = None
    given: frozenset[str] = frozenset()

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.client_requests,
                self.manifest_gets,
                self.mapping_bytes,
                self.client_bytes,
                self.client_transfers,
            )
        )

    @property
    def per_client(self) -> bool:
        """Whether a limit counts per client (so the client must be told apart)."""
        return self.client_requests is not None or self.client_bytes is not None or self.client_transfers is not None

    @property
    def burst(self) -> int:
        """The bucket's size: `client_burst`, else one window's worth of `client_requests`."""
        if self.client_burst is not None:
            return self.client_burst
        return self.client_requests.amount if self.client_requests is not None else 0

    def over(self, mapping: Rules | None) -> Rules:
        """These defaults with a mapping's own keys in their place."""
        if mapping is None or not mapping.given:
            return self
        return dataclasses.replace(self, **{k: getattr(mapping, k) for k in mapping.given}, given=frozenset())


@dataclass(frozen=True)
class LimitSettings:
    """The top level: default rules, where the counts live and whose forwarding headers are believed."""

    defaults: Rules = field(default_factory=Rules)
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    trusted_proxies: tuple[Network, ...] = ()
    on_store_failure: FailMode = "open"


RULE_KEYS = (
    "client_requests",
    "client_burst",
    "manifest_gets",
    "count_heads",
    "mapping_bytes",
    "client_bytes",
    "client_transfers",
)
TOP_ONLY_KEYS = ("on_store_failure",)


def parse_settings(data: dict[str, Any]) -> LimitSettings:
    """The top-level `limits`, `redis_url` and `trusted_proxies` keys of the configuration."""
    raw = data.get("limits")
    defaults = Rules() if raw is None else parse_limits(raw, "limits", top=True)
    fail: FailMode = "open"
    if isinstance(raw, dict) and "on_store_failure" in raw:
        value = raw["on_store_failure"]
        if value not in ("open", "closed"):
            raise LimitsError("limits.on_store_failure: must be open (serve without limits) or closed (answer 503)")
        fail = "open" if value == "open" else "closed"
    return LimitSettings(
        defaults=dataclasses.replace(defaults, given=frozenset()),
        redis_url=_redis_url(data.get("redis_url")),
        trusted_proxies=_networks(data.get("trusted_proxies")),
        on_store_failure=fail,
    )


def parse_limits(raw: object, where: str, *, top: bool = False) -> Rules:
    """A `limits:` block (top level or a mapping's). `where` is its key path, e.g. `proxies.bp/.limits`."""
    if raw is None:
        return Rules()
    if not isinstance(raw, dict):
        raise LimitsError(f"{where}: must be a mapping of limits (known: {', '.join(RULE_KEYS)})")
    known = RULE_KEYS + (TOP_ONLY_KEYS if top else ())
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            extra = " (a top-level setting)" if key in TOP_ONLY_KEYS else ""
            raise LimitsError(f"{where}.{str(key)[:40]}: unknown key{extra} (known: {', '.join(known)})")
        if key in TOP_ONLY_KEYS:
            continue
        k = f"{where}.{key}"
        if key == "count_heads":
            if not isinstance(value, bool):
                raise LimitsError(f"{k}: must be true or false")
            values[key] = value
        elif key in ("client_burst", "client_transfers"):
            values[key] = _count(value, k)
        else:
            values[key] = parse_rate(value, k, size=key.endswith("_bytes"))
    rules = Rules(**values, given=frozenset(values))
    if rules.client_burst is not None and rules.client_requests is None and top:
        raise LimitsError(f"{where}.client_burst: needs client_requests (the rate that refills the bucket)")
    return rules


def parse_rate(value: object, where: str, *, size: bool = False) -> Rate | None:
    """`COUNT/WINDOW` (`100/6h`, `20/90s`, `5/m`), or for bytes `SIZE/WINDOW` (`5GiB/1h`, `500MB/1d`);
    `unlimited` (or null) for none."""
    if value is None or value == UNLIMITED:
        return None
    example = "5GiB/1h" if size else "100/6h"
    if not isinstance(value, str):
        raise LimitsError(f"{where}: must be written AMOUNT/WINDOW such as {example}, or {UNLIMITED}")
    m = _RATE_RE.fullmatch(value.strip().lower())
    if m is None:
        raise LimitsError(f"{where}: must be written AMOUNT/WINDOW such as {example} (window units s, m, h, d)")
    unit = m["unit"]
    if unit not in (_BYTE_UNITS if size else ("",)):
        what = "a size unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)" if size else "a whole number of requests"
        raise LimitsError(f"{where}: {m['n']}{unit} is not {what}")
    amount_f = float(m["n"]) * _BYTE_UNITS[unit]
    if "." in m["n"] and (not size or not unit):
        raise LimitsError(f"{where}: the amount must be a whole number")
    amount = int(amount_f)
    window = int(m["w"] or "1") * _UNITS[m["wu"] or "s"]
    if amount < 1 or amount > 1 << 60:
        raise LimitsError(f"{where}: the amount must be at least 1 (write {UNLIMITED} for no limit)")
    if not 1 <= window <= MAX_WINDOW:
        raise LimitsError(f"{where}: the window must be from 1s to 366d")
    return Rate(amount, window)


_SIZE_RE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z]*)")
_DURATION_RE = re.compile(r"(?P<n>[0-9]+)\s*(?P<unit>[smhd])")


def parse_size(value: object, where: str) -> int:
    """A size in bytes, written as `rate` amounts are: `50GB`, `500MiB`, `1.5GiB`, `1000` (bytes; a YAML
    integer is bytes too). Units B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (of 1024), any case.
    Raises LimitsError naming `where`."""
    if isinstance(value, int) and not isinstance(value, bool):
        amount = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip().lower())
        if m is None or m["unit"] not in _BYTE_UNITS:
            raise LimitsError(f"{where}: must be a size such as 50GB or 500MiB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        amount = int(float(m["n"]) * _BYTE_UNITS[m["unit"]])
    else:
        raise LimitsError(f"{where}: must be a size such as 50GB or 500MiB")
    if not 0 <= amount <= 1 << 60:
        raise LimitsError(f"{where}: must be a size from 0 to 1EiB")
    return amount


def parse_duration(value: object, where: str) -> int:
    """A duration in seconds, written as rate windows are: `0s`, `90s`, `5m`, `6h`, `7d` (a YAML integer is
    seconds). Raises LimitsError naming `where`."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip().lower())
        if m is None:
            raise LimitsError(f"{where}: must be a duration such as 0s, 90s, 5m, 6h or 7d")
        seconds = int(m["n"]) * _UNITS[m["unit"]]
    else:
        raise LimitsError(f"{where}: must be a duration such as 0s, 90s, 5m, 6h or 7d")
    if not 0 <= seconds <= 100 * 366 * 86400:
        raise LimitsError(f"{where}: must be a duration from 0s to 36600d")
    return seconds


def _count(value: object, where: str) -> int | None:
    if value is None or value == UNLIMITED:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise LimitsError(f"{where}: must be a whole number from 1 to 1000000, or {UNLIMITED}")
    return value


def _redis_url(value: object) -> str | None:
    """`redis://[[user]:password@]host[:port][/db]`, `rediss://…` or `unix:///path`. Never echoed back."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\r\n\0 "):
        raise LimitsError("redis_url: must be a URL such as redis://127.0.0.1:6379/0")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise LimitsError("redis_url: the scheme must be redis, rediss or unix")
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise LimitsError("redis_url: a unix URL needs an absolute socket path (unix:///run/redis.sock)")
        return value.strip()
    try:
        _ = parts.port
    except ValueError:
        raise LimitsError("redis_url: has an invalid port") from None
    if not parts.hostname:
        raise LimitsError("redis_url: names no host")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) < 10_000):
        raise LimitsError("redis_url: the path must be a database number (/0)")
    return value.strip()


def _networks(value: object) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LimitsError("trusted_proxies: must be a list of addresses or networks such as [10.0.0.0/8, 127.0.0.1]")
    nets: list[Network] = []
    for v in value:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=True))
        except ValueError:
            raise LimitsError(f"trusted_proxies: {v[:60]!r} is not an IP address or network (host bits set?)") from None
    return tuple(nets)


_WHAT = {
    "client_requests": "requests per client",
    "manifest_gets": "manifest requests for this repository's mapping",
    "mapping_bytes": "bytes for this repository's mapping",
    "client_bytes": "bytes per client",
    "client_transfers": "blob transfers at once per client",
}


def refusal_message(name: str, rules: Rules) -> str:
    """The limit for a client: its name and size, nothing about who else uses it."""
    rate: Rate | None = getattr(rules, name, None) if name != "client_transfers" else None
    if name == "client_requests" and rate is not None:
        size = f"{rate.amount} per {format_duration(rate.window)}, bursts of {rules.burst}"
    elif rate is not None:
        amount = _bytes(rate.amount) if name.endswith("_bytes") else str(rate.amount)
        size = f"{amount} per {format_duration(rate.window)}"
    else:
        size = str(rules.client_transfers)
    return f"limit {name} reached ({size} {_WHAT.get(name, '')})".replace("  ", " ")


def format_duration(seconds: int) -> str:
    """A duration in its largest whole unit (`90d`, `36h`, `90m`, `45s`, `0s`), as parse_duration reads it."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def _bytes(n: int) -> str:
    """A byte count as the config would spell it: the largest unit that divides it, else bytes."""
    for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "KB"):
        size = _BYTE_UNITS[unit.lower()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
