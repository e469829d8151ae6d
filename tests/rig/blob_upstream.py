"""An upstream that serves one blob for the cache's fill tests (aiohttp, in the test's own event loop).

It serves `GET /blob` (any path) and counts the GETs. The blob is `block` repeated `repeats` times, so a
large one costs no memory; its digest is `hex`. It can:
- pace the body: with `pause_at` set, it sends that many bytes, sets `paused` and waits for `resume`
  (at most `PAUSE_LIMIT` seconds, then it goes on) before the rest, so followers can join mid-way;
- corrupt one byte (`corrupt`), send a short body under a full Content-Length (`short`), send no
  Content-Length (`chunked`);
- answer a status instead (`status`, with `headers`), e.g. 404, 401 with WWW-Authenticate, 429 with
  Retry-After, 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from aiohttp import web

PAUSE_LIMIT = 10.0
WRITE = 1024 * 1024


class BlobUpstream:
    def __init__(self, block: bytes | None = None, repeats: int = 1) -> None:
        self.block = os.urandom(300_001) if block is None else block
        self.repeats = repeats
        self.size = len(self.block) * repeats
        h = hashlib.sha256()
        for _ in range(repeats):
            h.update(self.block)
        self.hex = h.hexdigest()
        self.gets = 0
        self.pause_at: int | None = None
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.corrupt = False
        self.short = False
        self.chunked = False
        self.status = 200
        self.headers: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def blob(self) -> bytes:
        """The whole blob (small blobs only)."""
        return self.block * self.repeats

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/blob"
        return self.url

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            self.gets += 1
        if self.status != 200:
            return web.Response(status=self.status, headers=self.headers)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        if not self.chunked:
            resp.content_length = self.size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        limit = self.size - 1000 if self.short else self.size
        sent = 0
        for i in range(self.repeats):
            block = self.block
            if self.corrupt and i == self.repeats // 2:
                mid = len(block) // 2
                block = block[:mid] + bytes([block[mid] ^ 0xFF]) + block[mid + 1 :]
            view = memoryview(block)
            for off in range(0, len(view), WRITE):
                piece = view[off : off + WRITE]
                if self.pause_at is not None and sent < self.pause_at <= sent + len(piece):
                    cut = self.pause_at - sent
                    await resp.write(piece[:cut])
                    sent += cut
                    piece = piece[cut:]
                    self.paused.set()
                    try:
                        async with asyncio.timeout(PAUSE_LIMIT):
                            await self.resume.wait()
                    except TimeoutError:
                        pass
                if sent + len(piece) > limit:
                    piece = piece[: max(0, limit - sent)]
                await resp.write(piece)
                sent += len(piece)
                if sent >= limit and self.short:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
        await resp.write_eof()
        return resp
