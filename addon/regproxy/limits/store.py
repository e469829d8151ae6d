"""Where the limits' counts live: in this process's memory, or in Redis shared by every replica.

Both stores have one async interface. `admit` takes every check a request must pass (a client's
token bucket, a mapping's window, a client's transfer slots...) and, atomically, either refuses
naming the first check that failed and changes nothing, or applies all of them. `charge` adds bytes
to windows; `release` gives a transfer slot back.

This module holds the interface and the memory store; store_redis.py the Redis one. Transfer
slots are leases of `LEASE_TTL` seconds that the holder renews, so the slots of a replica that died
free themselves. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from . import buckets
from .buckets import BucketState, WindowState

Kind = Literal["bucket", "window", "slots"]

LEASE_TTL = 90.0  # seconds a transfer slot is held without renewal


class StoreError(Exception):
    """The store could not answer (Redis unreachable, slow or failing). The message holds no secret."""


@dataclass(frozen=True)
class Check:
    """One limit a request must pass.

    bucket: `limit` tokens at most, refilled at `rate` a second, one taken;
    window: at most `limit` in a window of `rate` seconds; `count` adds one when admitted (else only
    checked: a byte budget, charged later);
    slots: at most `limit` held at once; `lease` is taken when admitted.
    """

    kind: Kind
    key: str
    limit: float
    rate: float = 0.0
    count: bool = True
    lease: str = ""


@dataclass(frozen=True)
class Verdict:
    refused: int | None  # the index of the first check that refused, or None: admitted
    retry_after: float  # seconds, when refused
    usage: tuple[float, ...]  # per check, after the decision: tokens left, window count, slots held


@dataclass(frozen=True)
class Charge:
    key: str
    amount: int  # negative: given back (never below zero)
    window: int


class Store(Protocol):
    async def admit(self, checks: Sequence[Check]) -> Verdict: ...
    async def charge(self, charges: Sequence[Charge]) -> list[int]: ...
    async def release(self, key: str, lease: str) -> None: ...
    async def renew(self, leases: Sequence[tuple[str, str]]) -> None: ...
    async def aclose(self) -> None: ...


# --- memory ---------------------------------------------------------------------------------


class MemoryStore:
    """One process's counts. Entries that no longer matter (a full bucket, a past window) are pruned."""

    PRUNE_EVERY = 1024

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[BucketState, float]] = {}  # key -> (state, forget after)
        self._windows: dict[str, tuple[WindowState, float]] = {}  # key -> (count, window length)
        self._slots: dict[str, set[str]] = {}
        self._ops = 0

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        now = self.clock()
        self._maybe_prune(now)
        for i, c in enumerate(checks):
            retry = self._refusal(c, now)
            if retry > 0:
                return Verdict(i, retry, tuple(self._usage(c, now) for c in checks))
        for c in checks:
            if c.kind == "bucket":
                entry = self._buckets.get(c.key)
                state, _ = buckets.bucket_take(entry[0] if entry else None, now, c.limit, c.rate)
                assert state is not None
                self._buckets[c.key] = (state, now + buckets.bucket_full_in(state.tokens, c.limit, c.rate))
            elif c.kind == "window" and c.count:
                self._windows[c.key] = (buckets.window_add(self._window(c.key), now, c.rate, 1), c.rate)
            elif c.kind == "slots":
                self._slots.setdefault(c.key, set()).add(c.lease)
        return Verdict(None, 0.0, tuple(self._usage(c, now) for c in checks))

    def _refusal(self, c: Check, now: float) -> float:
        if c.kind == "bucket":
            entry = self._buckets.get(c.key)
            _, retry = buckets.bucket_take(entry[0] if entry else None, now, c.limit, c.rate)
            return retry
        if c.kind == "window":
            return buckets.window_check(self._window(c.key), now, c.rate, int(c.limit))
        return 1.0 if len(self._slots.get(c.key, ())) >= c.limit else 0.0

    def _usage(self, c: Check, now: float) -> float:
        if c.kind == "bucket":
            entry = self._buckets.get(c.key)
            return buckets.bucket_level(entry[0] if entry else None, now, c.limit, c.rate)
        if c.kind == "window":
            return float(buckets.window_used(self._window(c.key), now, c.rate))
        return float(len(self._slots.get(c.key, ())))

    async def charge(self, charges: Sequence[Charge]) -> list[int]:
        now = self.clock()
        out = []
        for ch in charges:
            state = buckets.window_add(self._window(ch.key), now, ch.window, ch.amount)
            self._windows[ch.key] = (state, ch.window)
            out.append(state.used)
        return out

    async def release(self, key: str, lease: str) -> None:
        held = self._slots.get(key)
        if held is not None:
            held.discard(lease)
            if not held:
                del self._slots[key]

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _maybe_prune(self, now: float) -> None:
        self._ops += 1
        if self._ops % self.PRUNE_EVERY:
            return
        self._buckets = {k: v for k, v in self._buckets.items() if v[1] > now}
        self._windows = {k: v for k, v in self._windows.items() if buckets.window_used(v[0], now, v[1]) > 0}

    def _window(self, key: str) -> WindowState | None:
        entry = self._windows.get(key)
        return entry[0] if entry is not None else None

    def sizes(self) -> tuple[int, int, int]:
        """Entries held (buckets, windows, slot keys): for tests of the pruning."""
        return len(self._buckets), len(self._windows), len(self._slots)


def retry_seconds(retry_after: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else 3600
