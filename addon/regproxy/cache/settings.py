"""The `cache:` section of the configuration, and a mapping's `cache: false`.

Parsed strictly, like `limits:`: any problem raises `CacheSettingsError` with one line naming the key
(`cache.max_size: ...`), never a secret's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
