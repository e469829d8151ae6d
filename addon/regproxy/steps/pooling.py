"""Upstream connections shared across client connections: the addon that puts the pool to work.

mitmproxy gives every client connection its own upstream connections, and skopeo and podman open
a new client connection per request, so through a plain mitmproxy every request of a pull paid a
TCP and a TLS handshake to the upstream: two round trips over the WAN. With the pool
(`transport.pool` and `transport.lending`, the pure part; `mitm.pool_layers`, the documented patch of
mitmproxy's connection handling) an upstream connection outlives the client connection that opened it and serves the
next request to the same origin, whoever sends it.

This addon keeps the pool's origin table in step with the configuration: one `Origin` per mapped
upstream (scheme, host, port), verified with the mapping's trust (`trust.ssl_context`, the same
context the token client uses) and reached through the forward proxy `egress` names for it (a
CONNECT tunnel). Connections are never shared across origins, trust settings or forward proxies;
credentials stay per request (the pool holds sockets, never headers). With
`registryproxy_upstream_pool=false`, mitmproxy opens its own connections again (trust through
`upstream_tls`); that cannot honour a forward proxy, so the combination is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..config import Config
from ..mitm import pool_layers as upstream_pool
from ..transport.egress import proxy_for
from ..transport.pool import ConnectionPool, Origin
from ..transport.trust import Trust, ssl_context
from .config_loader import Configuration, State

OPTION = "registryproxy_upstream_pool"
IDLE_TIMEOUT = 30.0  # below the keep-alive timeouts of the registries seen (distribution: none; nginx: 75 s)
EXPIRE_EVERY = 10.0


def origins(config: Config) -> dict[tuple[str, str, int], Origin]:
    """(scheme, host, port) -> the Origin of every mapped upstream (config/mappings.py makes one trust per origin)."""
    found: dict[tuple[str, str, int], Origin] = {}
    for m in config.mappings:
        up = m.upstream
        key = (up.scheme, up.host.lower(), up.port)
        seen = found.get(key)
        if seen is not None:
            if m.label not in seen.label.split(", "):
                found[key] = Origin(
                    seen.scheme, seen.host, seen.port, seen.trust, seen.proxy, label=f"{seen.label}, {m.label}"
                )
            continue
        proxy = proxy_for(f"{up.scheme}://{up.netloc}/", config.egress)
        found[key] = Origin(
            up.scheme, up.host, up.port, m.trust if up.scheme == "https" else None, proxy, label=m.label
        )
    return found


class UpstreamPooling:
    def __init__(self, config: Configuration) -> None:
        self.config = config
        self.pool: ConnectionPool | None = None
        self._state: State | None = None
        self._origins: dict[tuple[str, str, int], Origin] = {}
        self._expiry: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            OPTION,
            bool,
            True,
            "Share upstream connections across client connections (a pull then pays the upstream's TCP and "
            "TLS handshakes once, not per request). Off: one upstream connection per client connection, as "
            "mitmproxy does, and no forward proxy (HTTPS_PROXY) for them.",
        )

    def configure(self, updated: set[str]) -> None:
        if self.pool is None:
            self.pool = upstream_pool.install(
                self._resolve, ConnectionPool(context_for=_context, idle_timeout=IDLE_TIMEOUT)
            )
        state = self.config.state
        if not ctx.options.registryproxy_upstream_pool and state is not None:
            proxied = sorted(o.label for o in origins(state.config).values() if o.proxy is not None)
            if proxied:
                raise exceptions.OptionsError(
                    f"{OPTION}=false: mitmproxy's own upstream connections cannot go through the forward proxy "
                    f"set for mapping {', '.join(proxied)} (HTTPS_PROXY/HTTP_PROXY); keep the pool on"
                )

    def running(self) -> None:
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire())

    def done(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.pool is not None:
            self.pool.close_all()

    def _resolve(self, scheme: str, host: str, port: int) -> Origin | None:
        """The pooled origin for a connection mitmproxy is about to open, or None: not pooled."""
        state = self.config.state
        if state is None or not ctx.options.registryproxy_upstream_pool:
            return None
        if state is not self._state:
            self._state, self._origins = state, origins(state.config)
        return self._origins.get((scheme, host.lower(), port))

    async def _expire(self) -> None:
        """Close idle connections past their time, and those to origins the configuration no longer names."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            with contextlib.suppress(Exception):
                if self.pool is not None:
                    self.pool.expire()
                upstream_pool.set_resolver(self._resolve)  # and drop what the resolver no longer names


def _context(origin: Origin) -> ssl.SSLContext:
    assert isinstance(origin.trust, Trust)
    return ssl_context(origin.trust)
