"""Coroutines the addons start and do not wait for (closing a replaced client, charging a limit).

`spawn` runs one on the running loop and keeps a reference until it is done: asyncio holds tasks
only weakly, so an unreferenced one can vanish mid-way. Without a running loop (a hook called from
a test) the coroutine is closed unrun.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
    except RuntimeError:
        coro.close()
        return
    _running.add(task)
    task.add_done_callback(_running.discard)
