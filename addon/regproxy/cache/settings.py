"""The `cache:` section of the configuration, and a mapping's `cache: false`.

Parsed strictly, like `limits:`: any problem raises `CacheSettingsError` with one line naming the key
(`cache.max_size: ...`), never a secret's value. Sizes and durations are written as in `limits:`
(`limits.settings.parse_size`, `parse_duration`).

```yaml
cache:
  store: /var/cache/registryproxy   # a directory (relative: to the config file's), or s3://BUCKET/PREFIX
  max_size: 50GB                    # at least 1MB
  tag_ttl: 0s
  stale_if_error: 7d                # 0s: never answer a tag from the cache when the upstream fails
  s3:                               # only with an s3:// store
    endpoint_url: https://s3.example.com
    region: us-east-1
    access_key_id_env: CACHE_S3_KEY_ID   # both or neither; neither: botocore's own credential chain
    secret_access_key_env: CACHE_S3_SECRET
    redirect: false
    url_expiry: 10m                 # 1s to 7d (SigV4's longest)
```

A mapping's `cache:` (true or false, default true) is read by config/mappings.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..limits.settings import LimitsError, format_duration, parse_duration, parse_size


class CacheSettingsError(ValueError):
    """A problem in the `cache:` section, as one line naming the key."""


@dataclass(frozen=True)
class S3Settings:
    """`cache.store: s3://BUCKET/PREFIX` and `cache.s3`."""

    bucket: str
    prefix: str  # "" or ends with "/"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    redirect: bool = False
    url_expiry: int = 600  # seconds


@dataclass(frozen=True)
class CacheSettings:
    """What the cache is told. Exactly one of `path` (a directory store) and `s3` is set."""

    store: str  # as written, for messages and for telling whether a reload changed the store
    path: Path | None = None
    s3: S3Settings | None = None
    max_size: int = 50 * 1000**3  # bytes
    tag_ttl: float = 0.0  # seconds
    stale_if_error: float = 7 * 86400.0  # seconds


CACHE_KEYS = ("store", "max_size", "tag_ttl", "stale_if_error", "s3")
S3_KEYS = ("endpoint_url", "region", "access_key_id_env", "secret_access_key_env", "redirect", "url_expiry")
MIN_SIZE = 1000**2  # 1MB
MAX_TTL = 366 * 86400
MAX_URL_EXPIRY = 7 * 86400  # SigV4 presigned URLs live at most 7 days
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
SHOWN_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*_[A-Z0-9_]*|[A-Z_][A-Z0-9_]{0,15}")  # shown in messages
REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9!_.*'()-]+")


def parse_cache(raw: object, environ: Mapping[str, str], base_dir: Path | None) -> CacheSettings | None:
    """The top-level `cache:` key (None or absent: no cache). `environ` gives the S3 credentials named by
    `*_env`; a relative directory `store` is relative to `base_dir` (the config file's directory)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CacheSettingsError(f"cache: must be a mapping with at least store (known: {', '.join(CACHE_KEYS)})")
    _known(raw, "cache", CACHE_KEYS)
    if "store" not in raw:
        raise CacheSettingsError("cache.store: missing (a directory, or s3://BUCKET/PREFIX)")
    store = raw["store"]
    if not isinstance(store, str) or not store.strip() or any(c in store for c in "\r\n\0"):
        raise CacheSettingsError("cache.store: must be a directory path or s3://BUCKET/PREFIX")
    store = store.strip()
    path: Path | None = None
    s3: S3Settings | None = None
    if store.lower().startswith("s3://"):
        bucket, prefix = _s3_url(store)
        s3 = _s3(raw.get("s3"), bucket, prefix, environ)
    elif "://" in store:
        raise CacheSettingsError("cache.store: only s3:// URLs are stores; anything else is a directory path")
    else:
        if "s3" in raw:
            raise CacheSettingsError("cache.s3: only with an s3:// store (cache.store is a directory)")
        path = Path(store).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
    max_size = _size(raw, "max_size", 50 * 1000**3)
    if max_size < MIN_SIZE:
        raise CacheSettingsError("cache.max_size: must be at least 1MB")
    return CacheSettings(
        store=store,
        path=path,
        s3=s3,
        max_size=max_size,
        tag_ttl=float(_duration(raw, "cache.tag_ttl", "tag_ttl", 0, 0, MAX_TTL)),
        stale_if_error=float(_duration(raw, "cache.stale_if_error", "stale_if_error", 7 * 86400, 0, MAX_TTL)),
    )


def _known(raw: dict[object, object], where: str, known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            raise CacheSettingsError(f"{where}.{str(key)[:40]}: unknown key (known: {', '.join(known)})")


def _size(raw: dict[object, object], key: str, default: int) -> int:
    if key not in raw:
        return default
    try:
        return parse_size(raw[key], f"cache.{key}")
    except LimitsError as e:
        raise CacheSettingsError(str(e)) from None


def _duration(raw: dict[object, object], where: str, key: str, default: int, low: int, high: int) -> int:
    if key not in raw:
        return default
    try:
        seconds = parse_duration(raw[key], where)
    except LimitsError as e:
        raise CacheSettingsError(str(e)) from None
    if not low <= seconds <= high:
        raise CacheSettingsError(f"{where}: must be from {format_duration(low)} to {format_duration(high)}")
    return seconds


def _s3_url(store: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX`: the bucket, checked against S3's naming rules, and the prefix ("" or ending in /)."""
    rest = store[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise CacheSettingsError("cache.store: names no bucket (s3://BUCKET/PREFIX)")
    if (
        not BUCKET_RE.fullmatch(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or bucket.startswith(("xn--", "sthree-"))
        or bucket.endswith(("-s3alias", "--ol-s3"))
        or _is_ip(bucket)
    ):
        raise CacheSettingsError(
            f"cache.store: {bucket[:63]!r} is not an S3 bucket name (3 to 63 lower-case letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit, not an IP address)"
        )
    segments = [s for s in prefix.split("/")]
    if segments and segments[-1] == "":
        segments.pop()  # the prefix's trailing slash
    for segment in segments:
        if not PREFIX_SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
            raise CacheSettingsError(
                "cache.store: the prefix must be segments of letters, digits and !_.*'()- joined by single /"
            )
    norm = "/".join(segments)
    if len(norm) > 512:
        raise CacheSettingsError("cache.store: the prefix is longer than 512 characters")
    return bucket, f"{norm}/" if norm else ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _s3(raw: object, bucket: str, prefix: str, environ: Mapping[str, str]) -> S3Settings:
    if raw is None:
        return S3Settings(bucket=bucket, prefix=prefix)
    if not isinstance(raw, dict):
        raise CacheSettingsError(f"cache.s3: must be a mapping (known: {', '.join(S3_KEYS)})")
    _known(raw, "cache.s3", S3_KEYS)
    endpoint = _endpoint(raw.get("endpoint_url"))
    region = raw.get("region")
    if region is not None and (not isinstance(region, str) or not REGION_RE.fullmatch(region.strip())):
        raise CacheSettingsError("cache.s3.region: must be a region name such as us-east-1")
    given = [k for k in ("access_key_id_env", "secret_access_key_env") if raw.get(k) is not None]
    if len(given) == 1:
        other = "secret_access_key_env" if given[0] == "access_key_id_env" else "access_key_id_env"
        raise CacheSettingsError(f"cache.s3.{given[0]}: needs {other} too (both or neither)")
    key_id = _env(raw, "access_key_id_env", environ) if given else None
    secret = _env(raw, "secret_access_key_env", environ) if given else None
    redirect = raw.get("redirect", False)
    if not isinstance(redirect, bool):
        raise CacheSettingsError("cache.s3.redirect: must be true or false")
    expiry = _duration(raw, "cache.s3.url_expiry", "url_expiry", 600, 1, MAX_URL_EXPIRY)
    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region=region.strip() if isinstance(region, str) else None,
        access_key_id=key_id,
        secret_access_key=secret,
        redirect=redirect,
        url_expiry=expiry,
    )


def _endpoint(value: object) -> str | None:
    if value is None:
        return None
    where = "cache.s3.endpoint_url"
    if not isinstance(value, str) or any(c in value for c in "\r\n\0 "):
        raise CacheSettingsError(f"{where}: must be an http(s) URL such as https://s3.example.com")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise CacheSettingsError(f"{where}: must be an http(s) URL such as https://s3.example.com")
    if parts.username or parts.password:
        raise CacheSettingsError(f"{where}: must not hold credentials (use access_key_id_env, secret_access_key_env)")
    try:
        _ = parts.port
    except ValueError:
        raise CacheSettingsError(f"{where}: has an invalid port") from None
    return value.strip().rstrip("/")


def _env(raw: dict[object, object], key: str, environ: Mapping[str, str]) -> str:
    name = raw[key]
    where = f"cache.s3.{key}"
    if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name.strip()):
        raise CacheSettingsError(f"{where}: must name an environment variable (letters, digits and _)")
    name = name.strip()
    value = environ.get(name, "")
    if not value:
        if not SHOWN_NAME_RE.fullmatch(name):
            # Not spelt like a variable's name (upper case, with _ or short): maybe a key pasted in its place.
            raise CacheSettingsError(
                f"{where}: the environment variable it names is not set or empty (the name is not shown: "
                "it looks like a key rather than a variable's name)"
            )
        raise CacheSettingsError(f"{where}: environment variable {name} is not set or empty")
    return value
