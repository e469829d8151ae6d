"""The chain as mitmproxy sees it: one addon that calls, in order, the steps that implement a hook.

mitmproxy dispatches every event to every addon of the master: for each it walks the addon's
children, looks the hook up by name and runs it inside an error guard, whether or not the addon
implements that hook. A request raises about eight events (four flow hooks, each followed by an
`update`), so every addon costs a few microseconds a request even when it has nothing to do:
registered one by one, the steps of the chain (fourteen when this was measured, seventeen now) cost
about 0.3 ms of CPU per request more than the single addon they replaced (measured in-process, see
the README's Architecture section). `ChainAddon` keeps the steps as they are (each with its own hooks
and options) and gives mitmproxy one addon whose hook for an event runs only the steps that implement
it, in chain order, each in an error guard of its own as mitmproxy's `safecall` does. (`veil.Courier`
is no step: `Veil` adds it to the master itself, as the master's very last addon.)

Which events exist is mitmproxy's registry of hooks (`hooks.all_hooks`, filled as the hook classes are
defined: hence the import of the proxy layers); compat.py checks that every hook a step implements is
in it, as a step's hook missing from it would silently never run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.proxy import layers  # noqa: F401 - registers the flow, TLS and connection hooks by name

logger = logging.getLogger("registryproxy")

Handler = Callable[..., Any]


class ChainAddon:
    """The steps as one addon. `log_startup_option_errors`: an option a step refuses before the proxy
    runs is logged as one line instead of raised (for `mitmdump -s`, whose script loader prints any
    exception of a script's `configure` with its traceback; mitmproxy's ErrorCheck then ends start-up
    on that logged error). Once running, a refused option change is raised, so mitmproxy rejects it."""

    name = "registryproxy"

    def __init__(self, steps: Sequence[object], *, log_startup_option_errors: bool = False) -> None:
        self.steps = list(steps)
        self._running = False
        for hook in hooks.all_hooks:
            handlers = [getattr(s, hook) for s in self.steps if callable(getattr(s, hook, None))]
            if hook == "running":
                handlers.insert(0, self._started)
            if handlers:
                setattr(self, hook, _dispatcher(hook, handlers))
        configure = getattr(self, "configure", None)
        if log_startup_option_errors and configure is not None:
            self.configure = self._startup_guard(configure)

    def _started(self) -> None:
        self._running = True

    def _startup_guard(self, configure: Handler) -> Handler:
        def guarded(updated: set[str]) -> None:
            try:
                configure(updated)
            except exceptions.OptionsError as e:
                if self._running:
                    raise
                logger.error("registryproxy: %s", e)

        return guarded


def _dispatcher(hook: str, handlers: list[Handler]) -> Handler:
    """One hook for the chain: each handler in turn; an exception is logged and the next one runs."""
    if any(inspect.iscoroutinefunction(h) for h in handlers):

        async def dispatch_async(*args: Any) -> None:
            for h in handlers:
                try:
                    result = h(*args)
                    if inspect.isawaitable(result):
                        await result
                except (exceptions.AddonHalt, exceptions.OptionsError):
                    raise
                except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: log, go on
                    _log(hook, h, e)

        return dispatch_async

    def dispatch(*args: Any) -> None:
        for h in handlers:
            try:
                h(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: log, go on
                _log(hook, h, e)

    return dispatch


def _log(hook: str, handler: Handler, e: Exception) -> None:
    owner = type(getattr(handler, "__self__", handler)).__name__
    logger.error("registryproxy: %s.%s failed (%s)", owner, hook, type(e).__name__)
    logger.debug("details", exc_info=e)
