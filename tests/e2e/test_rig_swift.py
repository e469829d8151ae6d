"""The Swift rig (rig/swift.py) proven with the S3 client the proxy will use (aiobotocore) and with httpx.

- The node starts within its bound, answers S3, and is gone (every process group) once stopped.
- Objects: put, get, head, list (prefixes, pages), delete; the access log counts what was served.
- A multipart upload of 11 MiB in three parts; ranged GETs inside a part, across parts and from the end.
- Presigned GET URLs: fetched without credentials (also ranged); a tampered, moved or expired one is refused.
- What botocore's default checksum settings do against Swift 2.30 over HTTP and HTTPS, and DeleteObjects'
  Content-MD5 (see the rig's docstring).
- 256 MiB streamed up from a file and down with iter_chunks, and down a presigned URL with httpx: the
  throughput is printed (`-s`), the client's memory stays flat.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from botocore.exceptions import ClientError
from rig import procs, tls
from rig.swift import Swift
from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _bucket() -> str:
    return f"rig-{uuid.uuid4().hex[:12]}"


def _run(s3: Swift, body: Callable[[S3Client], Awaitable[None]], **client_kw: Any) -> None:
    """Run `body(client)` on a fresh event loop with a client for `s3`."""

    async def main() -> None:
        async with s3.client(**client_kw) as c:
            await body(c)

    asyncio.run(main())


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _http(s3: Swift) -> httpx.Client:
    verify: ssl.SSLContext | bool = True
    if s3.tls is not None:
        verify = ssl.create_default_context(cafile=str(s3.tls.ca_cert))
    return httpx.Client(timeout=60, trust_env=False, follow_redirects=False, verify=verify)


# -- life cycle ------------------------------------------------------------------------------------


def test_starts_answers_and_stops_every_process(tmp_path: Path) -> None:
    s3 = Swift(tmp_path / "swift")
    with s3:
        print(f"\nswift start: {s3.start_seconds:.2f} s (rings, configs, 4 servers, memcached, first S3 answer)")
        assert s3.start_seconds < s3.start_timeout
        assert s3.running()
        assert s3.endpoint_url == f"http://127.0.0.1:{s3.port}"
        for server in s3.servers:
            assert procs.port_open(procs.LOOPBACK, server.port), server.name
            assert os.getpgid(server.proc.pid) == server.proc.pid  # each leads its own group
        # Nothing was written outside the work dir: the rings and configs are there.
        names = {p.name for p in (tmp_path / "swift").iterdir()}
        assert {"swift.conf", "account.ring.gz", "container.ring.gz", "object.ring.gz", "srv"} <= names
        s3.create_bucket("lifecycle-bucket")
        assert [r.method for r in s3.wait_requests(2)][-1] == "PUT"
        pids = s3.pids()
        ports = [server.port for server in s3.servers]
    assert not s3.running()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not any(procs.port_open(procs.LOOPBACK, p) for p in ports)


# -- objects ---------------------------------------------------------------------------------------


def test_put_get_head_list_delete(swift_s3: Swift) -> None:
    s3 = swift_s3
    bucket = _bucket()
    s3.create_bucket(bucket)
    body = os.urandom(100_000)
    s3.clear_log()

    async def check(c: S3Client) -> None:
        names = [b.get("Name") for b in (await c.list_buckets()).get("Buckets", [])]
        assert bucket in names
        put = await c.put_object(
            Bucket=bucket,
            Key="dir/a.bin",
            Body=body,
            ContentType="application/octet-stream",
            Metadata={"digest": "sha256:abc"},
        )
        assert put["ETag"].strip('"') == hashlib.md5(body).hexdigest()
        for i in range(3):
            await c.put_object(Bucket=bucket, Key=f"dir/more/{i}", Body=b"x" * i)
        await c.put_object(Bucket=bucket, Key="top", Body=b"top")

        got = await c.get_object(Bucket=bucket, Key="dir/a.bin")
        assert await got["Body"].read() == body
        assert got["ContentLength"] == len(body)
        head = await c.head_object(Bucket=bucket, Key="dir/a.bin")
        assert head["ContentLength"] == len(body)
        assert head["ETag"] == put["ETag"]
        assert head["ContentType"] == "application/octet-stream"
        assert head["Metadata"] == {"digest": "sha256:abc"}

        listed = await c.list_objects_v2(Bucket=bucket)
        assert [o.get("Key") for o in listed.get("Contents", [])] == [
            "dir/a.bin",
            "dir/more/0",
            "dir/more/1",
            "dir/more/2",
            "top",
        ]
        assert {o.get("Key"): o.get("Size") for o in listed.get("Contents", [])}["dir/a.bin"] == len(body)
        folders = await c.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
        assert [o.get("Key") for o in folders.get("Contents", [])] == ["dir/a.bin"]
        assert [p.get("Prefix") for p in folders.get("CommonPrefixes", [])] == ["dir/more/"]
        page1 = await c.list_objects_v2(Bucket=bucket, MaxKeys=2)
        assert page1.get("IsTruncated") is True and page1.get("KeyCount") == 2
        page2 = await c.list_objects_v2(Bucket=bucket, MaxKeys=10, ContinuationToken=page1["NextContinuationToken"])
        assert [o.get("Key") for o in page2.get("Contents", [])] == ["dir/more/1", "dir/more/2", "top"]

        await c.delete_object(Bucket=bucket, Key="dir/a.bin")
        with pytest.raises(ClientError) as gone:
            await c.head_object(Bucket=bucket, Key="dir/a.bin")
        assert _status(gone.value) == 404
        with pytest.raises(ClientError) as missing:
            await c.get_object(Bucket=bucket, Key="dir/a.bin")
        assert _error_code(missing.value) == "NoSuchKey"
        with pytest.raises(ClientError) as no_bucket:
            await c.list_objects_v2(Bucket=_bucket())
        assert _error_code(no_bucket.value) == "NoSuchBucket"
        # A bucket with objects cannot go; an empty one can.
        with pytest.raises(ClientError) as not_empty:
            await c.delete_bucket(Bucket=bucket)
        assert _error_code(not_empty.value) == "BucketNotEmpty"
        for key in ("dir/more/0", "dir/more/1", "dir/more/2", "top"):
            await c.delete_object(Bucket=bucket, Key=key)
        await c.delete_bucket(Bucket=bucket)

    _run(s3, check)
    # ListBuckets, 5 PUT, GET, HEAD, 4 lists; DELETE, HEAD, GET, a list, DELETE bucket; 4 DELETE, DELETE bucket
    logged = s3.wait_requests(22)
    assert len(logged) == 22, logged
    put = next(r for r in logged if r.method == "PUT" and r.path == f"/{bucket}/dir/a.bin")
    assert (put.status, put.bytes_received) == (200, len(body))
    get = next(r for r in logged if r.method == "GET" and r.path == f"/{bucket}/dir/a.bin")
    assert (get.status, get.bytes_sent) == (200, len(body))
    assert s3.request_count("DELETE") == 7
    assert [r.status for r in logged if r.method == "HEAD"] == [200, 404]


def test_multipart_upload_and_ranged_gets(swift_s3: Swift) -> None:
    s3 = swift_s3
    bucket = _bucket()
    s3.create_bucket(bucket)
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB + 123)]
    whole = b"".join(parts)

    async def check(c: S3Client) -> None:
        mpu = await c.create_multipart_upload(Bucket=bucket, Key="big", ContentType="application/x-tar")
        upload_id = mpu["UploadId"]
        listed = await c.list_multipart_uploads(Bucket=bucket)
        assert [u.get("UploadId") for u in listed.get("Uploads", [])] == [upload_id]
        etags = []
        for n, data in enumerate(parts, start=1):
            r = await c.upload_part(Bucket=bucket, Key="big", UploadId=upload_id, PartNumber=n, Body=data)
            assert r["ETag"].strip('"') == hashlib.md5(data).hexdigest()
            etags.append(r["ETag"])
        got_parts = await c.list_parts(Bucket=bucket, Key="big", UploadId=upload_id)
        assert [p.get("Size") for p in got_parts.get("Parts", [])] == [len(p) for p in parts]
        done = await c.complete_multipart_upload(
            Bucket=bucket,
            Key="big",
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]},
        )
        # The S3 multipart ETag: md5 of the parts' md5s, "-" and the part count.
        expected_etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
        assert done.get("ETag", "").strip('"') == expected_etag
        head = await c.head_object(Bucket=bucket, Key="big")
        assert head["ContentLength"] == len(whole)
        assert head["ContentType"] == "application/x-tar"
        got = await c.get_object(Bucket=bucket, Key="big")
        assert hashlib.sha256(await got["Body"].read()).digest() == hashlib.sha256(whole).digest()
        assert not (await c.list_multipart_uploads(Bucket=bucket)).get("Uploads")

        for rng, start, end in [
            ("bytes=100-199", 100, 199),  # inside the first part
            (f"bytes={5 * MiB - 10}-{5 * MiB + 9}", 5 * MiB - 10, 5 * MiB + 9),  # across parts 1 and 2
            ("bytes=-50", len(whole) - 50, len(whole) - 1),  # the last 50 bytes
            (f"bytes={10 * MiB}-", 10 * MiB, len(whole) - 1),  # from an offset to the end
        ]:
            r = await c.get_object(Bucket=bucket, Key="big", Range=rng)
            assert r["ResponseMetadata"]["HTTPStatusCode"] == 206, rng
            assert r["ContentRange"] == f"bytes {start}-{end}/{len(whole)}", rng
            assert await r["Body"].read() == whole[start : end + 1], rng
        with pytest.raises(ClientError) as unsatisfiable:
            await c.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(whole)}-")
        assert _status(unsatisfiable.value) == 416

        # A part below 5 MiB that is not the last one: refused when the upload is completed.
        small = await c.create_multipart_upload(Bucket=bucket, Key="small")
        small_etags = []
        for n in (1, 2):
            r = await c.upload_part(
                Bucket=bucket, Key="small", UploadId=small["UploadId"], PartNumber=n, Body=b"s" * 1000
            )
            small_etags.append(r["ETag"])
        with pytest.raises(ClientError) as too_small:
            await c.complete_multipart_upload(
                Bucket=bucket,
                Key="small",
                UploadId=small["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(small_etags, start=1)]},
            )
        assert _error_code(too_small.value) == "EntityTooSmall"
        await c.abort_multipart_upload(Bucket=bucket, Key="small", UploadId=small["UploadId"])
        assert not (await c.list_multipart_uploads(Bucket=bucket)).get("Uploads")

        # Deleting the object deletes its segments too.
        await c.delete_object(Bucket=bucket, Key="big")
        assert not (await c.list_objects_v2(Bucket=bucket)).get("Contents")

    _run(s3, check)


# -- presigned URLs --------------------------------------------------------------------------------


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_presigned_get(swift_s3: Swift) -> None:
    s3 = swift_s3
    bucket = _bucket()
    s3.create_bucket(bucket)
    body = os.urandom(300_000)
    urls: dict[str, str] = {}

    async def sign(c: S3Client) -> None:
        await c.put_object(Bucket=bucket, Key="blobs/sha256/ab", Body=body)
        await c.put_object(Bucket=bucket, Key="blobs/sha256/cd", Body=b"other")
        urls["ok"] = await c.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "blobs/sha256/ab"}, ExpiresIn=300
        )
        urls["other"] = await c.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "blobs/sha256/cd"}, ExpiresIn=300
        )
        urls["short"] = await c.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "blobs/sha256/ab"}, ExpiresIn=1
        )

    _run(s3, sign)
    ok = urls["ok"]
    query = dict(parse_qsl(urlsplit(ok).query))
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Credential"].endswith(f"/{s3.region}/s3/aws4_request")
    assert ok.startswith(f"{s3.endpoint_url}/{bucket}/blobs/sha256/ab?")  # path-style

    signature = query["X-Amz-Signature"]
    tampered = _with_query(ok, **{"X-Amz-Signature": signature[:-1] + ("0" if signature[-1] != "0" else "1")})
    other_key = urls["other"].split("?")[0] + "?" + urlsplit(ok).query  # ab's signature on cd's path
    longer = _with_query(ok, **{"X-Amz-Expires": "3600"})  # a signed parameter changed
    unsigned = ok.split("?")[0]
    with _http(s3) as http:
        r = http.get(ok)
        assert r.status_code == 200, r.text
        assert r.content == body
        assert r.headers["content-length"] == str(len(body))
        ranged = http.get(ok, headers={"Range": "bytes=1000-1999"})
        assert ranged.status_code == 206
        assert ranged.content == body[1000:2000]
        assert http.head(ok).status_code == 403  # signed for GET, not HEAD
        for name, url in [("tampered", tampered), ("other key", other_key), ("longer", longer)]:
            refused = http.get(url)
            assert refused.status_code == 403, (name, refused.status_code, refused.text)
            assert b"SignatureDoesNotMatch" in refused.content, (name, refused.text)
        # Without S3 credentials s3api does not take the request: it goes on as a Swift API request, whose
        # path (no /v1/AUTH_...) the proxy refuses as malformed.
        anonymous = http.get(unsigned)
        assert anonymous.status_code == 400, anonymous.text
        # The one that expires in 1 s: after X-Amz-Date + 1 s (whole seconds) it is refused.
        time.sleep(2.1)
        expired = http.get(urls["short"])
        assert expired.status_code == 403, expired.text
        assert b"expired" in expired.content.lower()
    statuses = [(r.method, r.status) for r in s3.wait_requests(1) if r.path.startswith(f"/{bucket}/blobs/sha256/ab")]
    assert ("GET", 200) in statuses and ("GET", 206) in statuses and ("GET", 403) in statuses


# -- checksum settings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swift_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swift]:
    """Swift over HTTPS (a test CA's certificate for 127.0.0.1)."""
    base = tmp_path_factory.mktemp("rig-swift-tls")
    with Swift(base / "swift", tls=tls.make_ca(base / "ca")) as s3:
        yield s3


DEFAULT_CHECKSUMS = {"request_checksum_calculation": "when_supported", "response_checksum_validation": "when_supported"}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_botocore_default_checksums_against_swift_2_30(
    scheme: str, swift_s3: Swift, request: pytest.FixtureRequest
) -> None:
    s3: Swift = swift_s3 if scheme == "http" else request.getfixturevalue("swift_tls")
    assert s3.endpoint_url.startswith(f"{scheme}://")
    bucket = _bucket()
    s3.create_bucket(bucket)
    outcomes: dict[str, str] = {}

    async def attempt(name: str, call: Awaitable[Any]) -> None:
        try:
            await call
            outcomes[name] = "ok"
        except ClientError as e:
            outcomes[name] = f"{_status(e)} {_error_code(e)}"

    async def defaults(c: S3Client) -> None:
        await attempt("put", c.put_object(Bucket=bucket, Key="d", Body=b"d" * 1000))
        mpu = await c.create_multipart_upload(Bucket=bucket, Key="m")
        await attempt(
            "part", c.upload_part(Bucket=bucket, Key="m", UploadId=mpu["UploadId"], PartNumber=1, Body=b"p" * 1000)
        )
        await c.abort_multipart_upload(Bucket=bucket, Key="m", UploadId=mpu["UploadId"])

    async def when_required(c: S3Client) -> None:
        await attempt("put when_required", c.put_object(Bucket=bucket, Key="r", Body=b"r" * 1000))
        got = await c.get_object(Bucket=bucket, Key="r")
        assert await got["Body"].read() == b"r" * 1000
        mpu = await c.create_multipart_upload(Bucket=bucket, Key="m2")
        await attempt(
            "part when_required",
            c.upload_part(Bucket=bucket, Key="m2", UploadId=mpu["UploadId"], PartNumber=1, Body=b"p" * 1000),
        )
        await c.abort_multipart_upload(Bucket=bucket, Key="m2", UploadId=mpu["UploadId"])

    _run(s3, defaults, **DEFAULT_CHECKSUMS)
    _run(s3, when_required)
    if scheme == "https":
        # aws-chunked with an unsigned payload and a CRC32 trailer: Swift 2.30's s3api has no support for it.
        assert outcomes["put"] == outcomes["part"] == "501 NotImplemented", outcomes
    else:
        # Over HTTP botocore signs the payload and sends the CRC32 as a header, which Swift ignores.
        assert outcomes["put"] == outcomes["part"] == "ok", outcomes
    assert outcomes["put when_required"] == outcomes["part when_required"] == "ok", outcomes


def test_delete_objects_needs_content_md5(swift_s3: Swift) -> None:
    s3 = swift_s3
    bucket = _bucket()
    s3.create_bucket(bucket)
    keys = [f"k{i}" for i in range(5)]

    async def without_md5(c: S3Client) -> None:
        for k in keys:
            await c.put_object(Bucket=bucket, Key=k, Body=k.encode())
        with pytest.raises(ClientError) as refused:
            await c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "k0"}]})
        assert _error_code(refused.value) == "InvalidRequest"
        assert "Content-MD5" in str(refused.value)

    async def with_md5(c: S3Client) -> None:
        r = await c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in [*keys, "none"]]})
        assert sorted(d.get("Key", "") for d in r.get("Deleted", [])) == sorted([*keys, "none"])
        assert not r.get("Errors")
        assert not (await c.list_objects_v2(Bucket=bucket)).get("Contents")

    _run(s3, without_md5, delete_objects_md5=False)
    _run(s3, with_md5)


# -- streaming a large object ----------------------------------------------------------------------

BIG = 256 * MiB


class _PeakRSS:
    """Samples this process's resident set size every 20 ms on a thread (bounded by stop())."""

    def __init__(self) -> None:
        self.baseline = self.now()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        """The growth over the baseline, in bytes."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak - self.baseline


def _write_big_file(path: Path) -> str:
    """BIG bytes, not compressible, written 1 MiB at a time; returns their sha256."""
    block = bytearray(os.urandom(MiB))
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(BIG // MiB):
            block[:8] = i.to_bytes(8, "big")
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _mbps(n: int, seconds: float) -> str:
    return f"{n / MiB / seconds:.0f} MiB/s ({seconds:.2f} s)"


@pytest.mark.timeout(600)
def test_stream_256_mib_through_aiobotocore_and_presigned_url(swift_s3: Swift, tmp_path: Path) -> None:
    s3 = swift_s3
    bucket = _bucket()
    s3.create_bucket(bucket)
    src = tmp_path / "big.bin"
    expected = _write_big_file(src)
    results: dict[str, Any] = {}

    async def transfer(c: S3Client) -> None:
        rss = _PeakRSS()
        t0 = time.monotonic()
        with src.open("rb") as f:
            await c.put_object(Bucket=bucket, Key="big", Body=f, ContentLength=BIG)
        results["put"] = time.monotonic() - t0
        results["put_rss"] = rss.stop()

        rss = _PeakRSS()
        t0 = time.monotonic()
        got = await c.get_object(Bucket=bucket, Key="big")
        digest = hashlib.sha256()
        size = 0
        async for chunk in got["Body"].iter_chunks(MiB):
            digest.update(chunk)
            size += len(chunk)
        results["get"] = time.monotonic() - t0
        results["get_rss"] = rss.stop()
        assert (size, digest.hexdigest()) == (BIG, expected)
        results["url"] = await c.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "big"}, ExpiresIn=600
        )

    try:
        _run(s3, transfer, read_timeout=300)
        rss = _PeakRSS()
        t0 = time.monotonic()
        digest = hashlib.sha256()
        size = 0
        with _http(s3) as http, http.stream("GET", results["url"]) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes(MiB):
                digest.update(chunk)
                size += len(chunk)
        results["presigned"] = time.monotonic() - t0
        results["presigned_rss"] = rss.stop()
        assert (size, digest.hexdigest()) == (BIG, expected)
    finally:
        src.unlink(missing_ok=True)

    async def cleanup(c: S3Client) -> None:
        await c.delete_object(Bucket=bucket, Key="big")

    _run(s3, cleanup)
    proxy_pid = s3.servers[-1].proc.pid
    with open(f"/proc/{proxy_pid}/status") as f:
        proxy_hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(
        f"\n256 MiB: PUT {_mbps(BIG, results['put'])}, GET {_mbps(BIG, results['get'])}, "
        f"presigned GET (httpx) {_mbps(BIG, results['presigned'])}; client RSS growth: "
        f"PUT {results['put_rss'] // MiB} MiB, GET {results['get_rss'] // MiB} MiB, "
        f"presigned {results['presigned_rss'] // MiB} MiB; Swift proxy peak RSS {int(proxy_hwm) // 1024} MiB"
    )
    for key in ("put_rss", "get_rss", "presigned_rss"):
        assert results[key] < 64 * MiB, (key, results[key])  # streamed, not held in memory
