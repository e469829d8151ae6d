"""The LRU index (cache/index.py): order of eviction, pins, max_size held under a stream of additions, a
rebuild after a restart, bounded rounds, failing deletes, set_max_size, lookups that ask the store."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from regproxy.cache.index import Index
from regproxy.cache.keys import blob_key, manifest_key
from regproxy.cache.store import Entry, StoreError
from regproxy.cache.store_fs import FsStore

T = TypeVar("T")


def key(i: int, kind: str = "blob") -> str:
    hex_digest = f"{i:064x}"
    return blob_key(hex_digest) if kind == "blob" else manifest_key(hex_digest)


class MemStore:
    """A Store in memory that records deletes and can be told to fail or to be slow."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[int, float]] = {}
        self.deleted: list[str] = []
        self.touched: list[str] = []
        self.failing: set[str] = set()
        self.delete_delay = 0.0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def get_small(self, key: str) -> bytes | None:
        return None

    async def put_small(self, key: str, data: bytes) -> None:
        self.objects[key] = (len(data), time.time())

    async def size(self, key: str) -> int | None:
        found = self.objects.get(key)
        return found[0] if found else None

    async def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        return None

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        yield b""

    async def presign(self, key: str, expires: int) -> str | None:
        return None

    async def delete(self, key: str) -> None:
        if self.delete_delay:
            await asyncio.sleep(self.delete_delay)
        if key in self.failing:
            raise StoreError(f"store: cannot delete {key} (Permission denied)")
        self.deleted.append(key)
        self.objects.pop(key, None)

    async def entries(self, prefix: str) -> AsyncIterator[Entry]:
        for k, (size, used) in sorted(self.objects.items()):
            if k.startswith(prefix):
                yield Entry(k, size, used)

    async def touch(self, key: str) -> None:
        self.touched.append(key)


def run(f: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await f()

    return asyncio.run(main())


async def settle(index: Index, timeout: float = 5.0) -> None:
    """Until the eviction task has brought the index within max_size (or nothing more can go)."""
    deadline = time.monotonic() + timeout
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
        await asyncio.sleep(0 if turns < 100 else 0.01)
        if index.total <= index.max_size:
            await asyncio.sleep(0)
            return
    raise AssertionError(f"index over its size: {index.total} > {index.max_size}")


def test_least_recently_used_goes_first() -> None:
    store = MemStore()
    evicted: list[tuple[str, int]] = []

    async def check() -> None:
        index = Index(store, 300, lambda k, n: evicted.append((k, n)))
        for i in range(3):
            index.added(key(i), 100)
        index.used(key(0))  # 1 is now the least recently used
        index.added(key(3), 100)
        await settle(index)
        assert evicted == [(key(1), 100)]
        assert index.size_of(key(1)) is None and index.size_of(key(0)) == 100
        assert index.total == 300 and index.evictions == 1 and len(index) == 3
        await index.aclose()

    run(check)
    assert store.deleted == [key(1)]


def test_pinned_keys_are_never_evicted() -> None:
    store = MemStore()

    async def check() -> None:
        index = Index(store, 350)
        for i in range(3):
            index.added(key(i), 100)
        with index.pin(key(0)), index.pin(key(1)):
            with index.pin(key(0)):
                pass
            assert index.pinned(key(0))
            index.added(key(3), 100)
            await settle(index)
            assert store.deleted == [key(2)]  # 0 and 1 are older, but pinned
            index.added(key(4), 100)
            await settle(index)
            assert store.deleted == [key(2), key(3)]
            index.set_max_size(150)  # only 4 can go; then everything left is pinned
            await asyncio.sleep(0.05)
            assert store.deleted == [key(2), key(3), key(4)]
            assert index.total == 200 and index.max_size == 150
        # Unpinned: eviction catches up, oldest first.
        await settle(index)
        assert store.deleted == [key(2), key(3), key(4), key(0)]
        assert not index.pinned(key(0))
        await index.aclose()

    run(check)


def test_max_size_holds_under_a_stream_of_additions() -> None:
    store = MemStore()

    async def check() -> None:
        index = Index(store, 10_000, batch=4)
        peak = 0
        for i in range(500):
            index.added(key(i), 100 + i % 37)
            await settle(index)
            peak = max(peak, index.total)
        assert peak <= 10_000
        assert index.evictions == 500 - len(index)
        assert store.deleted == [key(i) for i in range(index.evictions)]  # strictly oldest first
        await index.aclose()

    run(check)


def test_rounds_are_bounded_and_yield_to_the_loop() -> None:
    store = MemStore()
    seen: list[int] = []

    async def check() -> None:
        index = Index(store, 1_000, batch=5)
        for i in range(100):
            index.added(key(i), 1_000)  # 99 to evict

        async def watcher() -> None:
            while index.total > index.max_size:
                seen.append(len(store.deleted))
                await asyncio.sleep(0)

        await asyncio.wait_for(watcher(), 5)
        assert index.total == 1_000 and index.evictions == 99
        await index.aclose()

    run(check)
    # Between two turns of another task, at most one round (5 deletes) ran.
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert steps and max(steps) <= 5, steps


def test_a_failing_delete_is_logged_once_per_round_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    store = MemStore()
    store.failing = {key(0), key(1)}
    caplog.set_level(logging.WARNING, "regproxy.cache.index")

    async def check() -> None:
        index = Index(store, 200, batch=10, retry_delay=0.05)
        for i in range(5):
            index.added(key(i), 100)
        await asyncio.sleep(0.02)
        assert store.deleted == [key(2), key(3), key(4)][: len(store.deleted)]
        # 0 and 1 stay (their deletes failed) and are retried; once the store lets them go, the size holds.
        assert index.size_of(key(0)) == 100
        await asyncio.sleep(0.12)
        store.failing.clear()
        await settle(index)
        assert index.size_of(key(0)) is None and index.size_of(key(1)) is None
        await index.aclose()

    run(check)
    warnings = [r for r in caplog.records if "eviction could not delete" in r.getMessage()]
    assert warnings and all("2 object(s)" in r.getMessage() or "1 object(s)" in r.getMessage() for r in warnings)
    assert all(r.exc_info is None for r in warnings)
    rounds_with_failures = len(warnings)
    assert 2 <= rounds_with_failures <= 10  # once per round, retried every retry_delay


def test_set_max_size_evicts_down_and_up() -> None:
    store = MemStore()

    async def check() -> None:
        index = Index(store, 10_000)
        for i in range(10):
            index.added(key(i), 1_000)
        await asyncio.sleep(0.02)
        assert index.evictions == 0
        index.set_max_size(4_500)
        await settle(index)
        assert index.total == 4_000 and store.deleted == [key(i) for i in range(6)]
        index.set_max_size(100_000)
        index.added(key(99), 1_000)
        await asyncio.sleep(0.02)
        assert index.evictions == 6
        await index.aclose()

    run(check)


def test_a_key_being_evicted_reads_as_absent() -> None:
    store = MemStore()
    store.delete_delay = 0.2

    async def check() -> None:
        index = Index(store, 100)
        store.objects[key(0)] = (100, time.time())
        index.added(key(0), 100)
        index.added(key(1), 100)
        await asyncio.sleep(0.05)  # the delete of 0 is under way
        assert index.size_of(key(0)) is None and key(0) not in index
        assert await index.lookup(key(0)) is None  # not re-added from the store meanwhile
        await settle(index)
        assert index.size_of(key(0)) is None and index.total == 100
        await index.aclose()

    run(check)


def test_lookup_asks_the_store_and_adds_what_it_finds() -> None:
    store = MemStore()

    async def check() -> None:
        index = Index(store, 1_000_000)
        store.objects[key(7)] = (1234, time.time())  # another replica stored it
        assert index.size_of(key(7)) is None
        assert await index.lookup(key(7)) == 1234
        assert index.size_of(key(7)) == 1234 and index.total == 1234
        assert await index.lookup(key(8)) is None
        index.removed(key(7))
        assert index.total == 0 and index.size_of(key(7)) is None
        index.removed(key(7))  # twice is fine
        await index.aclose()

    run(check)


def test_only_content_keys_count() -> None:
    index = Index(MemStore(), 1_000)
    index.added("tags/abc/latest", 100)
    index.added(f"links/abc/sha256/{'0' * 64}", 100)
    index.added(key(1, "manifest"), 100)
    assert index.total == 100 and len(index) == 1


def test_used_touches_the_store_at_most_once_a_minute() -> None:
    store = MemStore()

    async def check() -> None:
        index = Index(store, 1_000_000)
        store.objects[key(1)] = (10, 0.0)
        await index.rebuild()
        for _ in range(5):
            index.used(key(1))
        index.used(key(2))  # unknown: nothing
        index.added(key(3), 10)
        index.used(key(3))  # just written: its mtime is fresh
        await asyncio.sleep(0.02)
        await index.aclose()

    run(check)
    assert store.touched == [key(1)]


def test_rebuild_after_a_restart_keeps_sizes_and_order(tmp_path: Path) -> None:
    async def first() -> None:
        store = FsStore(tmp_path)
        await store.start()
        index = Index(store, 1_000_000)
        for i in range(4):
            await store.put_small(key(i, "blob" if i % 2 else "manifest"), b"x" * (100 * (i + 1)))
            index.added(key(i, "blob" if i % 2 else "manifest"), 100 * (i + 1))
        await store.put_small("tags/abc/latest", b"t")
        await store.put_small(f"blobs/sha256/{'z' * 64}", b"not content")  # not a digest: not counted
        for i, age in enumerate((50, 400, 300, 200)):  # last uses as the files' mtimes say
            path = tmp_path / key(i, "blob" if i % 2 else "manifest")
            os.utime(path, (time.time() - age, time.time() - age))
        await index.aclose()

    async def restarted() -> list[str]:
        store = FsStore(tmp_path)
        await store.start()
        index = Index(store, 1_000_000)
        await index.rebuild()
        assert index.total == 100 + 200 + 300 + 400 and len(index) == 4
        assert index.size_of(key(2, "manifest")) == 300 and index.size_of(key(1)) == 200
        index.set_max_size(500)  # the 400 and 300 s old go: keys 1 (200) and 2 (300)
        await settle(index)
        await index.aclose()
        return sorted(e.key for e in [e async for e in store.entries("")])

    run(first)
    left = run(restarted)
    assert left == sorted([key(0, "manifest"), key(3), "tags/abc/latest", f"blobs/sha256/{'z' * 64}"])


def test_aclose_stops_the_task() -> None:
    store = MemStore()
    store.delete_delay = 10

    async def check() -> None:
        index = Index(store, 10)
        index.added(key(0), 100)
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await index.aclose()
        assert time.monotonic() - t0 < 1
        index.added(key(1), 100)  # closed: no new task
        await asyncio.sleep(0.01)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "cache-eviction"]

    run(check)
