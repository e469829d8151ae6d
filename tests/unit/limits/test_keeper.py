"""keeper.py: the limits' store opened when first needed, replaced when `redis_url` changes, closed at the
end; failures counted, and logged once a run (no proxy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from regproxy.limits.keeper import StoreKeeper, open_store
from regproxy.limits.settings import FailMode
from regproxy.limits.store import Charge, Check, MemoryStore, Store, StoreError, Verdict
from regproxy.limits.store_redis import RedisStore
from regproxy.ops.metrics import Metrics

FAILURES = "registryproxy_limit_store_failures_total"


class Recorded:
    """A store that records being closed."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.closed = False

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        return Verdict(None, 0.0, ())

    async def charge(self, charges: Sequence[Charge]) -> list[int]:
        return []

    async def release(self, key: str, lease: str) -> None:
        pass

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


class Rig:
    def __init__(self, mode: FailMode = "open") -> None:
        self.mode: FailMode = mode
        self.metrics = Metrics(CollectorRegistry())
        self.opened: list[Recorded] = []
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.keeper = StoreKeeper(self.metrics, lambda: self.mode, self.spawned.append, self.open)

    def open(self, url: str | None) -> Store:
        store = Recorded(url)
        self.opened.append(store)
        return store

    def run_spawned(self) -> None:
        for coro in self.spawned:
            asyncio.run(coro)
        self.spawned.clear()

    @property
    def failures(self) -> float:
        return self.metrics.registry.get_sample_value(FAILURES) or 0.0


def test_nothing_is_opened_before_a_request_needs_a_store() -> None:
    rig = Rig()
    assert rig.keeper.current is None and rig.opened == []
    asyncio.run(rig.keeper.aclose())  # nothing to close


def test_the_store_is_opened_once_and_kept_while_the_url_stays() -> None:
    rig = Rig()
    first = rig.keeper.store_for(None)
    assert rig.keeper.store_for(None) is first and rig.keeper.current is first
    assert [s.url for s in rig.opened] == [None] and rig.spawned == []


def test_a_changed_url_opens_a_new_store_and_closes_the_old_one_beside() -> None:
    rig = Rig()
    memory = rig.keeper.store_for(None)
    redis = rig.keeper.store_for("redis://127.0.0.1:6379/0")
    assert redis is not memory and rig.keeper.current is redis
    assert [s.url for s in rig.opened] == [None, "redis://127.0.0.1:6379/0"]
    assert not rig.opened[0].closed and len(rig.spawned) == 1
    rig.run_spawned()
    assert rig.opened[0].closed and not rig.opened[1].closed
    assert rig.keeper.store_for(None) is not memory  # and back: another new store
    rig.run_spawned()
    assert rig.opened[1].closed


def test_aclose_closes_the_current_store() -> None:
    rig = Rig()
    rig.keeper.store_for(None)
    asyncio.run(rig.keeper.aclose())
    assert rig.opened[0].closed


def test_every_failure_is_counted_and_the_first_of_a_run_logged(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig("closed")
    rig.keeper.store_for(None)
    with caplog.at_level(logging.INFO, "registryproxy"):
        rig.keeper.failed(StoreError("redis admit: timed out"))
        rig.keeper.failed(StoreError("redis admit: timed out"))
        rig.keeper.answered()
        rig.keeper.answered()
    assert rig.failures == 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            (
                "registryproxy: limits store failed (redis admit: timed out); "
                "answering 503 to limited requests until it answers again"
            ),
        ),
        ("WARNING", "registryproxy: limits store answers again; limits apply"),
    ]


def test_the_failure_mode_is_the_one_configured_when_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig("closed")
    rig.mode = "open"  # a reload changed on_store_failure since the keeper was made
    with caplog.at_level(logging.ERROR, "registryproxy"):
        rig.keeper.failed(StoreError("redis charge: ConnectionError"))
    assert "serving without limits until it answers again" in caplog.text


def test_a_new_store_starts_a_new_run_of_failures(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.keeper.store_for("redis://a:6379/0")
    with caplog.at_level(logging.INFO, "registryproxy"):
        rig.keeper.failed(StoreError("redis admit: ConnectionError"))
        rig.keeper.store_for("redis://b:6379/0")
        rig.keeper.answered()  # the new store never failed: nothing to say
        assert "answers again;" not in caplog.text
        rig.keeper.failed(StoreError("redis admit: ConnectionError"))
    assert caplog.text.count("limits store failed") == 2 and rig.failures == 2
    rig.run_spawned()


def test_open_store_is_memory_without_a_url_and_redis_with_one() -> None:
    assert isinstance(open_store(None), MemoryStore)
    redis = open_store("redis://127.0.0.1:1/0")  # connects only when asked something
    assert isinstance(redis, RedisStore)
    asyncio.run(redis.aclose())
