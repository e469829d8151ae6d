"""The cache as the proxy's step asks it: lookups by link, records, and the blob server's tickets.

One `CacheService` is opened per `cache:` section (a reload that changes the section opens another and
closes the old one once it is no longer used): its store (a directory or S3), the index that evicts
beyond `max_size`, the fills and the local blob server. Every lookup checks the link first, then the
content: a mapping that never saw a digest in that upstream repository gets None as fast as a digest
nobody stored (the content is not even looked at), so neither the answer nor its timing tells it what
the cache holds. A store that fails reads as a miss (counted by the observer), never as an error to the
client: the request goes upstream as if there were no cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import keys
from .fill import BlobJob, FillObserver, Fills
from .index import Index
from .keys import Link, TagRecord
from .settings import CacheSettings
from .store import Store, StoreError
from .store_fs import FsStore

if TYPE_CHECKING:
    from .blobserver import BlobServer

logger = logging.getLogger("registryproxy")

MAX_MANIFEST = 4 * 1024 * 1024  # the distribution spec's limit; larger manifests are not cached


class CacheObserver(FillObserver, Protocol):
    """What the service reports beyond fills (metrics)."""

    def store_failed(self) -> None: ...

    def evicted(self, key: str, size: int) -> None: ...


@dataclass(frozen=True)
class CachedManifest:
    media_type: str
    body: bytes


class CacheService:
    def __init__(
        self,
        settings: CacheSettings,
        store: Store,
        index: Index,
        fills: Fills,
        server: BlobServer,
        observer: CacheObserver | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.fills = fills
        self.server = server
        self.port = 0
        self._observer = observer

    @classmethod
    async def open(cls, settings: CacheSettings, spool_dir: Path, observer: CacheObserver | None) -> CacheService:
        """Start the store, rebuild the index from it and start the blob server. Raises StoreError."""
        # The S3 client and the blob server's aiohttp load only with a cache (about 25 MB of resident memory).
        from .blobserver import BlobServer
        from .store_s3 import S3Store

        store: Store
        if settings.s3 is not None:
            store = S3Store(settings.s3)
        else:
            assert settings.path is not None
            store = FsStore(settings.path)
            spool_dir = store.spool_dir()
        await store.start()
        on_evict = observer.evicted if observer is not None else None
        index = Index(store, settings.max_size, on_evict)
        try:
            await index.rebuild()
            fills = Fills(store, index, spool_dir, observer)
            server = BlobServer(store, index, fills)
            service = cls(settings, store, index, fills, server, observer)
            service.port = await server.start()
        except BaseException:
            await index.aclose()
            await store.aclose()
            raise
        logger.info(
            "registryproxy: cache open on %s (%d bytes held, max_size %d)",
            _where(settings),
            index.total,
            settings.max_size,
        )
        return service

    async def aclose(self, grace: float = 0.0) -> None:
        """Close the store and the blob server; with `grace` (a reload replaced this service), once the blob
        transfers it is serving have ended (at most `grace` seconds)."""
        await self.server.aclose(grace)
        await self.fills.aclose()
        await self.index.aclose()
        await self.store.aclose()

    def reconfigure(self, settings: CacheSettings) -> None:
        """A reload changed what can change without a new store (sizes and times)."""
        self.settings = settings
        self.index.set_max_size(settings.max_size)

    # --- lookups ----------------------------------------------------------------

    async def link(self, link: str, hex_digest: str) -> Link | None:
        data = await self._get(keys.link_key(link, hex_digest))
        return Link.load(data) if data is not None else None

    async def manifest(self, link: str, hex_digest: str) -> CachedManifest | None:
        """The manifest, if this link has seen it and the store still has it."""
        found = await self.link(link, hex_digest)
        if found is None or found.kind != "manifest":
            return None
        key = keys.manifest_key(hex_digest)
        body = await self._get(key)
        if body is None or keys.sha256_hex(body) != hex_digest:
            return None
        if self.index.size_of(key) is None:
            self.index.added(key, len(body))
        self.index.used(key)
        return CachedManifest(found.media_type, body)

    async def blob(self, link: str, hex_digest: str) -> Link | None:
        """The blob's link, if this link has seen it and the store still has it."""
        found = await self.link(link, hex_digest)
        if found is None or found.kind != "blob":
            return None
        try:
            size = await self.index.lookup(keys.blob_key(hex_digest))
        except StoreError as e:
            self._failed(e)
            return None
        return found if size is not None and size == found.size else None

    async def tag(self, link: str, tag: str) -> TagRecord | None:
        try:
            key = keys.tag_key(link, tag)
        except ValueError:
            return None
        data = await self._get(key)
        return TagRecord.load(data) if data is not None else None

    # --- records ----------------------------------------------------------------

    async def put_tag(self, link: str, tag: str, record: TagRecord) -> None:
        try:
            await self.store.put_small(keys.tag_key(link, tag), record.dump())
        except (StoreError, ValueError) as e:
            self._failed(e)

    async def put_manifest(self, link: str, hex_digest: str, media_type: str, body: bytes) -> bool:
        """Store a manifest whose bytes hash to `hex_digest` and link it; False if the store failed."""
        if keys.sha256_hex(body) != hex_digest or len(body) > MAX_MANIFEST:
            return False
        key = keys.manifest_key(hex_digest)
        try:
            if self.index.size_of(key) is None:
                await self.store.put_small(key, body)
                self.index.added(key, len(body))
            await self.store.put_small(keys.link_key(link, hex_digest), Link("manifest", media_type, len(body)).dump())
        except StoreError as e:
            self._failed(e)
            return False
        return True

    async def presign_blob(self, hex_digest: str) -> str | None:
        s3 = self.settings.s3
        if s3 is None or not s3.redirect:
            return None
        try:
            url = await self.store.presign(keys.blob_key(hex_digest), s3.url_expiry)
        except StoreError as e:
            self._failed(e)
            return None
        if url is not None:
            self.index.used(keys.blob_key(hex_digest))
        return url

    def ticket(self, job: BlobJob) -> str:
        return self.server.ticket(job)

    # --- helpers ----------------------------------------------------------------

    async def _get(self, key: str) -> bytes | None:
        try:
            return await self.store.get_small(key)
        except StoreError as e:
            self._failed(e)
            return None

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        if now - _last_failure_log[0] > 60:
            _last_failure_log[0] = now
            logger.warning("registryproxy: cache store failed (%s); serving as if uncached", e)
        if self._observer is not None:
            self._observer.store_failed()


_last_failure_log = [-1e9]


def _where(settings: CacheSettings) -> str:
    if settings.s3 is not None:
        return f"s3://{settings.s3.bucket}/{settings.s3.prefix}"
    return str(settings.path)


OnDone = Callable[[str, int], None]
