"""The arithmetic of the limits: token buckets, fixed windows and slots, with the clock passed in.

- A **token bucket** holds at most `capacity` tokens and refills at `rate` tokens a second; a
  request takes one. A client may burst up to `capacity` requests, then goes at `rate`.
- A **fixed window** counts an amount (requests, bytes) from the start of the window holding `now`;
  windows are aligned on the Unix epoch (`floor(now / window)`), so every replica and the Redis
  script agree on where one ends, and a count resets at that boundary. A request is refused while
  the window's count is at its limit, until the window ends.
- **Slots** (concurrent transfers) are held until released.

`check` decides without changing anything and `commit` applies an admitted request, so a request
refused by one limit takes nothing from the others. store.py runs the same arithmetic in
memory and (as Lua) in Redis. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketState:
    tokens: float
    stamp: float  # when `tokens` was counted


def bucket_level(state: BucketState | None, now: float, capacity: float, rate: float) -> float:
    """The tokens in a bucket at `now` (a new bucket is full; a clock going back refills nothing)."""
    if state is None:
        return float(capacity)
    return min(float(capacity), state.tokens + max(0.0, now - state.stamp) * rate)


def bucket_take(
    state: BucketState | None, now: float, capacity: float, rate: float, cost: float = 1.0
) -> tuple[BucketState | None, float]:
    """Take `cost` tokens: (the new state, 0) if there were enough, else (the state unchanged, the
    seconds until there will be)."""
    level = bucket_level(state, now, capacity, rate)
    if level >= cost:
        return BucketState(level - cost, now), 0.0
    if cost > capacity:
        return state, math.inf
    return state, (cost - level) / rate


def bucket_full_in(tokens: float, capacity: float, rate: float) -> float:
    """Seconds until a bucket at `tokens` is full again (how long its state is worth keeping)."""
    return max(0.0, capacity - tokens) / rate


def window_index(now: float, window: float) -> int:
    return math.floor(now / window)


def window_ends(now: float, window: float) -> float:
    """Seconds from `now` to the end of its window."""
    return (window_index(now, window) + 1) * window - now


@dataclass(frozen=True)
class WindowState:
    index: int  # the window this count belongs to
    used: int


def window_used(state: WindowState | None, now: float, window: float) -> int:
    """The count of the window holding `now` (a count of an older window is no longer used)."""
    if state is None or state.index != window_index(now, window):
        return 0
    return state.used


def window_check(state: WindowState | None, now: float, window: float, limit: int) -> float:
    """0 if the window has room for one more request, else the seconds until it ends."""
    return 0.0 if window_used(state, now, window) < limit else window_ends(now, window)


def window_add(state: WindowState | None, now: float, window: float, amount: int) -> WindowState:
    """The window's count with `amount` added (negative: given back, never below zero)."""
    return WindowState(window_index(now, window), max(0, window_used(state, now, window) + amount))
