"""The blob server (cache/blobserver.py) over real HTTP: tickets, hits from a directory (sendfile) and from a
store without local files (streamed), Range on both and on a fill, eight clients of one uncached blob, a
corrupt upstream blob failing every client's transfer, a client that leaves mid-way, upstream statuses,
a refused upstream, and memory flat for a 256 MiB blob."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from regproxy.cache.blobserver import BlobServer
from regproxy.cache.fill import BlobJob, Fills, OpenUpstream
from regproxy.cache.index import Index
from regproxy.cache.keys import blob_key, link_key
from regproxy.cache.store_fs import FsStore
from rig.blob_upstream import BlobUpstream

T = TypeVar("T")
LINK = "fedcba9876543210fedcba9876543210"
WAIT = 10.0


class RemoteLikeStore(FsStore):
    """A directory store that has no local files to offer, as S3: hits are streamed from `read`."""

    def local_path(self, key: str) -> Path | None:
        return None


@dataclass
class Rig:
    store: FsStore
    index: Index
    fills: Fills
    server: BlobServer
    upstream: BlobUpstream
    http: httpx.AsyncClient
    base: str
    done: list[tuple[str, int]] = field(default_factory=list)

    def opener(self, url: str | None = None) -> OpenUpstream:
        target = url or self.upstream.url
        return lambda: self.http.stream("GET", target)

    def url(self, hit: bool = False, upstream_url: str | None = None) -> str:
        job = BlobJob(self.upstream.hex, LINK, hit, self.opener(upstream_url), lambda o, n: self.done.append((o, n)))
        return self.base + self.server.ticket(job)

    async def put(self) -> None:
        """Store the upstream's blob, as a fill would have."""
        spool = self.store.spool_dir() / "test"
        spool.write_bytes(self.upstream.blob())
        await self.store.put_file(blob_key(self.upstream.hex), spool)
        self.index.added(blob_key(self.upstream.hex), self.upstream.size)


def run(
    tmp_path: Path,
    body: Callable[[Rig], Awaitable[T]],
    upstream: BlobUpstream | None = None,
    store_class: type[FsStore] = FsStore,
) -> T:
    async def main() -> T:
        up = upstream or BlobUpstream()
        await up.start()
        store = store_class(tmp_path / "store")
        await store.start()
        index = Index(store, 1 << 40)
        fills = Fills(store, index, store.spool_dir())
        server = BlobServer(store, index, fills)
        port = await server.start()
        http = httpx.AsyncClient(timeout=httpx.Timeout(WAIT), trust_env=False)
        try:
            async with asyncio.timeout(60):
                return await body(Rig(store, index, fills, server, up, http, f"http://127.0.0.1:{port}"))
        finally:
            await http.aclose()
            await server.aclose()
            await fills.aclose()
            await index.aclose()
            await up.aclose()

    return asyncio.run(main())


async def get(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None, got: bytearray | None = None
) -> httpx.Response:
    """A streamed GET; the body read into `got` as it comes (so a failed transfer shows what arrived)."""
    out = bytearray() if got is None else got
    async with http.stream("GET", url, headers=headers) as resp:
        async for chunk in resp.aiter_raw():
            out += chunk
    resp._content = bytes(out)
    return resp


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/blob"


@pytest.mark.parametrize("store_class", [FsStore, RemoteLikeStore])
def test_a_hit_with_its_headers_and_ranges(tmp_path: Path, store_class: type[FsStore]) -> None:
    async def body(rig: Rig) -> None:
        await rig.put()
        blob, size = rig.upstream.blob(), rig.upstream.size
        resp = await get(rig.http, rig.url(hit=True))
        assert resp.status_code == 200 and resp.content == blob
        assert resp.headers["content-length"] == str(size)
        assert resp.headers["docker-content-digest"] == f"sha256:{rig.upstream.hex}"
        assert resp.headers["content-type"] == "application/octet-stream"
        resp = await get(rig.http, rig.url(hit=True), {"Range": "bytes=100-199"})
        assert resp.status_code == 206 and resp.content == blob[100:200]
        assert resp.headers["content-range"] == f"bytes 100-199/{size}"
        assert resp.headers["content-length"] == "100"
        resp = await get(rig.http, rig.url(hit=True), {"Range": "bytes=-10"})
        assert resp.status_code == 206 and resp.content == blob[-10:]
        resp = await get(rig.http, rig.url(hit=True), {"Range": f"bytes={size - 5}-"})
        assert resp.status_code == 206 and resp.content == blob[-5:]
        resp = await get(rig.http, rig.url(hit=True), {"Range": f"bytes={size}-"})
        assert resp.status_code == 416 and resp.headers["content-range"] == f"bytes */{size}"
        resp = await rig.http.head(rig.url(hit=True))
        assert resp.status_code == 200 and resp.headers["content-length"] == str(size) and resp.content == b""
        assert rig.upstream.gets == 0
        assert rig.done[:2] == [("hit", size), ("hit", 100)]
        assert not rig.index.pinned(blob_key(rig.upstream.hex))

    run(tmp_path, body, store_class=store_class)


def test_a_ticket_works_once_and_unknown_ones_are_404(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await rig.put()
        url = rig.url(hit=True)
        assert (await get(rig.http, url)).status_code == 200
        again = await get(rig.http, url)
        assert again.status_code == 404 and again.content == b""
        unknown = await get(rig.http, rig.base + "/t/nonsense")
        assert unknown.status_code == 404 and unknown.content == b""
        rig.server.ticket_ttl = 0.0
        expired = rig.url(hit=True)
        assert (await get(rig.http, expired)).status_code == 404

    run(tmp_path, body)


def test_a_hit_gone_from_the_store_becomes_a_fill(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        resp = await get(rig.http, rig.url(hit=True))  # never stored: evicted, say
        assert resp.status_code == 200 and resp.content == rig.upstream.blob()
        assert rig.upstream.gets == 1
        assert rig.done == [("fill", rig.upstream.size)]
        assert await rig.store.get_small(link_key(LINK, rig.upstream.hex)) is not None
        assert (await get(rig.http, rig.url(hit=True))).content == rig.upstream.blob()
        assert rig.upstream.gets == 1

    run(tmp_path, body)


def test_eight_clients_of_an_uncached_blob_cause_one_upstream_get(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 8)
    up.pause_at = up.size // 2

    async def body(rig: Rig) -> None:
        early = [asyncio.create_task(get(rig.http, rig.url())) for _ in range(4)]
        await up.paused.wait()
        # A range of the first half ends only once that half is in the spool.
        first_half = await get(rig.http, rig.url(), {"Range": f"bytes=0-{up.size // 2 - 1}"})
        assert first_half.status_code == 206 and first_half.content == up.blob()[: up.size // 2]
        late = [asyncio.create_task(get(rig.http, rig.url())) for _ in range(4)]
        up.resume.set()
        for resp in await asyncio.gather(*early, *late):
            assert resp.status_code == 200 and resp.content == up.blob()
            assert resp.headers["content-length"] == str(up.size)
        assert up.gets == 1
        assert sorted(rig.done) == sorted([("fill", up.size)] * 8 + [("fill", up.size // 2)])

    run(tmp_path, body, up)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_corrupt_blob_fails_every_transfer_and_is_not_stored(tmp_path: Path, chunked: bool) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 4)
    up.corrupt = True
    up.chunked = chunked

    async def body(rig: Rig) -> None:
        gots = [bytearray() for _ in range(4)]
        outcomes = await asyncio.gather(*(get(rig.http, rig.url(), got=got) for got in gots), return_exceptions=True)
        for outcome, got in zip(outcomes, gots, strict=True):
            assert isinstance(outcome, httpx.RemoteProtocolError), outcome  # an incomplete body
            assert len(got) < up.size
        assert rig.store.local_path(blob_key(up.hex)) is None
        assert await rig.store.get_small(link_key(LINK, up.hex)) is None
        assert up.gets == 1
        assert os.listdir(rig.store.spool_dir()) == []

    run(tmp_path, body, up)


def test_the_first_client_leaving_mid_way_does_not_fail_the_others(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 4)
    up.pause_at = up.size // 2

    async def body(rig: Rig) -> None:
        first = await rig.http.send(rig.http.build_request("GET", rig.url()), stream=True)
        assert first.status_code == 200
        others = [asyncio.create_task(get(rig.http, rig.url())) for _ in range(3)]
        got = 0
        async for chunk in first.aiter_raw():
            got += len(chunk)
            if got >= 100_000:
                break
        await first.aclose()  # gone mid-way
        await up.paused.wait()
        up.resume.set()
        for resp in await asyncio.gather(*others):
            assert resp.status_code == 200 and resp.content == up.blob()
        assert up.gets == 1
        assert rig.store.local_path(blob_key(up.hex)) is not None

    run(tmp_path, body, up)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (404, {}),
        (401, {"WWW-Authenticate": 'Bearer realm="https://auth.example/token",service="registry"'}),
        (429, {"Retry-After": "30"}),
    ],
)
def test_upstream_statuses_are_answered_as_the_upstream_did(
    tmp_path: Path, status: int, headers: dict[str, str]
) -> None:
    up = BlobUpstream()
    up.status = status
    up.headers = headers

    async def body(rig: Rig) -> None:
        resp = await get(rig.http, rig.url())
        assert resp.status_code == status and resp.content == b""
        for name, value in headers.items():
            assert resp.headers[name] == value
        assert rig.store.local_path(blob_key(up.hex)) is None

    run(tmp_path, body, up)


def test_a_refused_upstream_is_a_502(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        resp = await get(rig.http, rig.url(upstream_url=refused_url()))
        assert resp.status_code == 502 and resp.content == b""

    run(tmp_path, body)


def test_a_256_mib_blob_fills_and_hits_with_flat_memory(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 256)

    async def body(rig: Rig) -> tuple[float, float, int]:
        async def discard(url: str) -> int:
            n = 0
            async with rig.http.stream("GET", url) as resp:
                assert resp.status_code == 200
                async for chunk in resp.aiter_raw():
                    n += len(chunk)
            return n

        tracemalloc.start()
        try:
            t0 = time.monotonic()
            assert await discard(rig.url()) == up.size
            t1 = time.monotonic()
            assert await discard(rig.url(hit=True)) == up.size
            t2 = time.monotonic()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert rig.done == [("fill", up.size), ("hit", up.size)]
        return t1 - t0, t2 - t1, peak

    fill_s, hit_s, peak = run(tmp_path, body, up)
    print(f"256 MiB: fill {256 / fill_s:.0f} MiB/s, hit {256 / hit_s:.0f} MiB/s, peak {peak / 2**20:.1f} MiB")
    assert peak < 32 * 2**20
