"""The spool file a fill downloads into: written and hashed in a thread, while readers follow it.

`make_spool` creates the file in the store's spool directory (on the store's filesystem for a directory
store, so that committing the blob is a rename). `SpoolWriter.write` takes the upstream's body chunk by
chunk and hands everything queued since its last write to one thread call that hashes and writes it, so
the event loop never does file I/O or hashing; a bounded queue holds the download back when the disk is
slower than the network. After each write it reports how many bytes are in the file (readers may read
them). Every failure is a `FillError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from .jobs import FillError

logger = logging.getLogger("regproxy.cache.fill")

QUEUE_CHUNKS = 64  # chunks the download may run ahead of the spool writer (httpx yields up to 64 KiB each)


def make_spool(spool_dir: Path) -> tuple[int, Path]:
    """A new spool file: its write descriptor and path."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix="fill-")
    return fd, Path(name)


class SpoolWriter:
    """Writes one download into the spool file open as `wfd`; `on_written(n)` after each write of n bytes."""

    def __init__(self, wfd: int, on_written: Callable[[int], None]) -> None:
        self.wfd = wfd
        self.on_written = on_written
        self._hash = hashlib.sha256()
        self._error: FillError | None = None

    def hexdigest(self) -> str:
        """The sha256 of everything written."""
        return self._hash.hexdigest()

    async def write(self, resp: httpx.Response, size: int | None, idle: float, what: str) -> int:
        """Write the whole body; the bytes received. More than `size` (announced), a body silent for `idle`
        seconds, or a write that fails raises FillError. `what` names the blob in log lines."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        writer = asyncio.get_running_loop().create_task(self._drain(queue))
        received = 0
        try:
            chunks = resp.aiter_bytes()
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await anext(chunks, None)
                except (httpx.TimeoutException, TimeoutError):
                    raise FillError("upstream stalled", 504) from None
                except (httpx.HTTPError, OSError) as e:
                    raise FillError(f"upstream body failed ({type(e).__name__})") from None
                if chunk is None:
                    break
                received += len(chunk)
                if size is not None and received > size:
                    logger.warning("cache: blob %s: more bytes than the %d announced", what, size)
                    raise FillError("upstream blob has the wrong size", kind="size_mismatch")
                if self._error is not None:
                    raise self._error
                async with asyncio.timeout(idle):  # the writer is slower than the network: wait for it
                    await queue.put(chunk)
            async with asyncio.timeout(idle):
                await queue.put(None)
                await writer
        except TimeoutError:
            raise FillError("spool write stalled", 503, kind="store_error") from None
        finally:
            if not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if self._error is not None:
            raise self._error
        return received

    async def _drain(self, queue: asyncio.Queue[bytes | None]) -> None:
        """Hash and write what the download queued, everything queued at once per thread call."""
        while True:
            batch: list[bytes] = []
            item = await queue.get()
            end = item is None
            if item is not None:
                batch.append(item)
            while not end and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    end = True
                else:
                    batch.append(item)
            if batch and self._error is None:
                try:
                    await asyncio.to_thread(self._absorb, batch)
                except OSError as e:
                    logger.warning("cache: cannot write a spool file (%s)", e.strerror or type(e).__name__)
                    self._error = FillError("spool write failed", 503, kind="store_error")
                else:
                    self.on_written(sum(len(c) for c in batch))
            if end:
                return

    def _absorb(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.wfd, view) :]
