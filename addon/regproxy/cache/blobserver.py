"""The local blob server: where the proxy routes a cached mapping's blob GETs.

mitmproxy keeps a response the proxy makes itself in memory, so a blob from the store cannot be such a
response; it must reach the client as a stream. The proxy therefore routes every blob GET of a cached
mapping to this server (aiohttp, on 127.0.0.1, a port of its own, in the proxy's event loop), and
mitmproxy streams its answer to the client like any upstream's, through the whole chain (limits, the
watch, the log). A request carries a one-time ticket in its path, `/t/<ticket>`, which names the job the
proxy's step planned (`BlobJob`): the digest, the link, whether the store had it, and how to open the
upstream (the upstream credential stays in memory, never in a request). A ticket is random, works once
and expires after a minute; an unknown one gets a bare 404.

- **hit:** a directory store answers with the file itself (`sendfile`; aiohttp does `Range`, `206`,
  `416`), the blob pinned (never evicted) while it is sent; an S3 store is streamed from the bucket,
  range included. Content that turned out to be gone is fetched as a miss.
- **miss:** a fill (cache/fill.py), joined by every request for the same blob and link while it runs;
  the response streams as the fill grows. An upstream that answers otherwise (`401`, `404`, `429`,
  `5xx`) is answered with its status (and `WWW-Authenticate`, `Retry-After`), an empty body: the proxy's
  rewrite turns it into its registry error. A fill that fails mid-way closes the connection short of the
  announced length: the client's transfer fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from . import keys
from .fill import BLOB_TYPE, FillError, Fills, OpenUpstream
from .index import Index
from .store import Store, StoreError

logger = logging.getLogger("registryproxy")

TICKET_SECONDS = 60.0
MAX_TICKETS = 10000


@dataclass(frozen=True)
class BlobJob:
    """What the proxy's step planned for one blob GET."""

    hex: str
    link: str
    hit: bool
    open_upstream: OpenUpstream
    # Told once the response ends: "hit" or "fill", and the body bytes sent.
    on_done: Callable[[str, int], None] | None = None


class BlobServer:
    def __init__(self, store: Store, index: Index, fills: Fills) -> None:
        self.store = store
        self.index = index
        self.fills = fills
        self.port = 0
        self._tickets: dict[str, tuple[float, BlobJob]] = {}
        self._runner: web.AppRunner | None = None
        self.active = 0  # responses being sent
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/t/{ticket}", self._handle, allow_head=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, reuse_address=True)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        return self.port

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop serving; with `grace`, once the responses being sent have ended (at most `grace` seconds)."""
        if grace > 0 and self.active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def ticket(self, job: BlobJob) -> str:
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS or (self._tickets and next(iter(self._tickets.values()))[0] < now):
            self._tickets = {t: v for t, v in self._tickets.items() if v[0] >= now}
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (now + TICKET_SECONDS, job)
        return f"/t/{ticket}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        item = self._tickets.pop(request.match_info["ticket"], None)
        if item is None or item[0] < time.monotonic():
            return web.Response(status=404)
        job = item[1]
        sent = [0]
        outcome = "fill"
        self.active += 1
        self._idle.clear()
        try:
            if job.hit or self.fills.completed(job.link, job.hex):
                resp = await self._hit(request, job, sent)
                if resp is not None:
                    outcome = "hit"
                    return resp
            return await self._fill(request, job, sent)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - never a traceback from aiohttp: close the connection
            logger.warning("registryproxy: cache blob server: %s serving sha256:%s", type(e).__name__, job.hex[:12])
            _close(request)
            return web.Response(status=502)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
            if job.on_done is not None:
                with contextlib.suppress(Exception):
                    job.on_done(outcome, sent[0])

    async def _hit(self, request: web.Request, job: BlobJob, sent: list[int]) -> web.StreamResponse | None:
        key = keys.blob_key(job.hex)
        headers = {"Content-Type": BLOB_TYPE, "Docker-Content-Digest": f"sha256:{job.hex}"}
        with self.index.pin(key):
            path = self.store.local_path(key)
            if path is not None:
                # aiohttp sends the file once this returns (sendfile, Range, 206, 416). Just used, it is the
                # last the index would evict, so it is still there when aiohttp opens it.
                self.index.used(key)
                span = _range(request, path.stat().st_size)
                sent[0] = span[1] - span[0] if span is not None else 0
                return web.FileResponse(path, headers=headers)
            try:
                size_found = await self.index.lookup(key)
            except StoreError:
                return None
            if size_found is None:
                return None
            span = _range(request, size_found)
            if span is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size_found}"})
            start, end, status = span
            resp: web.StreamResponse = web.StreamResponse(status=status, headers=headers)
            resp.content_length = end - start
            if status == 206:
                resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size_found}"
            resp.headers["Accept-Ranges"] = "bytes"
            await self._stream(request, resp, self.store.read(key, start, end), sent)
            self.index.used(key)
            return resp

    async def _fill(self, request: web.Request, job: BlobJob, sent: list[int]) -> web.StreamResponse:
        fill = self.fills.start_or_join(job.link, job.hex, job.open_upstream)
        try:
            begun = await fill.start()
        except FillError as e:
            return web.Response(status=e.status)
        if begun.status != 200:
            return web.Response(status=begun.status, headers=begun.headers)
        headers = {"Content-Type": BLOB_TYPE, "Docker-Content-Digest": f"sha256:{job.hex}"}
        start, end, status = 0, begun.size, 200
        if begun.size is not None:
            span = _range(request, begun.size)
            if span is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{begun.size}"})
            start, end, status = span
        resp = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            resp.content_length = end - start
            if status == 206:
                resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{begun.size}"
            resp.headers["Accept-Ranges"] = "bytes"
        await self._stream(request, resp, fill.read(start, end), sent)
        return resp

    @staticmethod
    async def _stream(
        request: web.Request, resp: web.StreamResponse, body: AsyncIterator[bytes], sent: list[int]
    ) -> None:
        await resp.prepare(request)
        try:
            async for chunk in body:
                await resp.write(chunk)
                sent[0] += len(chunk)
        except (FillError, StoreError, OSError):
            # Never a short answer that looks whole: the connection ends before the announced length.
            _close(request)
            return
        finally:
            with contextlib.suppress(AttributeError, TypeError):
                await body.aclose()  # type: ignore[attr-defined]
        await resp.write_eof()


def _range(request: web.Request, size: int) -> tuple[int, int, int] | None:
    """[start, end) and the status for the request's Range over a blob of `size` bytes; None: unsatisfiable."""
    if "range" not in request.headers:
        return 0, size, 200
    try:
        rng = request.http_range
    except ValueError:
        return 0, size, 200  # a malformed Range is ignored, as registries do
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return 0, size, 200
    if start is None:  # a suffix: the last `-stop` bytes
        assert stop is not None
        start = max(0, size + stop) if stop < 0 else max(0, size - stop)
        stop = size
    elif start < 0:
        start, stop = max(0, size + start), size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        return None
    return start, stop, 206


def _close(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
