"""The S3 store (cache/store_s3.py) against a real S3-compatible server: OpenStack Swift with s3api (the
`swift_s3` fixture, tests/rig/swift.py).

- Small objects: put, get, size, replace, delete; a missing key reads as None.
- put_file: one PUT below part_size; a multipart upload (5 MiB parts, a ~12 MiB file) at or above it; a
  failed multipart upload leaves neither an object nor an upload in progress.
- Ranged reads, streamed in chunks; a missing key is a StoreError.
- A presigned URL fetched with httpx (whole and ranged); a tampered one is refused.
- entries under the store's prefix, with sizes and LastModified; keys outside the prefix are not seen.
- start() on a missing bucket, with wrong credentials and on a dead endpoint: a StoreError with a clean
  message. No StoreError text holds a secret or a URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from regproxy.cache.settings import S3Settings
from regproxy.cache.store import Store, StoreError
from regproxy.cache.store_s3 import S3Store
from rig import procs
from rig.swift import Swift

pytestmark = pytest.mark.e2e

T = TypeVar("T")
MiB = 1 << 20
BLOB = f"blobs/sha256/{'ab' * 32}"
MANIFEST = f"manifests/sha256/{'cd' * 32}"


def settings(s3: Swift, bucket: str, prefix: str = "rp/", **kw: object) -> S3Settings:
    fields: dict[str, object] = {
        "bucket": bucket,
        "prefix": prefix,
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
    }
    fields.update(kw)
    return S3Settings(**fields)  # type: ignore[arg-type]


def new_bucket(s3: Swift) -> str:
    name = f"cache-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def with_store(store: S3Store, body: Callable[[S3Store], Awaitable[T]]) -> T:
    async def main() -> T:
        await store.start()
        try:
            return await body(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


async def collect(s: Store, key: str, start: int = 0, end: int | None = None) -> tuple[bytes, list[int]]:
    chunks = [c async for c in s.read(key, start, end)]
    return b"".join(chunks), [len(c) for c in chunks]


def assert_clean(message: str, s3: Swift) -> None:
    for secret in (s3.secret_access_key, "X-Amz-Signature", "X-Amz-Credential", "Signature=", "http://", "https://"):
        assert secret not in message, (secret, message)


def test_small_objects(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket))
    _: Store = store

    async def check(s: S3Store) -> None:
        assert await s.get_small("tags/l/latest") is None
        assert await s.size("tags/l/latest") is None
        await s.put_small("tags/l/latest", b"one")
        await s.put_small("tags/l/latest", b"two!")
        assert await s.get_small("tags/l/latest") == b"two!"
        assert await s.size("tags/l/latest") == 4
        assert s.local_path("tags/l/latest") is None
        await s.touch("tags/l/latest")  # nothing to do
        await s.delete("tags/l/latest")
        await s.delete("tags/l/latest")  # absent is fine
        assert await s.get_small("tags/l/latest") is None
        with pytest.raises(StoreError, match="not a valid key"):
            await s.get_small("../escape")
        async with swift_s3.client() as c:  # under the prefix
            listed = await c.list_objects_v2(Bucket=bucket)
            assert not listed.get("Contents")
            await s.put_small("x/y", b"z")
            listed = await c.list_objects_v2(Bucket=bucket)
            assert [o.get("Key") for o in listed.get("Contents", [])] == ["rp/x/y"]

    with_store(store, check)


def _file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_put_file_single_and_multipart(swift_s3: Swift, tmp_path: Path) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket, prefix=""), part_size=5 * MiB)
    small = _file(tmp_path / "small", 4 * MiB)
    big = _file(tmp_path / "big", 12 * MiB + 12345)

    async def check(s: S3Store) -> None:
        swift_s3.clear_log()
        await s.put_file(MANIFEST, tmp_path / "small")
        await s.put_file(BLOB, tmp_path / "big")
        assert await s.size(MANIFEST) == len(small)
        assert await s.size(BLOB) == len(big)
        got, _ = await collect(s, BLOB)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        got, _ = await collect(s, MANIFEST)
        assert got == small

    with_store(store, check)
    requests = swift_s3.wait_requests(4)
    assert [(r.method, r.status) for r in requests if r.path.startswith(f"/{bucket}/{MANIFEST}")][:1] == [("PUT", 200)]
    uploads = [r for r in requests if r.path.startswith(f"/{bucket}/{BLOB}") and r.method in ("PUT", "POST")]
    parts = [r for r in uploads if r.method == "PUT" and "partNumber" in r.path]
    assert len(parts) == 3, [r.path for r in uploads]  # 5 + 5 + 2 MiB
    assert max(r.bytes_received for r in parts) <= 5 * MiB + 64 * 1024
    assert (tmp_path / "big").exists()  # the caller deletes its file


def test_a_failed_multipart_upload_leaves_nothing(
    swift_s3: Swift, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket), part_size=5 * MiB)
    _file(tmp_path / "big", 11 * MiB)

    async def check(s: S3Store) -> None:
        real = s.client.upload_part
        calls = 0

        async def fail_second(**kw: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OSError("connection reset")
            return await real(**kw)  # type: ignore[arg-type]

        monkeypatch.setattr(s.client, "upload_part", fail_second)
        with pytest.raises(StoreError) as info:
            await s.put_file(BLOB, tmp_path / "big")
        assert str(info.value) == f"store: s3 upload {BLOB} failed (OSError)"
        assert await s.size(BLOB) is None
        async with swift_s3.client() as c:
            uploads = await c.list_multipart_uploads(Bucket=bucket)
            assert not uploads.get("Uploads"), uploads  # aborted

    with_store(store, check)


def test_ranged_reads_stream_in_chunks(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket))
    data = os.urandom(3 * MiB + 7)

    async def check(s: S3Store) -> None:
        await s.put_small(BLOB, data)
        whole, sizes = await collect(s, BLOB)
        assert whole == data and len(sizes) >= 12 and max(sizes) <= 256 * 1024
        assert (await collect(s, BLOB, 10, 20))[0] == data[10:20]
        assert (await collect(s, BLOB, MiB - 3, 2 * MiB + 3))[0] == data[MiB - 3 : 2 * MiB + 3]
        assert (await collect(s, BLOB, len(data) - 5))[0] == data[-5:]
        assert (await collect(s, BLOB, 4, 4))[0] == b""
        assert (await collect(s, BLOB, len(data) + 10))[0] == b""
        with pytest.raises(StoreError, match="invalid range"):
            await collect(s, BLOB, 9, 3)
        with pytest.raises(StoreError) as missing:
            await collect(s, MANIFEST)
        assert str(missing.value) == f"store: {MANIFEST} is not in the store"
        # A read stopped early releases its connection: many of them in a row do not exhaust the pool.
        for _ in range(80):
            it = s.read(BLOB)
            async for _chunk in it:
                break
            await it.aclose()  # type: ignore[attr-defined]
        assert (await collect(s, BLOB, 0, 3))[0] == data[:3]

    with_store(store, check)


def test_presigned_urls(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket, redirect=True, url_expiry=60))
    data = os.urandom(100_000)

    async def check(s: S3Store) -> str:
        await s.put_small(BLOB, data)
        url = await s.presign(BLOB, 60)
        assert url is not None
        return url

    url = with_store(store, check)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert parts.path == f"/{bucket}/rp/{BLOB}" and query["X-Amz-Expires"] == "60"
    tampered = urlunsplit(parts._replace(query=urlencode({**query, "X-Amz-Signature": "0" * 64})))
    other_key = url.replace(BLOB, MANIFEST)
    with httpx.Client(timeout=30, trust_env=False) as http:
        ok = http.get(url)
        assert ok.status_code == 200 and ok.content == data
        ranged = http.get(url, headers={"Range": "bytes=100-199"})
        assert ranged.status_code == 206 and ranged.content == data[100:200]
        for bad in (tampered, other_key):
            refused = http.get(bad)
            assert refused.status_code == 403 and b"SignatureDoesNotMatch" in refused.content


def test_entries_under_the_prefix(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket, prefix="a/b/"))
    keys = [f"blobs/sha256/{i:064x}" for i in range(5)]

    async def check(s: S3Store) -> None:
        t0 = time.time()
        for i, k in enumerate(keys):
            await s.put_small(k, b"x" * (i + 1))
        await s.put_small(MANIFEST, b"m")
        async with swift_s3.client() as c:
            await c.put_object(Bucket=bucket, Key="a/blobs/sha256/outside", Body=b"o")
        found = [e async for e in s.entries("blobs/")]
        assert [e.key for e in found] == keys
        assert [e.size for e in found] == [1, 2, 3, 4, 5]
        assert all(t0 - 5 <= e.used <= time.time() + 5 for e in found)
        assert [e.key async for e in s.entries("manifests/")] == [MANIFEST]
        assert [e.key async for e in s.entries("tags/")] == []
        for k in keys[:2]:
            await s.delete(k)
        assert [e.key async for e in s.entries("blobs/")] == keys[2:]

    with_store(store, check)


def test_entries_page_through_many_objects(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket))

    async def check(s: S3Store) -> None:
        keys = [f"blobs/sha256/{i:064x}" for i in range(1005)]
        sem = asyncio.Semaphore(32)

        async def put(k: str) -> None:
            async with sem:
                await s.put_small(k, b"")

        await asyncio.gather(*(put(k) for k in keys))
        assert [e.key async for e in s.entries("blobs/")] == keys  # more than one page of 1000

    with_store(store, check)


def _start_error(store: S3Store) -> str:
    async def main() -> str:
        with pytest.raises(StoreError) as info:
            await store.start()
        await store.aclose()
        return str(info.value)

    return asyncio.run(main())


def test_start_checks_the_bucket(swift_s3: Swift) -> None:
    missing = _start_error(S3Store(settings(swift_s3, "no-such-bucket-here")))
    assert missing == "store: the bucket no-such-bucket-here does not exist"
    wrong = _start_error(S3Store(settings(swift_s3, new_bucket(swift_s3), secret_access_key="wrong-secret-value")))
    assert "403" in wrong and "wrong-secret-value" not in wrong
    dead = _start_error(
        S3Store(settings(swift_s3, "cache", endpoint_url=f"http://{procs.LOOPBACK}:{procs.free_port()}"))
    )
    assert dead == "store: s3 check the bucket cache failed (cannot reach the S3 endpoint)"
    for message in (missing, wrong, dead):
        assert_clean(message, swift_s3)


def test_no_secret_in_any_store_error(swift_s3: Swift) -> None:
    bucket = new_bucket(swift_s3)
    store = S3Store(settings(swift_s3, bucket))
    messages: list[str] = []

    async def check(s: S3Store) -> None:
        await s.put_small(BLOB, b"x")
        async with swift_s3.client() as c:
            # The bucket goes away under the store: every operation fails with S3's answer.
            await c.delete_object(Bucket=bucket, Key=f"rp/{BLOB}")
            await c.delete_bucket(Bucket=bucket)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: s.put_small(BLOB, b"y"),
            lambda: collect(s, BLOB),
            lambda: s.get_small(BLOB),
            lambda: s.size(BLOB),
        ]
        for call in calls:
            try:
                await call()
            except StoreError as e:
                messages.append(str(e))
        with pytest.raises(StoreError) as listed:
            _ = [e async for e in s.entries("blobs/")]
        messages.append(str(listed.value))

    with_store(store, check)
    assert len(messages) >= 3, messages
    for m in messages:
        assert_clean(m, swift_s3)
        assert swift_s3.access_key_id not in m
    assert any("NoSuchBucket" in m for m in messages), messages
