"""What the cache holds, in memory: the size and last use of every content object, for LRU eviction.

Only content keys count (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`; see `keys.content_hex`):
links and tag records are small and are not evicted. The index is rebuilt from the store at start
(`rebuild`: each entry's `used` is its last use, the file's mtime in a directory, LastModified in S3), so
the cache survives a restart; afterwards the cache tells it what happens (`added`, `used`, `removed`).

Eviction: when `total` exceeds `max_size`, a background task the index starts itself deletes the least
recently used unpinned objects until `total <= max_size`, at most `batch` deletes a round before it
yields to the event loop; it never runs on the request path. A pinned key (`with index.pin(key):`, taken
by every reader and writer of the object) is never evicted. A delete that fails is logged once per
round (no traceback) and retried after `retry_delay`; a key being deleted reads as absent (`size_of`,
`lookup`), so a request that races its eviction is a miss, not a broken read.

Replicas sharing one store (S3): each keeps its own index and evicts from its own view: its own uses,
and the other replicas' writes as the LastModified it saw at rebuild, or found later by `lookup`
(another replica may have stored an object this one has not seen: `lookup` asks the store and adds what
it finds). Uses by other replicas are not seen (S3 keeps no access time: `touch` is a no-op there), so
a replica may evict an object another one reads often; the other then misses and fills it again. Each
replica holds its own `max_size` against what it knows of, so give each replica the same `max_size`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from .keys import content_hex
from .store import Store, StoreError

logger = logging.getLogger(__name__)

TOUCH_EVERY = 60.0  # s: at most one store.touch per key in this time


@dataclass
class _Item:
    size: int
    used: float  # epoch seconds


class Index:
    """Sizes and last uses of the store's content, and the eviction that holds `max_size`."""

    def __init__(
        self,
        store: Store,
        max_size: int,
        on_evict: Callable[[str, int], None] | None = None,
        *,
        batch: int = 32,
        retry_delay: float = 5.0,
    ) -> None:
        self.store = store
        self.max_size = max_size
        self.on_evict = on_evict
        self.batch = max(1, batch)
        self.retry_delay = retry_delay
        self.evictions = 0
        self._items: OrderedDict[str, _Item] = OrderedDict()  # least recently used first
        self._total = 0
        self._pins: dict[str, int] = {}
        self._evicting: set[str] = set()
        self._touched: dict[str, float] = {}  # key -> monotonic time of the last store.touch
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._evictor: asyncio.Task[None] | None = None
        self._closed = False

    # -- what the cache tells it -------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Bytes of content the index knows of."""
        return self._total

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items and key not in self._evicting

    async def rebuild(self) -> None:
        """Forget everything and read the store's content (`blobs/`, `manifests/`) anew. Raises StoreError."""
        found: list[tuple[str, _Item]] = []
        for prefix in ("blobs/", "manifests/"):
            async for e in self.store.entries(prefix):
                if content_hex(e.key) is not None:
                    found.append((e.key, _Item(e.size, e.used)))
        found.sort(key=lambda kv: kv[1].used)
        self._items = OrderedDict(found)
        self._total = sum(item.size for _, item in found)
        self._touched.clear()
        self._kick()

    def size_of(self, key: str) -> int | None:
        """The object's size as the index knows it; None if unknown (or being evicted)."""
        item = self._items.get(key)
        return item.size if item is not None and key not in self._evicting else None

    async def lookup(self, key: str) -> int | None:
        """The object's size: the index's, else the store's (another replica may have stored it), which is
        then added. None if absent. Raises StoreError when the store cannot be asked."""
        if key in self._evicting:
            return None
        item = self._items.get(key)
        if item is not None:
            return item.size
        size = await self.store.size(key)
        if size is not None and key not in self._items and key not in self._evicting:
            self.added(key, size)
        return size if key not in self._evicting else None

    def used(self, key: str) -> None:
        """A use of the object now: it becomes the most recently used; the store is told (its mtime) in the
        background, at most once a minute per key."""
        item = self._items.get(key)
        if item is None:
            return
        item.used = time.time()
        self._items.move_to_end(key)
        now = time.monotonic()
        last = self._touched.get(key)
        if last is not None and now - last < TOUCH_EVERY:
            return
        self._touched[key] = now
        self._spawn(self._touch(key))

    def added(self, key: str, size: int) -> None:
        """The object was stored (or found) with this size; it counts as used now."""
        if content_hex(key) is None:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._total -= old.size
        self._items[key] = _Item(size, time.time())
        self._total += size
        self._touched[key] = time.monotonic()  # just written: its mtime is now
        self._kick()

    def removed(self, key: str) -> None:
        """The object is gone from the store (deleted, or found missing)."""
        item = self._items.pop(key, None)
        if item is not None:
            self._total -= item.size
        self._touched.pop(key, None)

    @contextlib.contextmanager
    def pin(self, key: str) -> Iterator[None]:
        """Keep the object from eviction while the block runs (readers and writers hold it)."""
        self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            n = self._pins[key] - 1
            if n:
                self._pins[key] = n
            else:
                del self._pins[key]
                if self._total > self.max_size:
                    self._kick()

    def pinned(self, key: str) -> bool:
        return key in self._pins

    def set_max_size(self, n: int) -> None:
        """A new `max_size` (a reload); eviction catches up in the background."""
        self.max_size = n
        self._kick()

    async def aclose(self) -> None:
        """Stop the eviction task and the pending touches."""
        self._closed = True
        tasks = [*self._tasks, *([self._evictor] if self._evictor is not None else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._evictor = None

    # -- in the background -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no event loop (a synchronous caller): nothing to run it on
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, key: str) -> None:
        try:
            await self.store.touch(key)
        except StoreError as e:
            logger.debug("cache: touch failed (%s)", e)

    def _kick(self) -> None:
        """Wake the eviction task (starting it on the running loop) when the index is over its size."""
        if self._closed or self._total <= self.max_size:
            return
        self._wake.set()
        if self._evictor is None or self._evictor.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # started by the next call made on a loop
            self._wake = asyncio.Event()
            self._wake.set()
            self._evictor = loop.create_task(self._evict_forever(), name="cache-eviction")

    async def _evict_forever(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._total > self.max_size and not self._closed:
                evicted, failed = await self._round()
                if failed:
                    await asyncio.sleep(self.retry_delay)
                elif not evicted:
                    break  # everything left is pinned: wait for an unpin, an addition or a new max_size
                else:
                    await asyncio.sleep(0)  # one bounded round, then the event loop's turn

    def _candidates(self) -> list[tuple[str, int]]:
        """The least recently used unpinned keys whose deletion brings the total to max_size (at most batch)."""
        excess = self._total - self.max_size
        chosen: list[tuple[str, int]] = []
        for key, item in self._items.items():
            if excess <= 0 or len(chosen) >= self.batch:
                break
            if key in self._pins or key in self._evicting:
                continue
            chosen.append((key, item.size))
            excess -= item.size
        return chosen

    async def _round(self) -> tuple[int, int]:
        """One round of at most `batch` deletes: (evicted, failed)."""
        evicted = failed = 0
        first_error = ""
        for key, size in self._candidates():
            if key in self._pins:  # pinned since the round began
                continue
            self._evicting.add(key)
            try:
                await self.store.delete(key)
            except StoreError as e:
                failed += 1
                first_error = first_error or str(e)
                continue
            finally:
                self._evicting.discard(key)
            item = self._items.get(key)
            if item is not None and item.size == size:
                self.removed(key)
            self.evictions += 1
            evicted += 1
            if self.on_evict is not None:
                try:
                    self.on_evict(key, size)
                except Exception as e:  # noqa: BLE001 - an observer must not stop eviction
                    logger.warning("cache: eviction observer failed (%s)", type(e).__name__)
        if failed:
            logger.warning(
                "cache: eviction could not delete %d object(s), retrying in %.0fs (%s)",
                failed,
                self.retry_delay,
                first_error,
            )
        return evicted, failed
