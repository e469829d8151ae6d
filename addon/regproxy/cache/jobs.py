"""What a blob request is to the cache: the job a ticket stands for, how its upstream is opened, and how a
fill answers and fails. Shared by the fill (cache/fill.py), the spool writer (cache/spool.py), the blob
server (cache/blobserver.py) and the step that plans (steps/cache.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

OpenUpstream = Callable[[], contextlib.AbstractAsyncContextManager[httpx.Response]]
"""Opens the streaming GET of the blob upstream (auth and redirects are the caller's business). It may
raise FillError itself (its reason is then used as it is); httpx errors and timeouts are mapped to 502/504."""


@dataclass(frozen=True)
class BlobJob:
    """What a ticket stands for: the blob, the link id it is reached through, whether the proxy found it
    cached, how to fetch it upstream, and who is told the outcome ("hit" or "fill") and the bytes sent."""

    hex: str
    link: str
    hit: bool
    open_upstream: OpenUpstream
    on_done: Callable[[str, int], None] | None = None


class FillError(Exception):
    """The fill failed: `reason` is safe to log and to show (no header value, no URL); `status` is what the
    proxy answers when no byte was sent yet (502 the upstream failed, 504 it timed out)."""

    def __init__(self, reason: str, status: int = 502, *, kind: str = "upstream_error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.kind = kind  # the observer's word: upstream_error, digest_mismatch, size_mismatch, store_error, cancelled


@dataclass(frozen=True)
class FillStart:
    """The upstream's answer: its status, the blob's announced size (200 only; None if not announced) and
    the headers the proxy passes on (WWW-Authenticate, Retry-After), lower-case names."""

    status: int
    size: int | None
    headers: dict[str, str] = field(default_factory=dict)


class FillObserver(Protocol):
    """Metrics of fills. `reason` is one fixed word: digest_mismatch, size_mismatch, upstream_error (a
    non-200 answer, a failed connection, a timeout), store_error, cancelled."""

    def fill_started(self, hex_digest: str) -> None: ...

    def fill_done(self, hex_digest: str, size: int) -> None: ...

    def fill_failed(self, hex_digest: str, reason: str) -> None: ...
