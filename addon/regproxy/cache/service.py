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

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import keys
from .fill import Fills
from .index import Index
from .jobs import BlobJob, FillObserver
from .keys import AdmittedRecord, Link, TagRecord
from .settings import CacheSettings
from .store import Store, StoreError
from .store_fs import FsStore

if TYPE_CHECKING:
    from .blobserver import BlobServer

logger = logging.getLogger("registryproxy")

MAX_MANIFEST = 4 * 1024 * 1024  # the distribution spec's limit; larger manifests are not cached
RETRY_OPEN = 30.0  # seconds before a store that failed to open is tried again
MAX_ADMITTED_SEEN = 100_000  # admitted records remembered as written (oldest forgotten first)
ADMIT_BATCH = 16  # admitted records written at once
RELOAD_GRACE = 600.0  # seconds a replaced store keeps serving the transfers it began


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
        self._last_failure_log = -1e9  # a failing store is logged at most once a minute
        # Admitted records this process wrote (key -> tag), so a hit does not write its record again.
        self._admitted_seen: dict[str, str] = {}

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

    async def admitted(self, link: str, hex_digest: str) -> AdmittedRecord | None:
        """The record of a digest admitted under `digests: resolved` through this link, if any."""
        data = await self._get(keys.admitted_key(link, hex_digest))
        return AdmittedRecord.load(data) if data is not None else None

    # --- records ----------------------------------------------------------------

    async def admit(self, link: str, hex_digests: list[str], tag: str) -> None:
        """Record digests admitted under `digests: resolved` (from `tag`); each written once a process, a few
        at a time (the request that resolves the manifest waits for them: one round trip per batch, not per
        digest, on an S3 store)."""
        data = AdmittedRecord(tag, time.time()).dump()
        todo = [k for k in (keys.admitted_key(link, h) for h in hex_digests) if self._admitted_seen.get(k) != tag]
        for start in range(0, len(todo), ADMIT_BATCH):
            batch = todo[start : start + ADMIT_BATCH]
            results = await asyncio.gather(*(self.store.put_small(k, data) for k in batch), return_exceptions=True)
            for key, result in zip(batch, results, strict=True):
                if isinstance(result, StoreError):
                    self._failed(result)
                    return
                if isinstance(result, BaseException):
                    raise result
                self._admitted_seen[key] = tag
            while len(self._admitted_seen) > MAX_ADMITTED_SEEN:
                self._admitted_seen.pop(next(iter(self._admitted_seen)))

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

    async def fill_manifest(
        self, link: str, body: bytes, media_type: str, *, expected: str | None, stated: str | None, tag: str | None
    ) -> str | None:
        """Store a manifest that went upstream, link it, and for a tag record what it named now. `expected` is
        the digest the request asked for (None for a tag, which may have moved since its HEAD), `stated` the
        upstream's Docker-Content-Digest. None when stored, else why not: digest_mismatch, too_large,
        store_error."""
        hex_digest = keys.sha256_hex(body)
        if (expected is not None and expected != hex_digest) or (stated is not None and stated != hex_digest):
            return "digest_mismatch"
        if len(body) > MAX_MANIFEST:
            return "too_large"
        if not await self.put_manifest(link, hex_digest, media_type, body):
            return "store_error"
        if tag is not None:
            await self.put_tag(link, tag, TagRecord(f"sha256:{hex_digest}", media_type, len(body), time.time()))
        return None

    async def manifest_of(self, link: str, record: TagRecord) -> CachedManifest | None:
        """The manifest a tag record names, if this link has it."""
        hex_digest = keys.parse_digest(record.digest)
        return await self.manifest(link, hex_digest) if hex_digest is not None else None

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
        if now - self._last_failure_log > 60:
            self._last_failure_log = now
            logger.warning("registryproxy: cache store failed (%s); serving as if uncached", e)
        if self._observer is not None:
            self._observer.store_failed()


def _where(settings: CacheSettings) -> str:
    if settings.s3 is not None:
        return f"s3://{settings.s3.bucket}/{settings.s3.prefix}"
    return str(settings.path)


class CacheHolder:
    """The service of the configuration's current `cache:` section: opened on first use (or at start),
    reconfigured by a reload that keeps the store, reopened by one that changes it (the old service closed
    once its transfers end, at most `RELOAD_GRACE` later), and tried again `RETRY_OPEN` after a store that
    could not be opened (served uncached meanwhile)."""

    def __init__(self, observer: CacheObserver | None) -> None:
        self.observer = observer
        self.service: CacheService | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._spool: tempfile.TemporaryDirectory[str] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def current(self, settings: CacheSettings | None) -> CacheService | None:
        service = self.service
        if settings is None:
            if service is not None:
                self.service = None
                self._close_later(service)
            return None
        if service is not None and _same_store(service.settings, settings):
            if service.settings != settings:
                service.reconfigure(settings)
            return service
        async with self._lock:
            service = self.service
            if service is not None and _same_store(service.settings, settings):
                return service
            if time.monotonic() < self._retry_at:
                return None
            if self._spool is None:  # an S3 store's fills spool here (a directory store has its own)
                self._spool = tempfile.TemporaryDirectory(prefix="registryproxy-spool-")
            try:
                new = await CacheService.open(settings, Path(self._spool.name), self.observer)
            except StoreError as e:
                self._retry_at = time.monotonic() + RETRY_OPEN
                logger.error("registryproxy: cache store %s cannot be opened (%s); serving uncached", settings.store, e)
                return None
            self.service = new
            if service is not None:
                self._close_later(service)
            return new

    async def aclose(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await service.aclose()
        for task in list(self._closing):
            task.cancel()
        if self._spool is not None:
            self._spool.cleanup()

    def _close_later(self, service: CacheService) -> None:
        task = asyncio.get_running_loop().create_task(service.aclose(RELOAD_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _same_store(a: CacheSettings, b: CacheSettings) -> bool:
    return a.path == b.path and a.s3 == b.s3
