"""The store's interface: content by digest and small records, in a directory or an S3 bucket.

Keys are the relative paths `keys` makes (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`,
`links/...`, `tags/...`). Every write is atomic: a reader sees the whole object or none (a rename in a
directory, a completed upload in S3). A store raises `StoreError` (never an OS or botocore exception)
for anything but a missing key, which reads as None.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    """The store failed (I/O, S3). The message is safe to log: no credentials, no signed URL."""


def check_key(key: str) -> None:
    """A key is a relative path of non-empty segments, none `.`-led (so not `..`, nor the directory store's
    `.tmp` and `.spool`), without backslashes or NULs. Raises StoreError."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key:
        raise StoreError("store: not a valid key")
    for segment in key.split("/"):
        if not segment or segment.startswith("."):
            raise StoreError("store: not a valid key")


@dataclass(frozen=True)
class Entry:
    """One object found by `Store.entries`: its key, size in bytes and last use (or write), epoch seconds."""

    key: str
    size: int
    used: float


class Store(Protocol):
    """What the cache asks of a store."""

    async def start(self) -> None:
        """Ready the store (create the directory, check the bucket). Raises StoreError."""

    async def aclose(self) -> None:
        """Release clients and connections."""

    async def get_small(self, key: str) -> bytes | None:
        """A small object (a manifest, a link or tag record), whole; None if absent."""

    async def put_small(self, key: str, data: bytes) -> None:
        """Write a small object atomically, replacing any old one."""

    async def size(self, key: str) -> int | None:
        """The object's size, None if absent (a HEAD)."""

    async def put_file(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key` atomically (the file may be moved or copied; the caller
        deletes `path` afterwards if it still exists). Large files go up in parts."""

    def local_path(self, key: str) -> Path | None:
        """The object's file, for a store in a directory (served with sendfile); None for S3."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes [start, end) of an object (end None: to its end), streamed in chunks: an async generator
        (`async for chunk in store.read(key)`), like `entries`. Raises StoreError (when iterated) if the
        object is absent or the read fails."""

    async def presign(self, key: str, expires: int) -> str | None:
        """A presigned GET URL valid `expires` seconds (S3 only; None for a directory)."""

    async def delete(self, key: str) -> None:
        """Delete the object; absent is fine."""

    def entries(self, prefix: str) -> AsyncIterator[Entry]:
        """Every object whose key starts with `prefix` (for rebuilding the index at start)."""

    async def touch(self, key: str) -> None:
        """Note a use of the object where the store can keep it (a directory: its mtime); may do nothing."""
