"""Filling the cache with a blob: one upstream fetch into a spool file, which any number of readers follow.

The first request for an uncached blob starts a `Fill`: a task, detached from any one client, that
streams the blob from the upstream into a spool file while hashing it. Every request for the same
blob through the same link meanwhile joins that fill (one upstream GET, however many ask) and reads
the spool file as it grows: **followers stream, they do not wait**. The first byte reaches every
client at once, whatever the blob's size (zot makes clients wait for the whole image, and first pulls
time out; distribution sends the second client upstream uncached; Harbor downloads every blob twice).
A reader that disconnects does not disturb the fill or the other readers.

The blob's last byte is released only once the whole blob has been verified (its SHA-256 and the size
the upstream announced) and committed to the store, with its link. A blob whose bytes do not match is
never stored, and no reader ever gets all of it: each reader's `read` raises `FillError` before the
end, and the blob server closes the connection short of the announced length, so every client's
transfer fails (never a short 200). Memory stays flat: the spool is read back in chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from . import keys
from .index import Index
from .keys import Link
from .store import Store, StoreError

logger = logging.getLogger("registryproxy")

OpenUpstream = Callable[[], contextlib.AbstractAsyncContextManager[httpx.Response]]
CHUNK = 256 * 1024
BLOB_TYPE = "application/octet-stream"
RECENT = 4096  # completed fills remembered, so a request planned as a miss that arrives after the commit is a hit
RECENT_SECONDS = 120.0
# Upstream headers a fill that ends before the body passes on (the proxy answers as the upstream did).
PASSED_HEADERS = ("www-authenticate", "retry-after")


class FillError(Exception):
    """A fill that cannot serve: `reason` is a short fixed word (metrics), `status` what to answer if
    nothing was sent yet (502: unreachable or failed, 504: timed out)."""

    def __init__(self, reason: str, status: int = 502) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class FillStart:
    """The upstream's answer: its status, the blob's size if announced, headers to pass on."""

    status: int
    size: int | None
    headers: dict[str, str] = field(default_factory=dict)


class FillObserver(Protocol):
    def fill_started(self, hex_digest: str) -> None: ...

    def fill_done(self, hex_digest: str, size: int) -> None: ...

    def fill_failed(self, hex_digest: str, reason: str) -> None: ...


class Fill:
    """One upstream fetch of one blob, followed by its readers."""

    def __init__(self, fills: Fills, link: str, hex_digest: str, open_upstream: OpenUpstream, spool: Path) -> None:
        self.link = link
        self.hex = hex_digest
        self.spool = spool
        self._fills = fills
        self._open = open_upstream
        self._answered = asyncio.Event()
        self._start: FillStart | None = None
        self._error: FillError | None = None
        self.written = 0
        self.done = False  # verified and committed
        self._progress = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def start(self) -> FillStart:
        """The upstream's status and headers. Raises FillError if it could not be asked."""
        await self._answered.wait()
        if self._start is None:
            raise self._error or FillError("upstream_error")
        return self._start

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes [start, end) as they arrive; the blob's last byte only once it is verified and stored.
        Raises FillError if the fill fails before this reader has had its bytes."""
        begun = await self.start()
        if begun.status != 200:
            raise FillError("upstream_status")
        pos = start
        fd: int | None = None
        try:
            while end is None or pos < end:
                done, error, written = self.done, self._error, self.written
                # Until the blob is verified and committed, its last byte stays back.
                available = written if done else max(0, written - 1)
                if end is not None:
                    available = min(available, end)
                if pos < available:
                    if fd is None:
                        try:
                            fd = os.open(self.spool, os.O_RDONLY)  # the same file once committed by a rename
                        except FileNotFoundError:
                            if not done:
                                raise FillError("store_error") from None
                            # Committed and its spool gone (moved, or uploaded and removed): read the store.
                            async for data in self._fills.store.read(keys.blob_key(self.hex), pos, end):
                                yield data
                            return
                    data = os.pread(fd, min(CHUNK, available - pos), pos)
                    if not data:
                        raise FillError("store_error")
                    pos += len(data)
                    yield data
                    continue
                if done:
                    return
                if error is not None:
                    raise error
                await self._progress.wait()
        finally:
            if fd is not None:
                os.close(fd)

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        store, index, observer = self._fills.store, self._fills.index, self._fills.observer
        key = keys.blob_key(self.hex)
        fd: int | None = None
        if observer is not None:
            observer.fill_started(self.hex)
        try:
            with index.pin(key):
                async with self._open() as resp:
                    if resp.status_code != 200:
                        passed = {k: v for k in PASSED_HEADERS if (v := resp.headers.get(k)) is not None}
                        self._start = FillStart(resp.status_code, None, passed)
                        raise FillError("upstream_status")
                    length = resp.headers.get("content-length", "")
                    size = int(length) if length.isdigit() else None
                    fd = os.open(self.spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    self._start = FillStart(200, size)
                    self._answered.set()
                    digest = hashlib.sha256()
                    async for chunk in resp.aiter_raw():
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        digest.update(chunk)
                        self.written += len(chunk)
                        if size is not None and self.written > size:
                            raise FillError("size_mismatch")
                        self._notify()
                os.close(fd)
                fd = None
                if size is not None and self.written != size:
                    raise FillError("size_mismatch")
                if digest.hexdigest() != self.hex:
                    raise FillError("digest_mismatch")
                await store.put_file(key, self.spool)
                index.added(key, self.written)
                await store.put_small(keys.link_key(self.link, self.hex), Link("blob", BLOB_TYPE, self.written).dump())
            self.done = True
            self._fills.completed_now(self.link, self.hex)
            if observer is not None:
                observer.fill_done(self.hex, self.written)
        except FillError as e:
            self._fail(e)
        except StoreError as e:
            logger.warning("registryproxy: cache: committing sha256:%s failed (%s)", self.hex[:12], e)
            self._fail(FillError("store_error"))
        except (httpx.TimeoutException, TimeoutError):
            self._fail(FillError("upstream_error", 504))
        except asyncio.CancelledError:
            self._fail(FillError("cancelled"))
            raise
        except Exception as e:  # noqa: BLE001 - UpstreamError, httpx and OS errors: the fill fails, the proxy goes on
            self._fail(FillError("upstream_error", 504 if getattr(e, "timeout", False) else 502))
        finally:
            if fd is not None:
                os.close(fd)
            if not self.done or self.spool.exists():
                # A failed fill's spool, or one a store copied rather than moved (S3). Readers that hold it
                # open keep reading it until they end.
                with contextlib.suppress(OSError):
                    self.spool.unlink()
            self._answered.set()
            self._notify()
            self._fills.ended(self)

    def _fail(self, error: FillError) -> None:
        self._error = error
        observer = self._fills.observer
        if observer is not None and error.reason != "upstream_status":
            observer.fill_failed(self.hex, error.reason)


class Fills:
    """The fills running in this process, one per (link, digest)."""

    def __init__(self, store: Store, index: Index, spool_dir: Path, observer: FillObserver | None = None) -> None:
        self.store = store
        self.index = index
        self.spool_dir = spool_dir
        self.observer = observer
        self._running: dict[tuple[str, str], Fill] = {}
        self._recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._count = 0

    def start_or_join(self, link: str, hex_digest: str, open_upstream: OpenUpstream) -> Fill:
        fill = self._running.get((link, hex_digest))
        if fill is None:
            self._count += 1
            spool = self.spool_dir / f"{hex_digest[:16]}-{os.getpid()}-{self._count}.part"
            fill = self._running[(link, hex_digest)] = Fill(self, link, hex_digest, open_upstream, spool)
        return fill

    def running(self, link: str, hex_digest: str) -> Fill | None:
        return self._running.get((link, hex_digest))

    def completed(self, link: str, hex_digest: str) -> bool:
        """Whether a fill of this blob through this link was committed in the last minutes."""
        at = self._recent.get((link, hex_digest))
        return at is not None and time.monotonic() - at < RECENT_SECONDS

    def completed_now(self, link: str, hex_digest: str) -> None:
        self._recent[(link, hex_digest)] = time.monotonic()
        self._recent.move_to_end((link, hex_digest))
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def ended(self, fill: Fill) -> None:
        if self._running.get((fill.link, fill.hex)) is fill:
            del self._running[(fill.link, fill.hex)]

    async def aclose(self) -> None:
        fills = list(self._running.values())
        for fill in fills:
            fill.task.cancel()
        for fill in fills:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fill.task
