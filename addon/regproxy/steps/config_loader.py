"""The loaded configuration: options, loading, live reload on file change and SIGHUP.

`Configuration` owns everything derived from one configuration file (`State`: the config, the
matcher, the token codec and service, the redactor) and the upstream client that outlives
reloads. The other addons are handed this object when the chain is built and read `.state`;
a reload replaces the whole `State` at once, so a flow never sees half of two configurations.
Until a valid configuration is loaded, every registry request is answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..config import Config, ConfigError, load_file
from ..debug.redact import Redactor, capability_keys
from ..flow import answers, background
from ..flow.answers import fail_closed
from ..links import LinkBook
from ..mapping.matcher import Matcher
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError
from ..tokens.issuer import TokenService
from ..tokens.paseto import TokenCodec
from ..upstream.client import RegistryClient

logger = logging.getLogger("registryproxy")

CONFIG_ENV = "REGISTRYPROXY_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "config.yaml"
CONFIG_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class State:
    """Everything derived from one loaded configuration; replaced as a whole on reload."""

    config: Config
    path: str
    matcher: Matcher
    codec: TokenCodec
    tokens: TokenService
    redactor: Redactor


class Configuration:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.state: State | None = None
        self.client: RegistryClient | None = None
        self._stat: tuple[int, int, int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._sighup = False
        self._tried = False  # configure has tried to load the file (a failure was reported)
        # The time tokens and share links are judged by (hook tests set their own); read at each use.
        self.clock: Callable[[], float] = time.time

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registryproxy_config",
            str,
            "",
            f"Path of the registryproxy YAML configuration (default: ${CONFIG_ENV}, else config.yaml "
            "at the repository root). Reloaded when the file changes and on SIGHUP.",
        )
        loader.add_option(
            "registryproxy_watch_config",
            bool,
            True,
            "Reload the configuration file when it changes (it is always reloaded on SIGHUP).",
        )

    def configure(self, updated: set[str]) -> None:
        if "registryproxy_config" not in updated:
            return
        self._tried = True
        path = _config_path()
        try:
            self._install(self._load(path))
        except ConfigError as e:
            self._stat = _stat(path)  # the watcher tries again when the file changes
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        if self.state is None and not self._tried:
            # Started without any configure call naming our option (e.g. a master that adds the
            # addon directly): load the default configuration now, or fail start-up loudly. (One
            # that failed was already reported, and start-up ends on it.)
            try:
                self.configure({"registryproxy_config"})
            except exceptions.OptionsError as e:
                logger.error("registryproxy: %s", e)
        # The proxy routes per request and needs the client's Host: never dial the default
        # reverse target eagerly, and keep the Host header mitmproxy would otherwise replace.
        updates: dict[str, Any] = {}
        if ctx.options.connection_strategy != "lazy":
            updates["connection_strategy"] = "lazy"
        if not ctx.options.keep_host_header:
            updates["keep_host_header"] = True
        if updates:
            ctx.options.update(**updates)
        loop = asyncio.get_running_loop()
        if self._watch is None:
            self._watch = loop.create_task(self._watch_file())
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True

    async def done(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._watch is not None:
            self._watch.cancel()
        if self.client is not None:
            await self.client.aclose()

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.state is not None:
            return
        answers.answer_error(flow, RegistryError(503, "UNAVAILABLE", "the proxy has no valid configuration"))

    def ready(self) -> tuple[bool, str]:
        """Whether the proxy can serve (for /readyz), with a short detail."""
        if self.state is None:
            return False, "no valid configuration loaded"
        return True, f"{len(self.state.config.mappings)} mappings loaded"

    def reload(self, why: str) -> bool:
        """Load the configuration file again; keep serving the old one if the new one is invalid."""
        path = self.state.path if self.state is not None else _config_path()
        try:
            state = self._load(path)
        except ConfigError as e:
            self._stat = _stat(path)
            self.metrics.config_reload(False)
            logger.error("registryproxy: reload (%s) refused, still serving the previous configuration: %s", why, e)
            return False
        self._install(state)
        self.metrics.config_reload(True)
        logger.info("registryproxy: configuration reloaded (%s)", why)
        return True

    def _load(self, path: str) -> State:
        """Read and validate a configuration; everything derived from it. Raises ConfigError."""
        config = load_file(path)
        now: Callable[[], float] = lambda: self.clock()  # follows self.clock
        links = LinkBook(config.secretkeys, (m.key for m in config.mappings), config.revoked_links, now)
        matcher = Matcher(config.mappings, links)
        codec = TokenCodec(config.secretkeys, now)
        client = self.client
        if client is None or client.timeout != config.upstream_timeout:
            client = RegistryClient(config.upstream_timeout)
            client.on_token_fetch = self.metrics.upstream_token_fetch
        tokens = TokenService(config, matcher, codec, client)
        s3 = config.cache.s3 if config.cache is not None else None
        stored = [s3.access_key_id or "", s3.secret_access_key or ""] if s3 is not None else []
        return State(config, path, matcher, codec, tokens, Redactor(capability_keys(config.mappings), stored))

    def _install(self, state: State) -> None:
        old_client = self.client
        self.client = state.tokens.client
        if old_client is not None and old_client is not self.client:
            background.spawn(old_client.aclose())
        self.state = state
        self._stat = _stat(state.path)
        config = state.config
        if config.generated_key:
            logger.warning(
                "no secret key configured: using a random one for this process; tokens will survive "
                "neither a restart nor a second replica (set secretkey or $REGISTRYPROXY_SECRETKEY)"
            )
        self.metrics.set_config_info(len(config.mappings), len(config.secretkeys))
        logger.info(
            "registryproxy: %d mappings loaded from %s: %s",
            len(config.mappings),
            Path(state.path).name,
            ", ".join(m.label for m in config.mappings),
        )

    def _on_sighup(self) -> None:
        try:
            self.reload("SIGHUP")
        except Exception as e:  # noqa: BLE001 - a signal must never take the proxy down
            logger.error("registryproxy: reload on SIGHUP failed (%s)", type(e).__name__)

    async def _watch_file(self) -> None:
        """Reload when the configuration file changes (its size, mtime or inode)."""
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            if not ctx.options.registryproxy_watch_config:
                continue
            try:
                current = _stat(self.state.path if self.state is not None else _config_path())
                if current is not None and current != self._stat:
                    self.reload("file changed")
            except Exception as e:  # noqa: BLE001 - the watcher must keep running
                logger.error("registryproxy: config watch failed (%s)", type(e).__name__)


def _config_path() -> str:
    return str(ctx.options.registryproxy_config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
