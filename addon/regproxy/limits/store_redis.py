"""The limits' counts in Redis, shared by every replica and worker that names the same server.

Each operation of the `Store` interface (store.py) is one Lua script (no read-modify-write race
between replicas), on Redis's own clock (`TIME`), so replicas whose clocks differ still agree on
windows. Every call is bounded (`TIMEOUT`); after a failure the store is not asked again for
`DOWN_FOR` seconds, so a dead or black-holed Redis costs a request nothing but the failure mode
(keeper.py, steps/limits.py). The client is redis-py's asyncio one, imported only when a store is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from .store import LEASE_TTL, Charge, Check, StoreError, Verdict

TIMEOUT = 0.5  # seconds for one Redis operation, connecting included
DOWN_FOR = 2.0  # seconds a failed Redis is not asked again
KEY_PREFIX = "registryproxy:limits:"

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
