"""The cache's store in a directory (the embedded default): every key is a file below `root`.

Writes are atomic: the bytes go to a temporary file in `root/.tmp` and are renamed into place with
`os.replace`, so a reader sees the whole object or none. Fills spool what they download into
`spool_dir()` (`root/.spool`, on the store's file system), so that `put_file` is a rename too; a file
from another file system is copied into `root/.tmp` first. Names starting with a dot are not keys,
so these two directories never show in `entries`.

File I/O runs off the event loop. `read` reads each 256 KiB chunk in a thread (`asyncio.to_thread` per
chunk). Measured for a 256 MiB file in the page cache (2 vCPUs, three runs): a thread per chunk
1.8-2.6 GB/s (2.4-2.5 once warm), one thread for the whole read handing chunks over a bounded queue
1.9-2.2 GB/s; RSS flat (24 MiB) for both. The per-chunk form is as fast and simpler: nothing outlives a
read that is stopped or cancelled. Any OSError becomes a `StoreError` naming the operation and the key, never a full
path beyond the store's root.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from .store import Entry, StoreError, check_key

CHUNK = 256 * 1024
TMP = ".tmp"
SPOOL = ".spool"
STALE_TMP = 3600.0  # s: a temporary file older than this at start is a leftover of a crash


class FsStore:
    """A `Store` in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._start)
        except OSError as e:
            raise StoreError(f"store: cannot prepare the directory {self.root} ({_why(e)})") from None

    def _start(self) -> None:
        for d in (self.root, self.root / TMP, self.root / SPOOL):
            d.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_TMP
        for d in (self.root / TMP, self.root / SPOOL):
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(e.path)
                    except OSError:
                        pass

    async def aclose(self) -> None:
        return None

    def spool_dir(self) -> Path:
        """Where fills write their spool files: on the store's file system, so `put_file` is a rename."""
        return self.root / SPOOL

    # -- objects -----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    async def get_small(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StoreError(f"store: cannot read {key} ({_why(e)})") from None

    async def put_small(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as e:
            raise StoreError(f"store: cannot write {key} ({_why(e)})") from None

    def _temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.root / TMP, prefix="w-")

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = self._temp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def _replace(self, src: str | Path, path: Path) -> None:
        try:
            os.replace(src, path)
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, path)

    async def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StoreError(f"store: cannot stat {key} ({_why(e)})") from None
        return st.st_size

    async def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        try:
            await asyncio.to_thread(self._put_file, Path(path), target)
        except OSError as e:
            raise StoreError(f"store: cannot store {key} ({_why(e)})") from None

    def _put_file(self, src: Path, target: Path) -> None:
        try:
            self._replace(src, target)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        fd, tmp = self._temp()  # another file system: copy next to the target, then rename
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                shutil.copyfileobj(f, out, 1024 * 1024)
            self._replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        if start < 0 or (end is not None and end < start):
            raise StoreError(f"store: cannot read {key} (invalid range)")
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise StoreError(f"store: {key} is not in the store") from None
        except OSError as e:
            raise StoreError(f"store: cannot read {key} ({_why(e)})") from None
        try:
            if start:
                f.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                n = CHUNK if left is None else min(CHUNK, left)
                try:
                    chunk = await asyncio.to_thread(f.read, n)
                except OSError as e:
                    raise StoreError(f"store: cannot read {key} ({_why(e)})") from None
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def presign(self, key: str, expires: int) -> str | None:
        return None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StoreError(f"store: cannot delete {key} ({_why(e)})") from None

    async def entries(self, prefix: str) -> AsyncIterator[Entry]:
        try:
            found = await asyncio.to_thread(self._entries, prefix)
        except OSError as e:
            raise StoreError(f"store: cannot list {prefix} ({_why(e)})") from None
        for entry in found:
            yield entry

    def _entries(self, prefix: str) -> list[Entry]:
        """Every file whose key starts with `prefix`, walking only the directories that can hold one."""
        head, _, _ = prefix.rpartition("/")
        if head:
            check_key(head)
        found: list[Entry] = []
        stack = [head]
        while stack:
            rel = stack.pop()
            try:
                it = os.scandir(self.root / rel if rel else self.root)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    key = f"{rel}/{e.name}" if rel else e.name
                    if e.is_dir(follow_symlinks=False):
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append(key)
                    elif e.is_file(follow_symlinks=False) and key.startswith(prefix):
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        found.append(Entry(key, st.st_size, st.st_mtime))
        return found

    async def touch(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(os.utime, path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StoreError(f"store: cannot touch {key} ({_why(e)})") from None


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
