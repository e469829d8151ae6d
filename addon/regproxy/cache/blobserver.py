"""The local blob server: where the proxy routes the blob GETs (and HEADs) of cached mappings.

mitmproxy keeps a response it makes itself in memory, so a blob cannot be answered from the store by the
step that decides it: the step asks for a ticket (`ticket(BlobJob(...))`, a path `/t/<ticket>`) and
routes the flow to this server on 127.0.0.1, whose answer mitmproxy streams to the client like any
upstream's. A ticket is random (`secrets.token_urlsafe`), good for one request, and expires after
`TICKET_TTL` seconds unused; tickets are never logged. An unknown ticket gets a 404 with an empty body.

- A hit in a directory store is a `web.FileResponse` (sendfile; Range, 206, 416 and Content-Length by
  aiohttp), the blob pinned in the index until it is sent. In an S3 store it is streamed from
  `store.read`, with a single byte range (206 + Content-Range; 416 with `Content-Range: bytes */SIZE`).
  A hit whose content turns out to be gone (evicted since the proxy looked) becomes a fill.
- A fill is `Fills.start_or_join`: an upstream answer other than 200 is passed on (its status,
  WWW-Authenticate, Retry-After, an empty body); a 200 streams the growing spool, with Content-Length when
  the upstream announced it and Range once the size is known. When the fill fails mid-way the connection
  is aborted with the body unfinished, so the client's transfer fails: never a short 200.

Every answer carries `Docker-Content-Digest` and `Content-Type: application/octet-stream`; `on_done`
is told once per request whether it was a hit or a fill and how many body bytes were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .fill import CHUNK, Fills
from .index import Index
from .jobs import BlobJob, FillError
from .keys import blob_key
from .store import Store, StoreError

logger = logging.getLogger(__name__)

TICKET_TTL = 60.0  # s
MAX_TICKETS = 100_000  # outstanding at once; the oldest are dropped beyond it


class _Gone(Exception):
    """The content is not in the store (any more): serve it with a fill."""


class _File(web.FileResponse):
    """A FileResponse that may be sent inside the handler: a second `prepare` (aiohttp's) does nothing."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


class BlobServer:
    """An aiohttp server on 127.0.0.1 that answers tickets with blobs from the store or from fills."""

    def __init__(self, store: Store, index: Index, fills: Fills, *, ticket_ttl: float = TICKET_TTL) -> None:
        self.store = store
        self.index = index
        self.fills = fills
        self.ticket_ttl = ticket_ttl
        self.port = 0
        self._tickets: OrderedDict[str, tuple[float, BlobJob]] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.active = 0  # responses being sent
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> int:
        """Listen on 127.0.0.1 on a port the kernel picks; returns it."""
        app = web.Application()
        app.router.add_get("/t/{ticket}", self._handle)  # HEAD too
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop serving; with `grace`, once the responses being sent have ended (at most `grace` seconds)."""
        if grace > 0 and self.active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        runner, self._runner = self._runner, None
        self._tickets.clear()
        if runner is not None:
            await runner.cleanup()

    def ticket(self, job: BlobJob) -> str:
        """The path to route the blob's request to: `/t/<ticket>`, for one request within `ticket_ttl`."""
        now = time.monotonic()
        self._expire(now)
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.popitem(last=False)
        t = secrets.token_urlsafe(24)
        self._tickets[t] = (now + self.ticket_ttl, job)
        return f"/t/{t}"

    def _expire(self, now: float) -> None:
        while self._tickets:
            t, (deadline, _) = next(iter(self._tickets.items()))
            if deadline > now:
                return
            del self._tickets[t]

    def _take(self, t: str) -> BlobJob | None:
        found = self._tickets.pop(t, None)
        if found is None:
            return None
        deadline, job = found
        return job if deadline > time.monotonic() else None

    # -- requests ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        job = self._take(request.match_info["ticket"])
        if job is None:
            return web.Response(status=404)
        outcome, sent = "fill", 0
        self.active += 1
        self._idle.clear()
        try:
            if job.hit:
                try:
                    outcome = "hit"
                    resp, sent = await self._hit(request, job)
                    return resp
                except _Gone:
                    outcome = "fill"
            resp, sent = await self._fill(request, job)
            return resp
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - never a traceback from aiohttp: one line, the connection closed
            logger.warning("cache: blob server: %s serving sha256:%s", type(e).__name__, job.hex[:12])
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPBadGateway() from None
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
            if job.on_done is not None:
                try:
                    job.on_done(outcome, sent)
                except Exception as e:  # noqa: BLE001 - metrics must never fail an answer
                    logger.warning("cache: blob server observer failed (%s)", type(e).__name__)

    def _headers(self, job: BlobJob) -> dict[str, str]:
        return {"Docker-Content-Digest": f"sha256:{job.hex}", "Content-Type": "application/octet-stream"}

    async def _hit(self, request: web.Request, job: BlobJob) -> tuple[web.StreamResponse, int]:
        key = blob_key(job.hex)
        with self.index.pin(key):
            try:
                size = await self.index.lookup(key)
            except StoreError as e:
                logger.warning("cache: cannot look a blob up (%s); filling it instead", e)
                raise _Gone from None
            if size is None:
                raise _Gone
            path = await asyncio.to_thread(self.store.local_path, key)
            self.index.used(key)
            if path is not None:
                # Sent here, inside the pin (aiohttp's second prepare, after the handler, does nothing). The
                # pin and the lookup above keep eviction away: a key being deleted looks up as absent.
                resp = _File(path, chunk_size=CHUNK, headers=self._headers(job))
                try:
                    await resp.prepare(request)
                except ConnectionError:
                    return resp, 0
                if request.method == "HEAD" or resp.status not in (200, 206) or resp.content_length is None:
                    return resp, 0
                return resp, resp.content_length
            return await self._stream_stored(request, job, key, size)

    async def _stream_stored(
        self, request: web.Request, job: BlobJob, key: str, size: int
    ) -> tuple[web.StreamResponse, int]:
        rng = _byte_range(request, size)
        if rng is None:
            return _unsatisfiable(size, self._headers(job)), 0
        start, end = rng
        chunks: AsyncIterator[bytes] | None = None
        first = b""
        if request.method != "HEAD" and end > start:
            chunks = self.store.read(key, start, end)
            try:
                first = await anext(chunks, b"")
            except StoreError as e:
                logger.info("cache: a cached blob could not be read (%s); filling it instead", e)
                raise _Gone from None
        resp = _prepared(request, job, size, start, end, self._headers(job))
        sent = 0
        try:
            await resp.prepare(request)
            if chunks is None:
                await resp.write_eof()
                return resp, 0
            await resp.write(first)
            sent = len(first)
            async for chunk in chunks:
                await resp.write(chunk)
                sent += len(chunk)
            if sent != end - start:
                logger.warning("cache: a cached blob was shorter than its size; breaking the answer")
                _abort(request)
                return resp, sent
            await resp.write_eof()
        except StoreError as e:
            logger.warning("cache: reading a cached blob failed mid-way (%s); breaking the answer", e)
            _abort(request)
        except ConnectionError:
            pass
        finally:
            if chunks is not None and hasattr(chunks, "aclose"):
                with contextlib.suppress(Exception):
                    await chunks.aclose()
        return resp, sent

    async def _fill(self, request: web.Request, job: BlobJob) -> tuple[web.StreamResponse, int]:
        fill = self.fills.start_or_join(job.link, job.hex, job.open_upstream)
        try:
            st = await fill.start()
        except FillError as e:
            return web.Response(status=e.status), 0
        if st.status != 200:
            headers = {k.title(): v for k, v in st.headers.items()}
            return web.Response(status=st.status, headers=headers), 0
        headers = self._headers(job)
        if st.size is not None:
            rng = _byte_range(request, st.size)
            if rng is None:
                return _unsatisfiable(st.size, headers), 0
            start, end = rng
            resp = _prepared(request, job, st.size, start, end, headers)
            read_end: int | None = end
        else:
            start, read_end = 0, None  # Range ignored until the size is known (RFC 9110 allows it)
            resp = web.StreamResponse(status=200, headers=headers)
        sent = 0
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                await resp.write_eof()
                return resp, 0
            async for chunk in fill.read(start, read_end):
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
        except FillError as e:
            logger.info("cache: a fill failed while a client read it (%s); breaking the answer", e.reason)
            _abort(request)
        except ConnectionError:
            pass
        return resp, sent


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """[start, end) of the request's Range within a blob of `size` bytes (the whole blob without one);
    None when unsatisfiable or malformed (answered 416, as aiohttp's FileResponse does)."""
    if "Range" not in request.headers:
        return 0, size
    try:
        rng = request.http_range
    except ValueError:
        return None
    start, stop = rng.start, rng.stop
    if start is None:
        start = 0
    if start < 0:  # the last -start bytes
        start = max(0, size + start)
        if size == 0:
            return None
    end = size if stop is None else min(stop, size)
    if start >= size or start >= end:
        return None
    return start, end


def _prepared(
    request: web.Request, job: BlobJob, size: int, start: int, end: int, headers: dict[str, str]
) -> web.StreamResponse:
    partial = "Range" in request.headers
    resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
    resp.headers["Accept-Ranges"] = "bytes"
    if partial:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp.content_length = end - start
    return resp


def _unsatisfiable(size: int, headers: dict[str, str]) -> web.Response:
    return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})


def _abort(request: web.Request) -> None:
    """Break the connection with the body unfinished: the client sees a failed transfer, not a short one."""
    transport = request.transport
    if transport is not None:
        transport.abort()
