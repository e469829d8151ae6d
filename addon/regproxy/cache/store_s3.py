"""The cache's store in an S3-compatible bucket (`cache.store: s3://BUCKET/PREFIX`), shared by replicas.

The client is aiobotocore: asyncio-native (its HTTP is aiohttp, so a transfer never blocks the event loop
or needs a thread per request), and it is botocore underneath, the same request signing (SigV4,
presigned URLs), endpoints and error codes as boto3 — nothing here signs a request by hand. obstore was
the other candidate; aiobotocore's botocore is the S3 client most S3-compatible servers are tested with,
and the tests' Swift rig was proven with it (tests/rig/swift.py).

Client settings: path-style addressing (`endpoint/bucket/key`: works with every S3-compatible server and
with bucket names holding dots); `request_checksum_calculation` and `response_checksum_validation`
"when_required" (botocore's default sends aws-chunked uploads with CRC32 trailers over HTTPS, which
Swift 2.30's s3api refuses with 501; the content's SHA-256 is checked by the cache itself); bounded
connect (10 s) and read (60 s per socket read) timeouts; two attempts for a failed request.

Keys live under the settings' prefix. Objects are written whole: `put_object`, or for a file of
`part_size` or more a multipart upload, read from the file one part at a time (one part in memory) and
aborted on any failure, so no partial object is ever visible. `read` is a ranged GET streamed in chunks.
`touch` does nothing (S3 has no access time; the index keeps this replica's uses). Errors become
`StoreError` naming the operation, the key and the S3 error code: never credentials, never a URL (a
presigned URL's query is its signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from .settings import S3Settings
from .store import Entry, StoreError, check_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK = 256 * 1024
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_PARTS = 10_000
MAX_EXPIRY = 7 * 86400  # SigV4's longest presigned URL
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
# What an S3 call raises when it fails: the server's answer, botocore's own, the connection's, a timeout.
S3_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


class S3Store:
    """A `Store` in an S3 bucket, under a prefix."""

    def __init__(self, settings: S3Settings, *, part_size: int = 16 * MiB) -> None:
        if part_size < MIN_PART:
            raise ValueError("part_size: S3 parts are at least 5 MiB")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.part_size = part_size
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: S3Client | None = None

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and check the bucket (HEAD). Raises StoreError when it is missing or unreachable."""
        if self._client is not None:
            return
        s = self.settings
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": 2, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=64,
        )
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=s.endpoint_url,
                    region_name=s.region or "us-east-1",
                    aws_access_key_id=s.access_key_id,
                    aws_secret_access_key=s.secret_access_key,
                    config=config,
                )
            )
        except (BotoCoreError, ValueError) as e:
            await stack.aclose()
            raise StoreError(f"store: cannot set up the S3 client ({type(e).__name__})") from None
        try:
            await client.head_bucket(Bucket=self.bucket)
        except BaseException as e:
            await stack.aclose()
            if isinstance(e, ClientError) and _status(e) == 404:
                raise StoreError(f"store: the bucket {self.bucket} does not exist") from None
            if isinstance(e, ClientError) and _status(e) == 403:
                raise StoreError(f"store: access to the bucket {self.bucket} is denied (HTTP 403)") from None
            if isinstance(e, Exception):
                raise _error("check the bucket", self.bucket, e) from None
            raise
        self._stack, self._client = stack, client

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise StoreError("store: the S3 store is not started")
        return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    # -- objects -----------------------------------------------------------------------------------

    async def get_small(self, key: str) -> bytes | None:
        k = self._key(key)
        try:
            resp = await self.client.get_object(Bucket=self.bucket, Key=k)
            async with resp["Body"] as body:
                return await body.read()
        except S3_ERRORS as e:
            if _missing(e):
                return None
            raise _error("get", key, e) from None

    async def put_small(self, key: str, data: bytes) -> None:
        k = self._key(key)
        try:
            await self.client.put_object(Bucket=self.bucket, Key=k, Body=data)
        except S3_ERRORS as e:
            raise _error("put", key, e) from None

    async def size(self, key: str) -> int | None:
        k = self._key(key)
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=k)
        except S3_ERRORS as e:
            if _missing(e):
                return None
            raise _error("head", key, e) from None
        return int(head["ContentLength"])

    async def put_file(self, key: str, path: Path) -> None:
        k = self._key(key)
        try:
            size = (await asyncio.to_thread(os.stat, path)).st_size
        except OSError as e:
            raise StoreError(f"store: cannot read the file for {key} ({e.strerror or type(e).__name__})") from None
        if size < self.part_size:
            try:
                data = await asyncio.to_thread(Path(path).read_bytes)
            except OSError as e:
                raise StoreError(f"store: cannot read the file for {key} ({e.strerror or type(e).__name__})") from None
            try:
                await self.client.put_object(Bucket=self.bucket, Key=k, Body=data)
            except S3_ERRORS as e:
                raise _error("put", key, e) from None
            return
        await self._multipart(key, k, Path(path), size)

    async def _multipart(self, key: str, k: str, path: Path, size: int) -> None:
        """A multipart upload, one part in memory at a time; aborted on any failure (cancellation too)."""
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        try:
            upload = await self.client.create_multipart_upload(Bucket=self.bucket, Key=k)
        except S3_ERRORS as e:
            raise _error("start an upload of", key, e) from None
        upload_id = upload["UploadId"]
        try:
            await self._parts(key, k, path, upload_id, part_size)
        except BaseException as e:
            await asyncio.shield(self._abort(key, k, upload_id))
            if isinstance(e, Exception):
                raise _error("upload", key, e) from None
            raise

    async def _parts(self, key: str, k: str, path: Path, upload_id: str, part_size: int) -> None:
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except OSError as e:
            raise StoreError(f"store: cannot read the file for {key} ({e.strerror or type(e).__name__})") from None
        parts: list[CompletedPartTypeDef] = []
        try:
            number = 1
            while True:
                try:
                    data = await asyncio.to_thread(f.read, part_size)
                except OSError as e:
                    raise StoreError(
                        f"store: cannot read the file for {key} ({e.strerror or type(e).__name__})"
                    ) from None
                if not data:
                    break
                part = await self.client.upload_part(
                    Bucket=self.bucket, Key=k, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
                number += 1
        finally:
            f.close()
        await self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    async def _abort(self, key: str, k: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 - the upload failed already; this is the clean-up
            logger.warning("%s (its parts stay until the bucket's lifecycle removes them)", _error("abort", key, e))

    def local_path(self, key: str) -> Path | None:
        return None

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        k = self._key(key)
        if start < 0 or (end is not None and end < start):
            raise StoreError(f"store: cannot read {key} (invalid range)")
        if end == start:
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": k}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = await self.client.get_object(**args)
        except S3_ERRORS as e:
            if _missing(e):
                raise StoreError(f"store: {key} is not in the store") from None
            if isinstance(e, ClientError) and _status(e) == 416:
                return  # from past the end: nothing, as in a directory
            raise _error("get", key, e) from None
        async with resp["Body"] as body:
            while True:
                try:
                    chunk = await body.read(CHUNK)
                except S3_ERRORS as e:
                    raise _error("read", key, e) from None
                if not chunk:
                    break
                yield chunk

    async def presign(self, key: str, expires: int) -> str | None:
        k = self._key(key)
        expires = max(1, min(int(expires), MAX_EXPIRY))
        try:
            return await self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": k}, ExpiresIn=expires
            )
        except S3_ERRORS as e:
            raise _error("presign", key, e) from None

    async def delete(self, key: str) -> None:
        k = self._key(key)
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=k)
        except S3_ERRORS as e:
            if _missing(e):
                return
            raise _error("delete", key, e) from None

    async def entries(self, prefix: str) -> AsyncIterator[Entry]:
        full = self.prefix + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full)
        it = aiter(pages)
        while True:
            try:
                page = await anext(it)
            except StopAsyncIteration:
                return
            except S3_ERRORS as e:
                raise _error("list", prefix or "/", e) from None
            for obj in page.get("Contents", []):
                name = obj.get("Key", "")
                if not name.startswith(self.prefix):
                    continue
                modified = obj.get("LastModified")
                yield Entry(
                    name[len(self.prefix) :], int(obj.get("Size", 0)), modified.timestamp() if modified else 0.0
                )

    async def touch(self, key: str) -> None:
        check_key(key)


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(e: ClientError) -> str:
    code = str(e.response.get("Error", {}).get("Code", "") or "")
    return "".join(c for c in code if c.isalnum())[:40] or "no code"


def _missing(e: BaseException) -> bool:
    return isinstance(e, ClientError) and (_status(e) == 404 or _code(e) in ("NoSuchKey", "NotFound", "404"))


def _error(op: str, key: str, e: BaseException) -> StoreError:
    """A StoreError for a failed S3 call: the operation, the key and what went wrong, and nothing else (botocore's
    own messages may quote the request's URL)."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, ClientError):
        why = f"{_code(e)}, HTTP {_status(e)}"
    elif isinstance(e, NoCredentialsError):
        why = "no credentials"
    elif isinstance(e, (ConnectTimeoutError, ReadTimeoutError, asyncio.TimeoutError)):
        why = "timed out"
    elif isinstance(e, EndpointConnectionError):
        why = "cannot reach the S3 endpoint"
    elif isinstance(e, (BotoCoreError, aiohttp.ClientError)):
        why = type(e).__name__
    else:
        why = type(e).__name__
    return StoreError(f"store: s3 {op} {key} failed ({why})")
