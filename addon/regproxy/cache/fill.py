"""A fill: one upstream fetch of one blob into a spool file, which any number of readers follow as it grows.

`Fills.start_or_join(link, hex, open_upstream)` coalesces: while a fill of that (link id, digest) runs,
every caller gets the same `Fill`, so concurrent pulls of one uncached blob cost one upstream GET. The
fill's leader is a task of its own, detached from every client: a reader that disconnects stops only
its own read, and the fill goes on into the store even when no one reads it any more.

Why followers stream the growing spool rather than wait for the whole blob: a client gets its first byte
at once, whoever started the fill and however large the blob is. Waiting (zot syncs the whole image
before answering; OpenCIDN answers once the blob is cached) makes a first pull of a large layer sit
idle until its client's own timeout fires (zot #4323), and a follower that joins late would wait longer
than the leader. Each reader `os.pread`s the spool from its own position (256 KiB at a time, in a
thread), so memory is flat whatever the size and however many read, and a slow reader never holds the
download back: the spool, not a buffer, absorbs the difference.

How a bad fill fails every follower: the last byte of the blob is held back from every reader until the
fill has verified the sha256 of everything received and the announced size, and committed the blob
(`store.put_file`, `index.added`, the link record). A corrupt, short or unstorable blob, an upstream that
stalls (the httpx read timeout, and `idle_timeout` across the whole exchange) or a cancelled fill makes
every reader raise `FillError` instead of yielding its last bytes, so no client ever receives the
complete bytes of a blob that was not stored; the blob server then breaks the connection (Content-Length
unmet, or no chunked terminator). Nothing is stored, and the spool file is removed.

The spool is written and hashed in a thread by `spool.SpoolWriter`, so the event loop never does file I/O
or hashing; the vocabulary the fill shares with the blob server (the job, the errors) is `cache/jobs.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from .index import Index
from .jobs import BlobJob, FillError, FillObserver, FillStart, OpenUpstream
from .keys import Link, blob_key, link_key
from .spool import SpoolWriter, make_spool
from .store import Store, StoreError

__all__ = ["CHUNK", "BlobJob", "Fill", "FillError", "FillObserver", "FillStart", "Fills", "OpenUpstream"]

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024
IDLE_TIMEOUT = 60.0  # s: the longest the upstream may stay silent (headers or body) before the fill fails
PASSED_HEADERS = ("www-authenticate", "retry-after")  # a non-200's headers the proxy answers with


class Fill:
    """One upstream fetch of one blob, followed by its readers. Made by `Fills.start_or_join`."""

    def __init__(
        self,
        fills: Fills,
        link: str,
        hex_digest: str,
        open_upstream: OpenUpstream,
    ) -> None:
        self._fills = fills
        self.link = link
        self.hex = hex_digest
        self._open = open_upstream
        self._started = asyncio.Event()
        self._start: FillStart | None = None
        self._error: FillError | None = None
        self.written = 0  # bytes in the spool, hashed
        self.complete = False  # verified and committed
        self._changed = asyncio.Event()
        self._path: Path | None = None
        self._rfd = -1
        self._fd_users = 0
        self.task: asyncio.Task[None] | None = None

    # -- what readers see --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.complete or self._error is not None

    @property
    def error(self) -> FillError | None:
        return self._error

    async def start(self) -> FillStart:
        """The upstream's status and headers (waited for, at most the idle bound). Raises FillError when the
        upstream could not be asked (502) or timed out (504)."""
        await self._started.wait()  # the leader sets it on every path, within its own idle bound
        if self._start is None:
            assert self._error is not None
            raise self._error
        return self._start

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes [start, end) of the blob (end None: to its end) as they arrive, in chunks of at most
        256 KiB. The blob's last byte comes only once it is verified and stored; raises FillError if the
        fill fails (or failed) before this read got all its bytes."""
        st = await self.start()
        if st.status != 200:
            raise FillError(f"upstream answered {st.status}")
        if self._rfd < 0 or self._fd_users == 0:
            # The spool is gone: the fill failed, or finished and nobody else is reading.
            if self._error is not None:
                raise self._error
            async for chunk in self._read_stored(start, end):
                yield chunk
            return
        self._fd_users += 1
        try:
            pos = start
            while True:
                if self._error is not None:
                    raise self._error
                if self.complete:
                    final = self.written if end is None else min(end, self.written)
                    if pos >= final:
                        return
                    stop = final
                else:
                    if end is not None and pos >= end:
                        return  # a range that ends before the blob does
                    stop = self._releasable() if end is None else min(end, self._releasable())
                if pos < stop:
                    chunk = await asyncio.to_thread(os.pread, self._rfd, min(CHUNK, stop - pos), pos)
                    if not chunk:  # cannot happen while the spool's inode is held open; never spin
                        raise FillError("spool read failed", kind="store_error")
                    pos += len(chunk)
                    yield chunk
                    continue
                changed = self._changed
                try:
                    async with asyncio.timeout(self._fills.idle_timeout + 5.0):
                        await changed.wait()
                except TimeoutError:
                    raise FillError("fill stalled", 504) from None
        finally:
            self._release_fd()

    def _releasable(self) -> int:
        """How far readers may read before the fill is complete: everything written but the blob's last byte
        (all but the last byte written when the size was not announced)."""
        size = self._start.size if self._start is not None else None
        if size is not None and self.written < size:
            return self.written
        return max(0, self.written - 1)

    async def _read_stored(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        key = blob_key(self.hex)
        try:
            with self._fills.index.pin(key):
                async for chunk in self._fills.store.read(key, start, end):
                    yield chunk
        except StoreError as e:
            logger.warning("cache: cannot read the blob just filled (%s)", e)
            raise FillError("store read failed", kind="store_error") from None

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _release_fd(self) -> None:
        self._fd_users -= 1
        if self._fd_users == 0 and self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1

    # -- the leader ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """The leader: fetch, verify, commit; every reader is told how it ended. Run by `Fills` as a task."""
        fills = self._fills
        key = blob_key(self.hex)
        fills.notify("fill_started", self.hex)
        wfd = -1
        size = 0
        try:
            with fills.index.pin(key):
                try:
                    wfd, path = await asyncio.to_thread(make_spool, fills.spool_dir)
                    self._path = path
                    self._rfd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
                    self._fd_users = 1  # the fill's own hold, released when it ends
                except OSError as e:
                    logger.warning("cache: cannot make a spool file (%s)", e.strerror or type(e).__name__)
                    raise FillError("spool unusable", 503, kind="store_error") from None
                size = await self._fetch(wfd)
                os.close(wfd)
                wfd = -1
                await self._commit(key, size)
            self.complete = True
        except FillError as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(FillError("fill cancelled", 503, kind="cancelled"))
            raise
        except Exception as e:  # noqa: BLE001 - a leader must end its readers whatever happened
            logger.warning("cache: fill of sha256:%s failed unexpectedly (%s)", self.hex, type(e).__name__)
            self._fail(FillError("fill failed", kind="store_error"))
        finally:
            if wfd >= 0:
                os.close(wfd)
            if self._path is not None:  # failed, or committed by a copy (S3): the spool goes
                with contextlib.suppress(OSError):
                    os.unlink(self._path)
            fills.forget(self)
            self._started.set()
            self._notify()
            if self._fd_users > 0 and self._rfd >= 0:
                self._release_fd()
        if self.complete:
            fills.notify("fill_done", self.hex, size)

    def _fail(self, e: FillError) -> None:
        self._error = e
        self._fills.notify("fill_failed", self.hex, e.kind)

    async def _fetch(self, wfd: int) -> int:
        """Download into the spool; the number of bytes received, hashed and checked. Raises FillError."""
        idle = self._fills.idle_timeout
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(idle):
                    resp = await stack.enter_async_context(self._open())
            except FillError:
                raise
            except (httpx.TimeoutException, TimeoutError):
                raise FillError("upstream timed out", 504) from None
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
                raise FillError(f"upstream unreachable ({type(e).__name__})") from None
            except Exception as e:  # noqa: BLE001 - the caller's opener (a token fetch, say) failed
                raise FillError(f"upstream unusable ({type(e).__name__})") from None
            headers = {n: resp.headers[n] for n in PASSED_HEADERS if n in resp.headers}
            if resp.status_code != 200:
                self._start = FillStart(resp.status_code, None, headers)
                self._started.set()
                raise FillError(f"upstream answered {resp.status_code}")
            size = _announced_size(resp)
            self._start = FillStart(200, size, {})
            self._started.set()
            self._notify()
            writer = SpoolWriter(wfd, self._written)
            received = await writer.write(resp, size, idle, f"sha256:{self.hex}")
        if size is not None and received != size:
            logger.warning("cache: blob sha256:%s: %d bytes received, %d announced", self.hex, received, size)
            raise FillError("upstream blob has the wrong size", kind="size_mismatch")
        if writer.hexdigest() != self.hex:
            logger.warning("cache: blob sha256:%s: the upstream's bytes do not match the digest", self.hex)
            raise FillError("upstream blob does not match its digest", kind="digest_mismatch")
        return received

    def _written(self, n: int) -> None:
        self.written += n
        self._notify()

    async def _commit(self, key: str, size: int) -> None:
        fills = self._fills
        assert self._path is not None
        try:
            await fills.store.put_file(key, self._path)
            fills.index.added(key, size)
            await fills.store.put_small(
                link_key(self.link, self.hex), Link("blob", "application/octet-stream", size).dump()
            )
        except StoreError as e:
            logger.warning("cache: cannot store blob sha256:%s (%s)", self.hex, e)
            raise FillError("store failed", kind="store_error") from None


class Fills:
    """The fills running, one per (link id, digest); see the module's docstring."""

    def __init__(
        self,
        store: Store,
        index: Index,
        spool_dir: Path,
        observer: FillObserver | None = None,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.store = store
        self.index = index
        self.spool_dir = Path(spool_dir)
        self.observer = observer
        self.idle_timeout = idle_timeout
        self._running: dict[tuple[str, str], Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def start_or_join(self, link: str, hex_digest: str, open_upstream: OpenUpstream) -> Fill:
        """The running fill of this blob through this link id, or a new one started now (on the running loop)."""
        fill = self._running.get((link, hex_digest))
        if fill is not None and not fill.done:
            return fill
        fill = Fill(self, link, hex_digest, open_upstream)
        self._running[(link, hex_digest)] = fill
        task = asyncio.get_running_loop().create_task(fill.run(), name="cache-fill")
        fill.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    def forget(self, fill: Fill) -> None:
        if self._running.get((fill.link, fill.hex)) is fill:
            del self._running[(fill.link, fill.hex)]

    def notify(self, what: str, hex_digest: str, arg: int | str | None = None) -> None:
        if self.observer is None:
            return
        try:
            if what == "fill_started":
                self.observer.fill_started(hex_digest)
            elif what == "fill_done":
                assert isinstance(arg, int)
                self.observer.fill_done(hex_digest, arg)
            else:
                self.observer.fill_failed(hex_digest, str(arg))
        except Exception as e:  # noqa: BLE001 - metrics must never fail a fill
            logger.warning("cache: fill observer failed (%s)", type(e).__name__)

    async def aclose(self) -> None:
        """Cancel the running fills (their readers fail, their spools are removed) and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._running.clear()


def _announced_size(resp: httpx.Response) -> int | None:
    """Content-Length, when it is the blob's size (not that of an encoded body)."""
    if resp.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    value = resp.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() and len(value) < 20 else None
