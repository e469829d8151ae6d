"""The directory store (cache/store_fs.py): keys, atomic writes, put_file by rename or copy, ranged reads,
entries, touch, and errors as StoreError."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from regproxy.cache.store import Store, StoreError
from regproxy.cache.store_fs import CHUNK, FsStore

T = TypeVar("T")
HEX = "ab" * 32
BLOB = f"blobs/sha256/{HEX}"


def run(f: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await f()

    return asyncio.run(main())


def started(root: Path) -> FsStore:
    s = FsStore(root)
    run(s.start)
    return s


async def collect(s: Store, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in s.read(key, start, end)])


def test_is_a_store(tmp_path: Path) -> None:
    s: Store = FsStore(tmp_path)
    assert s.local_path(BLOB) is None


def test_start_makes_the_directories_and_clears_old_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    s = started(root)
    assert (root / ".tmp").is_dir() and s.spool_dir() == root / ".spool" and s.spool_dir().is_dir()
    old, new = root / ".tmp" / "w-old", s.spool_dir() / "fresh"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    run(s.start)
    assert not old.exists() and new.exists()


def test_start_fails_cleanly_when_the_root_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot prepare"):
        run(FsStore(tmp_path / "file" / "store").start)


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".tmp/x", "a/.spool", "a\\b", "a\0b", "."]
)
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    s = started(tmp_path)
    for call in (
        lambda: s.get_small(key),
        lambda: s.put_small(key, b"x"),
        lambda: s.size(key),
        lambda: s.delete(key),
        lambda: s.touch(key),
        lambda: s.put_file(key, tmp_path / "nope"),
    ):
        with pytest.raises(StoreError, match="not a valid key"):
            run(call)
    with pytest.raises(StoreError):
        s.local_path(key)
    with pytest.raises(StoreError):
        run(lambda: collect(s, key))


def test_small_objects(tmp_path: Path) -> None:
    s = started(tmp_path)

    async def check() -> None:
        assert await s.get_small("tags/l/latest") is None
        assert await s.size("tags/l/latest") is None
        await s.put_small("tags/l/latest", b"one")
        await s.put_small("tags/l/latest", b"two!")
        assert await s.get_small("tags/l/latest") == b"two!"
        assert await s.size("tags/l/latest") == 4
        await s.delete("tags/l/latest")
        await s.delete("tags/l/latest")  # absent is fine
        assert await s.get_small("tags/l/latest") is None
        assert await s.get_small("tags/l/latest/below") is None  # a file in the way is not a directory

    run(check)
    assert os.listdir(tmp_path / ".tmp") == []  # no temporary file left


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = started(tmp_path)

    def fail(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StoreError) as info:
        run(lambda: s.put_small("tags/l/x", b"data"))
    assert str(info.value) == "store: cannot write tags/l/x (No space left on device)"
    assert os.listdir(tmp_path / ".tmp") == []
    assert run(lambda: s.get_small("tags/l/x")) is None


def test_put_file_renames_from_the_spool(tmp_path: Path) -> None:
    s = started(tmp_path)
    src = s.spool_dir() / "fill-1"
    src.write_bytes(b"blob bytes")
    ino = src.stat().st_ino
    run(lambda: s.put_file(BLOB, src))
    assert not src.exists()
    path = s.local_path(BLOB)
    assert path == tmp_path / BLOB and path.read_bytes() == b"blob bytes" and path.stat().st_ino == ino


def test_put_file_copies_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = started(tmp_path / "store")
    src = tmp_path / "elsewhere"
    src.write_bytes(b"x" * 3_000_000)
    real = os.replace

    def exdev(a: Any, b: Any) -> None:
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(a, b)

    monkeypatch.setattr(os, "replace", exdev)
    run(lambda: s.put_file(BLOB, src))
    assert (tmp_path / "store" / BLOB).read_bytes() == b"x" * 3_000_000
    assert src.exists()  # the caller deletes it
    assert os.listdir(tmp_path / "store" / ".tmp") == []


def test_put_file_of_a_missing_file(tmp_path: Path) -> None:
    s = started(tmp_path)
    with pytest.raises(StoreError, match=f"cannot store {BLOB}"):
        run(lambda: s.put_file(BLOB, tmp_path / "nope"))


def test_ranged_reads(tmp_path: Path) -> None:
    s = started(tmp_path)
    data = os.urandom(3 * CHUNK + 123)

    async def check() -> None:
        await s.put_small(BLOB, data)
        chunks = [c async for c in s.read(BLOB)]
        assert [len(c) for c in chunks] == [CHUNK, CHUNK, CHUNK, 123]
        assert b"".join(chunks) == data
        assert await collect(s, BLOB, 10, 20) == data[10:20]
        assert await collect(s, BLOB, CHUNK - 5, 2 * CHUNK + 5) == data[CHUNK - 5 : 2 * CHUNK + 5]
        assert await collect(s, BLOB, len(data) - 7) == data[-7:]
        assert await collect(s, BLOB, 5, 5) == b""
        assert await collect(s, BLOB, 0, len(data) + 100) == data  # past the end: to the end
        assert await collect(s, BLOB, len(data) + 1) == b""
        with pytest.raises(StoreError, match="invalid range"):
            await collect(s, BLOB, 20, 10)
        with pytest.raises(StoreError, match="is not in the store"):
            await collect(s, f"blobs/sha256/{'cd' * 32}")

    run(check)


def test_a_stopped_read_closes_its_file(tmp_path: Path) -> None:
    s = started(tmp_path)

    async def check() -> int:
        await s.put_small(BLOB, b"z" * (4 * CHUNK))
        before = len(os.listdir("/proc/self/fd"))
        it = s.read(BLOB)
        async for _ in it:
            break
        await it.aclose()  # type: ignore[attr-defined]
        return len(os.listdir("/proc/self/fd")) - before

    assert run(check) <= 0


def test_entries_walk_the_prefix(tmp_path: Path) -> None:
    s = started(tmp_path)
    keys = [f"blobs/sha256/{'1' * 64}", f"blobs/sha256/{'2' * 64}", f"manifests/sha256/{'3' * 64}", "tags/l/v1"]

    async def check() -> None:
        for i, k in enumerate(keys):
            await s.put_small(k, b"x" * (i + 1))
        (s.spool_dir() / "partial").write_bytes(b"not an entry")
        found = {e.key: e for e in [e async for e in s.entries("blobs/")]}
        assert sorted(found) == keys[:2]
        assert found[keys[1]].size == 2
        assert abs(found[keys[0]].used - time.time()) < 60
        assert [e.key async for e in s.entries("manifests/")] == [keys[2]]
        assert sorted([e.key async for e in s.entries("")]) == sorted(keys)
        assert [e.key async for e in s.entries("blobs/sha256/2")] == [keys[1]]
        assert [e.key async for e in s.entries("none/")] == []

    run(check)


def test_touch_sets_the_mtime(tmp_path: Path) -> None:
    s = started(tmp_path)

    async def check() -> float:
        await s.put_small(BLOB, b"x")
        os.utime(tmp_path / BLOB, (1000.0, 1000.0))
        assert [e.used async for e in s.entries("blobs/")] == [1000.0]
        await s.touch(BLOB)
        await s.touch(f"blobs/sha256/{'cd' * 32}")  # absent: nothing
        return (tmp_path / BLOB).stat().st_mtime

    assert abs(run(check) - time.time()) < 60


def test_presign_is_none_and_close_is_harmless(tmp_path: Path) -> None:
    s = started(tmp_path)
    assert run(lambda: s.presign(BLOB, 60)) is None
    run(s.aclose)


def test_os_errors_become_store_errors(tmp_path: Path) -> None:
    s = started(tmp_path)
    run(lambda: s.put_small(BLOB, b"x"))
    with pytest.raises(StoreError) as info:
        run(lambda: s.get_small("blobs/sha256"))  # a directory
    assert str(info.value) == "store: cannot read blobs/sha256 (Is a directory)"
    with pytest.raises(StoreError, match="cannot read blobs/sha256"):
        run(lambda: collect(s, "blobs/sha256"))
    with pytest.raises(StoreError, match="cannot write blobs/sha256"):
        run(lambda: s.put_small("blobs/sha256", b"x"))
