"""Fills (cache/fill.py) against a real HTTP upstream: the bytes, the commit and link, coalescing of readers
who join at the start and mid-way, corrupt, short and stalled upstreams, upstream statuses, a refused
connection, ranges, and closing with fills running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from regproxy.cache.fill import Fill, FillError, Fills, OpenUpstream
from regproxy.cache.index import Index
from regproxy.cache.keys import Link, blob_key, link_key
from regproxy.cache.store_fs import FsStore
from rig.blob_upstream import BlobUpstream

T = TypeVar("T")
LINK = "0123456789abcdef0123456789abcdef"
WAIT = 10.0


@dataclass
class Observed:
    events: list[tuple[str, str, object]] = field(default_factory=list)

    def fill_started(self, hex_digest: str) -> None:
        self.events.append(("started", hex_digest, None))

    def fill_done(self, hex_digest: str, size: int) -> None:
        self.events.append(("done", hex_digest, size))

    def fill_failed(self, hex_digest: str, reason: str) -> None:
        self.events.append(("failed", hex_digest, reason))


@dataclass
class Rig:
    store: FsStore
    index: Index
    fills: Fills
    upstream: BlobUpstream
    http: httpx.AsyncClient
    observed: Observed

    def opener(self, url: str | None = None) -> OpenUpstream:
        target = url or self.upstream.url
        return lambda: self.http.stream("GET", target)

    def fill(self, url: str | None = None) -> Fill:
        return self.fills.start_or_join(LINK, self.upstream.hex, self.opener(url))

    def spools(self) -> list[str]:
        return os.listdir(self.store.spool_dir())


def run(
    tmp_path: Path,
    body: Callable[[Rig], Awaitable[T]],
    upstream: BlobUpstream | None = None,
    idle_timeout: float = 60.0,
) -> T:
    async def main() -> T:
        up = upstream or BlobUpstream()
        await up.start()
        store = FsStore(tmp_path / "store")
        await store.start()
        index = Index(store, 1 << 40)
        observed = Observed()
        fills = Fills(store, index, store.spool_dir(), observed, idle_timeout=idle_timeout)
        http = httpx.AsyncClient(timeout=httpx.Timeout(WAIT), trust_env=False)
        try:
            async with asyncio.timeout(60):
                return await body(Rig(store, index, fills, up, http, observed))
        finally:
            await fills.aclose()
            await http.aclose()
            await index.aclose()
            await up.aclose()

    return asyncio.run(main())


async def collect(chunks: AsyncIterator[bytes], got: bytearray | None = None) -> bytes:
    out = bytearray() if got is None else got
    async for chunk in chunks:
        out += chunk
    return bytes(out)


async def stored(rig: Rig) -> tuple[bytes | None, bytes | None]:
    path = rig.store.local_path(blob_key(rig.upstream.hex))
    data = path.read_bytes() if path is not None else None
    return data, await rig.store.get_small(link_key(LINK, rig.upstream.hex))


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/blob"


def test_one_reader_gets_the_exact_bytes_and_the_blob_is_committed_and_linked(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        fill = rig.fill()
        st = await fill.start()
        assert (st.status, st.size) == (200, rig.upstream.size)
        assert await collect(fill.read()) == rig.upstream.blob()
        data, link = await stored(rig)
        assert data == rig.upstream.blob()
        assert link is not None and Link.load(link) == Link("blob", "application/octet-stream", rig.upstream.size)
        assert rig.index.size_of(blob_key(rig.upstream.hex)) == rig.upstream.size
        assert not rig.index.pinned(blob_key(rig.upstream.hex))
        assert rig.upstream.gets == 1
        assert fill.task is not None
        await fill.task
        assert rig.spools() == []
        assert [e[0] for e in rig.observed.events] == ["started", "done"]
        assert len(rig.fills) == 0
        # A read after the fill ended comes from the store.
        assert await collect(fill.read(5, 10)) == rig.upstream.blob()[5:10]

    run(tmp_path, body)


def test_eight_readers_one_upstream_get_some_joining_mid_way(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 4)
    up.pause_at = up.size // 2

    async def body(rig: Rig) -> None:
        early = [rig.fill() for _ in range(4)]
        assert all(f is early[0] for f in early)
        early_reads = [asyncio.create_task(collect(f.read())) for f in early]
        # Half the blob is in the spool once a read of the first half ends (the upstream is paused there).
        assert await collect(early[0].read(0, up.size // 2)) == up.blob()[: up.size // 2]
        assert up.paused.is_set() and early[0].written == up.size // 2
        assert rig.index.pinned(blob_key(up.hex))
        late = [rig.fill() for _ in range(4)]
        assert all(f is early[0] for f in late)
        late_reads = [asyncio.create_task(collect(f.read())) for f in late]
        await asyncio.sleep(0.05)  # let the late readers catch up with what is there
        assert not any(t.done() for t in early_reads + late_reads)  # the last byte is held back
        up.resume.set()
        results = await asyncio.gather(*early_reads, *late_reads)
        assert all(r == up.blob() for r in results)
        assert up.gets == 1
        assert (await stored(rig))[0] == up.blob()

    run(tmp_path, body, up)


def test_a_corrupt_blob_is_never_stored_and_no_reader_gets_all_of_it(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 3)
    up.corrupt = True

    async def body(rig: Rig) -> None:
        fill = rig.fill()
        gots = [bytearray() for _ in range(3)]
        reads = [asyncio.create_task(collect(fill.read(), got)) for got in gots]
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        for outcome, got in zip(outcomes, gots, strict=True):
            assert isinstance(outcome, FillError) and outcome.kind == "digest_mismatch"
            assert len(got) < up.size
        assert await stored(rig) == (None, None)
        assert blob_key(up.hex) not in rig.index
        assert rig.spools() == []
        assert ("failed", up.hex, "digest_mismatch") in rig.observed.events
        with pytest.raises(FillError):
            await collect(fill.read())

    run(tmp_path, body, up)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_short_blob_is_never_stored(tmp_path: Path, chunked: bool) -> None:
    up = BlobUpstream(os.urandom(1 << 20))
    up.short = True
    up.chunked = chunked

    async def body(rig: Rig) -> None:
        got = bytearray()
        with pytest.raises(FillError) as e:
            await collect(rig.fill().read(), got)
        assert len(got) < up.size
        assert e.value.kind in ("upstream_error", "digest_mismatch")
        assert await stored(rig) == (None, None)
        assert rig.spools() == []

    run(tmp_path, body, up)


def test_a_stalled_upstream_fails_the_fill_within_the_idle_bound(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20))
    up.pause_at = 1000

    async def body(rig: Rig) -> None:
        async with asyncio.timeout(5):
            with pytest.raises(FillError) as e:
                await collect(rig.fill().read())
        assert e.value.status == 504
        assert await stored(rig) == (None, None)
        assert rig.spools() == []
        up.resume.set()

    run(tmp_path, body, up, idle_timeout=0.5)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (404, {}),
        (401, {"www-authenticate": 'Bearer realm="https://auth.example/token",service="x"'}),
        (429, {"retry-after": "17"}),
        (500, {}),
    ],
)
def test_upstream_statuses_and_their_headers_are_passed_on(
    tmp_path: Path, status: int, headers: dict[str, str]
) -> None:
    up = BlobUpstream()
    up.status = status
    up.headers = headers

    async def body(rig: Rig) -> None:
        fill = rig.fill()
        st = await fill.start()
        assert (st.status, st.size, st.headers) == (status, None, headers)
        with pytest.raises(FillError):
            await collect(fill.read())
        assert await stored(rig) == (None, None)
        assert rig.observed.events[-1] == ("failed", up.hex, "upstream_error")
        assert len(rig.fills) == 0  # the next request asks the upstream again

    run(tmp_path, body, up)


def test_a_refused_connection_is_a_502(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        fill = rig.fill(refused_url())
        with pytest.raises(FillError) as e:
            await fill.start()
        assert e.value.status == 502 and "ConnectError" in e.value.reason
        with pytest.raises(FillError):
            await collect(fill.read())
        assert rig.spools() == []

    run(tmp_path, body)


def test_an_opener_that_times_out_is_a_504(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        @contextlib.asynccontextmanager
        async def slow() -> AsyncIterator[httpx.Response]:
            await asyncio.sleep(30)
            yield httpx.Response(200)

        fill = rig.fills.start_or_join(LINK, rig.upstream.hex, slow)
        with pytest.raises(FillError) as e:
            await fill.start()
        assert e.value.status == 504

    run(tmp_path, body, idle_timeout=0.3)


def test_ranges_of_a_fill_in_progress(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20), 2)
    up.pause_at = up.size // 2

    async def body(rig: Rig) -> None:
        fill = rig.fill()
        blob = up.blob()
        await up.paused.wait()
        # Before the pause point: served at once, the fill still running.
        assert await collect(fill.read(10, 1000)) == blob[10:1000]
        tail = asyncio.create_task(collect(fill.read(up.size - 100)))
        middle = asyncio.create_task(collect(fill.read(up.size // 2 - 10, up.size // 2 + 10)))
        await asyncio.sleep(0.05)
        assert not tail.done() and not middle.done()
        up.resume.set()
        assert await middle == blob[up.size // 2 - 10 : up.size // 2 + 10]
        assert await tail == blob[-100:]
        assert await collect(fill.read(up.size - 1, up.size + 50)) == blob[-1:]

    run(tmp_path, body, up)


def test_aclose_cancels_running_fills_and_removes_their_spools(tmp_path: Path) -> None:
    up = BlobUpstream(os.urandom(1 << 20))
    up.pause_at = 4096

    async def body(rig: Rig) -> None:
        fill = rig.fill()
        read = asyncio.create_task(collect(fill.read()))
        await up.paused.wait()
        assert len(rig.spools()) == 1
        await rig.fills.aclose()
        with pytest.raises(FillError) as e:
            await read
        assert e.value.kind == "cancelled"
        assert rig.spools() == []
        assert not rig.index.pinned(blob_key(up.hex))
        up.resume.set()

    run(tmp_path, body, up)


def test_a_store_failure_fails_the_fill(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        async def broken(key: str, path: Path) -> None:
            from regproxy.cache.store import StoreError

            raise StoreError("store: cannot store (disk full)")

        rig.store.put_file = broken  # type: ignore[method-assign]
        with pytest.raises(FillError) as e:
            await collect(rig.fill().read())
        assert e.value.kind == "store_error"
        assert rig.spools() == []
        assert await rig.store.get_small(link_key(LINK, rig.upstream.hex)) is None

    run(tmp_path, body)
