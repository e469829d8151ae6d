"""Where the limits' counts live: in this process's memory, or in Redis shared by every replica.

Both stores have one async interface. `admit` takes every check a request must pass (a client's
token bucket, a mapping's window, a client's transfer slots...) and, atomically, either refuses
naming the first check that failed and changes nothing, or applies all of them. `charge` adds bytes
to windows; `release` gives a transfer slot back.

The Redis store runs each operation as one Lua script (no read-modify-write race between
replicas), on Redis's own clock (`TIME`), so replicas whose clocks differ still agree on windows.
Every call is bounded (`TIMEOUT`); after a failure the store is not asked again for `DOWN_FOR`
seconds, so a dead or black-holed Redis costs a request nothing but the failure mode
(limiting.py). Transfer slots are leases of `LEASE_TTL` seconds that the holder renews, so the
slots of a replica that died free themselves. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from . import buckets
from .buckets import BucketState, WindowState

Kind = Literal["bucket", "window", "slots"]

TIMEOUT = 0.5  # seconds for one Redis operation, connecting included
DOWN_FOR = 2.0  # seconds a failed Redis is not asked again
LEASE_TTL = 90.0  # seconds a transfer slot is held without renewal
KEY_PREFIX = "registryproxy:limits:"


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


# --- Redis ----------------------------------------------------------------------------------

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
local n = #KEYS
local st, idx = {}, {}
local refused, retry = 0, 0
for i = 1, n do
  local b = 1 + (i - 1) * 5
  local kind, limit, rate = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local r = 0
  if kind == 'bucket' then
    local h = redis.call('HMGET', KEYS[i], 't', 's')
    local level = limit
    if h[1] then level = math.min(limit, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * rate) end
    st[i] = level
    if level < 1 then r = (1 - level) / rate end
  elseif kind == 'window' then
    idx[i] = math.floor(now / rate)
    local h = redis.call('HMGET', KEYS[i], 'w', 'n')
    local used = 0
    if h[1] and tonumber(h[1]) == idx[i] then used = tonumber(h[2]) end
    st[i] = used
    if used >= limit then r = (idx[i] + 1) * rate - now end
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local used = redis.call('ZCARD', KEYS[i])
    st[i] = used
    if used >= limit then r = 1 end
  end
  if r > 0 and refused == 0 then refused, retry = i, r end
end
for i = 1, n do
  local b = 1 + (i - 1) * 5
  local kind, limit, rate, count, lease = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4], ARGV[b + 5]
  if refused == 0 then
    if kind == 'bucket' then
      st[i] = st[i] - 1
      redis.call('HSET', KEYS[i], 't', tostring(st[i]), 's', tostring(now))
      redis.call('PEXPIRE', KEYS[i], math.ceil((limit - st[i]) / rate * 1000) + 1000)
    elseif kind == 'window' and count == '1' then
      st[i] = st[i] + 1
      redis.call('HSET', KEYS[i], 'w', string.format('%d', idx[i]), 'n', string.format('%d', st[i]))
      redis.call('PEXPIREAT', KEYS[i], math.ceil((idx[i] + 1) * rate * 1000) + 1000)
    elseif kind == 'slots' then
      redis.call('ZADD', KEYS[i], now + ttl, lease)
      redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000) + 1000)
      st[i] = st[i] + 1
    end
  end
  st[i] = tostring(st[i])
end
return {refused, tostring(retry), st}
"""

_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #KEYS do
  local amount, window = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local idx = math.floor(now / window)
  local h = redis.call('HMGET', KEYS[i], 'w', 'n')
  local used = 0
  if h[1] and tonumber(h[1]) == idx then used = tonumber(h[2]) end
  used = math.max(0, used + amount)
  redis.call('HSET', KEYS[i], 'w', string.format('%d', idx), 'n', string.format('%d', used))
  redis.call('PEXPIREAT', KEYS[i], math.ceil((idx + 1) * window * 1000) + 1000)
  out[i] = string.format('%d', used)
end
return out
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000) + 1000)
end
return #KEYS
"""


class RedisStore:
    """Counts in Redis (redis-py asyncio), shared by every process that names the same server."""

    def __init__(self, url: str, timeout: float = TIMEOUT, lease_ttl: float = LEASE_TTL) -> None:
        # Imported here: a proxy without `redis_url` never loads the client.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.timeout = timeout
        self.lease_ttl = lease_ttl
        self._down_until = 0.0
        # No retries inside the client: one bounded attempt, then the caller's failure mode.
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
            decode_responses=True,
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._renew = self._redis.register_script(_RENEW)

    async def _run(self, what: str, call: Callable[[], object]) -> object:
        if time.monotonic() < self._down_until:
            raise StoreError(f"redis {what}: not retried for {DOWN_FOR:.0f}s after a failure")
        try:
            async with asyncio.timeout(self.timeout * 2):
                result = call()
                return await result if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future) else result
        except Exception as e:  # noqa: BLE001 - any failure of the store is one failure mode
            self._down_until = time.monotonic() + DOWN_FOR
            kind = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            raise StoreError(f"redis {what}: {kind}") from None

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        args: list[str | float] = [self.lease_ttl]
        for c in checks:
            args += [c.kind, c.limit, c.rate, "1" if c.count else "0", c.lease or "-"]
        keys = [KEY_PREFIX + c.key for c in checks]
        raw = await self._run("admit", lambda: self._admit(keys=keys, args=args))
        try:
            assert isinstance(raw, list) and len(raw) == 3
            refused = int(raw[0])
            usage = tuple(float(u) for u in raw[2])
            return Verdict(refused - 1 if refused else None, float(raw[1]), usage)
        except (AssertionError, TypeError, ValueError):
            raise StoreError("redis admit: unexpected answer") from None

    async def charge(self, charges: Sequence[Charge]) -> list[int]:
        if not charges:
            return []
        args: list[int] = []
        for ch in charges:
            args += [ch.amount, ch.window]
        keys = [KEY_PREFIX + ch.key for ch in charges]
        raw = await self._run("charge", lambda: self._charge(keys=keys, args=args))
        try:
            assert isinstance(raw, list)
            return [int(v) for v in raw]
        except (AssertionError, TypeError, ValueError):
            raise StoreError("redis charge: unexpected answer") from None

    async def release(self, key: str, lease: str) -> None:
        await self._run("release", lambda: self._redis.zrem(KEY_PREFIX + key, lease))

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        if leases:
            keys = [KEY_PREFIX + k for k, _ in leases]
            args: list[str | float] = [self.lease_ttl, *(lease for _, lease in leases)]
            await self._run("renew", lambda: self._renew(keys=keys, args=args))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection may fail; nothing to keep
            async with asyncio.timeout(self.timeout):
                await self._redis.aclose()


def retry_seconds(retry_after: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else 3600
