"""The limits' store over the proxy's life: the one the configuration names, and whether it answers.

`StoreKeeper` opens the store the configuration asks for (Redis at `redis_url`, shared by replicas;
else this process's memory) when a request first needs one, opens a new one when a reload changes
`redis_url` (the old one is closed beside the flows that may still be using it), and closes the last
one when the proxy stops. It also keeps the failure bookkeeping: every failure is counted
(`registryproxy_limit_store_failures`), the first of a run is logged with what the proxy does until
the store answers again (`on_store_failure`: serve without limits, or answer 503), and so is the
store's return. What a failure means for a request is the caller's decision. Nothing here imports
mitmproxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..ops.metrics import Metrics
from .settings import FailMode
from .store import MemoryStore, Store, StoreError
from .store_redis import RedisStore

logger = logging.getLogger("registryproxy")

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def open_store(redis_url: str | None) -> Store:
    """Redis at `redis_url`, shared by every process that names it; else this process's memory."""
    return RedisStore(redis_url) if redis_url else MemoryStore()


class StoreKeeper:
    """The store the configuration names, opened when first needed, replaced when `redis_url` changes.

    `fail_mode` is asked at each failure (the configuration's `on_store_failure` as it is then), for the
    log line; `spawn` runs the closing of a replaced store without waiting for it.
    """

    def __init__(
        self,
        metrics: Metrics,
        fail_mode: Callable[[], FailMode],
        spawn: Spawn,
        open_store: Callable[[str | None], Store] = open_store,
    ) -> None:
        self.metrics = metrics
        self._fail_mode = fail_mode
        self._spawn = spawn
        self._open = open_store
        self._store: Store | None = None
        self._url: str | None = None
        self._failing = False

    @property
    def current(self) -> Store | None:
        """The store opened last (in use, or still holding what admitted flows charge); None before any."""
        return self._store

    def store_for(self, redis_url: str | None) -> Store:
        """The store for `redis_url`: the current one, or a new one if there is none or the URL changed."""
        if self._store is None or redis_url != self._url:
            old = self._store
            self._store = self._open(redis_url)
            self._url = redis_url
            self._failing = False
            if old is not None:
                self._spawn(old.aclose())
        return self._store

    def failed(self, e: StoreError) -> None:
        """The store did not answer: counted, and logged once until it answers again."""
        self.metrics.limit_store_failed()
        if not self._failing:
            self._failing = True
            what = "serving without limits" if self._fail_mode() == "open" else "answering 503 to limited requests"
            logger.error("registryproxy: limits store failed (%s); %s until it answers again", e, what)

    def answered(self) -> None:
        """The store answered: after a failure, logged once."""
        if self._failing:
            self._failing = False
            logger.warning("registryproxy: limits store answers again; limits apply")

    async def aclose(self) -> None:
        if self._store is not None:
            await self._store.aclose()
