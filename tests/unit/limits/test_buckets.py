"""limits/buckets.py: the token bucket and window arithmetic (property tests), and the memory store on it."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from regproxy.limits import buckets
from regproxy.limits.buckets import BucketState
from regproxy.limits.store import Charge, Check, MemoryStore

times = st.lists(st.floats(min_value=0, max_value=50, allow_nan=False), min_size=1, max_size=60)


@given(
    capacity=st.integers(1, 50),
    rate=st.floats(0.01, 20, allow_nan=False),
    gaps=times,
    start=st.floats(0, 1e9, allow_nan=False),
)
def test_a_bucket_never_admits_more_than_its_burst_plus_what_it_refilled(
    capacity: int, rate: float, gaps: list[float], start: float
) -> None:
    state: BucketState | None = None
    now = start
    admitted = 0
    for gap in gaps:
        now += gap
        new, retry = buckets.bucket_take(state, now, capacity, rate)
        if retry == 0:
            admitted += 1
            assert new is not None and 0 <= new.tokens <= capacity
            state = new
        else:
            assert new == state and retry > 0
            # Retrying after `retry` seconds succeeds.
            again, wait = buckets.bucket_take(state, now + retry + 1e-6, capacity, rate)
            assert wait == 0 and again is not None
    assert admitted <= capacity + (now - start) * rate + 1e-6


@given(capacity=st.integers(1, 100), rate=st.floats(0.001, 10, allow_nan=False))
def test_a_new_bucket_takes_exactly_its_burst_at_once(capacity: int, rate: float) -> None:
    state = None
    for _ in range(capacity):
        state, retry = buckets.bucket_take(state, 1000.0, capacity, rate)
        assert retry == 0
    _, retry = buckets.bucket_take(state, 1000.0, capacity, rate)
    assert abs(retry - 1 / rate) < 1e-6 * max(1.0, 1 / rate)


def test_a_clock_going_back_refills_nothing() -> None:
    state = BucketState(0.0, 100.0)
    assert buckets.bucket_level(state, 50.0, 10, 1.0) == 0.0


@given(
    window=st.integers(1, 86400),
    limit=st.integers(1, 30),
    gaps=times,
    start=st.floats(0, 1e9, allow_nan=False),
)
def test_a_window_admits_at_most_its_limit_and_resets_at_its_end(
    window: int, limit: int, gaps: list[float], start: float
) -> None:
    state = None
    per_window: dict[int, int] = {}
    now = start
    for gap in gaps:
        now += gap
        retry = buckets.window_check(state, now, window, limit)
        if retry == 0:
            state = buckets.window_add(state, now, window, 1)
            per_window[buckets.window_index(now, window)] = per_window.get(buckets.window_index(now, window), 0) + 1
        else:
            assert 0 < retry <= window
            # At the end of the window the count is new.
            assert buckets.window_used(state, now + retry + 1e-6, window) == 0
    assert all(n <= limit for n in per_window.values())


@given(amounts=st.lists(st.integers(-1000, 1000), max_size=30))
def test_window_counts_never_go_below_zero(amounts: list[int]) -> None:
    state = None
    for a in amounts:
        state = buckets.window_add(state, 5.0, 10, a)
        assert state.used >= 0


# --- the memory store -----------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_admission_is_all_or_nothing() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    bucket = Check("bucket", "req:a", 5, 1.0)
    window = Check("window", "mg:m", 1, 60)

    async def go() -> None:
        first = await store.admit([bucket, window])
        assert first.refused is None and first.usage == (4.0, 1.0)
        second = await store.admit([bucket, window])
        assert second.refused == 1 and 0 < second.retry_after <= 60
        # The refused request took no token from the bucket.
        assert second.usage[0] == 4.0
        clock.now += second.retry_after + 0.001
        assert (await store.admit([bucket, window])).refused is None

    asyncio.run(go())


def test_slots_and_byte_windows() -> None:
    clock = Clock()
    store = MemoryStore(clock)

    async def go() -> None:
        a = Check("slots", "x:c", 2, lease="a")
        b = Check("slots", "x:c", 2, lease="b")
        c = Check("slots", "x:c", 2, lease="c")
        assert (await store.admit([a])).refused is None and (await store.admit([b])).refused is None
        assert (await store.admit([c])).refused == 0
        await store.release("x:c", "a")
        assert (await store.admit([c])).refused is None
        budget = Check("window", "mb:m", 100, 3600, count=False)
        assert (await store.admit([budget])).refused is None
        assert await store.charge([Charge("mb:m", 150, 3600)]) == [150]
        assert (await store.admit([budget])).refused == 0
        assert await store.charge([Charge("mb:m", -60, 3600)]) == [90]
        assert (await store.admit([budget])).refused is None

    asyncio.run(go())


def test_the_memory_store_forgets_what_no_longer_matters() -> None:
    clock = Clock()
    store = MemoryStore(clock)

    async def go() -> None:
        for i in range(MemoryStore.PRUNE_EVERY - 1):
            await store.admit([Check("bucket", f"req:{i}", 2, 1.0), Check("window", f"w:{i}", 5, 10)])
        assert store.sizes()[:2] == (MemoryStore.PRUNE_EVERY - 1, MemoryStore.PRUNE_EVERY - 1)
        clock.now += 20  # buckets full again, windows over
        await store.admit([Check("bucket", "req:last", 2, 1.0)])
        assert store.sizes()[:2] == (1, 0)  # only the bucket of this last request

    asyncio.run(go())
