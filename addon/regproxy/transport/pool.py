"""Upstream connections that outlive a client connection: open, tunnel, verify, pool.

Why: mitmproxy gives every client connection its own upstream connection, and does TLS to
the upstream in a layer inside that client's layer stack. skopeo and podman open a new
connection per request, so through mitmproxy every request paid a TCP and a TLS handshake
to a distant upstream (two round trips). This module owns the upstream *socket* instead:
it opens a TCP connection (through an HTTP forward proxy with CONNECT when the environment
asks for one), does TLS on it with a per-origin `ssl.SSLContext` (built by the caller from the
mapping's trust: `trust.ssl_context`), and keeps idle
connections between requests, keyed by everything that makes a connection what it is
(scheme, host, port, SNI, verification, CA bundle, forward proxy). A connection is
therefore shared across client connections but never across upstream hosts or TLS
settings. mitmproxy then speaks plain HTTP/1.1 over the stream it is given (`regproxy.mitm.pool_layers`
and `regproxy.transport.lending` do that wiring); credentials stay in each request.

Pure asyncio and ssl: no mitmproxy import here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

MAX_CONNECT_RESPONSE = 16 * 1024


class TunnelError(OSError):
    """The forward proxy refused or broke the CONNECT tunnel (an OSError: mitmproxy answers 502)."""


class ForwardProxy(Protocol):
    """What the pool needs of a forward proxy (egress.ProxySpec has it): hashable, and these."""

    @property
    def scheme(self) -> str: ...  # "http", or "https" for TLS to the proxy itself

    @property
    def address(self) -> tuple[str, int]: ...

    @property
    def authorization(self) -> str | None: ...  # the Proxy-Authorization value, or None


@dataclass(frozen=True)
class Origin:
    """Everything that decides what an upstream connection is; the pool's key.

    Two requests share a connection only when their `Origin`s are equal: same scheme, host,
    port and SNI, same trust (what verifies the upstream's certificate), same forward proxy.
    """

    scheme: str  # "http" or "https"
    host: str
    port: int
    trust: Hashable = None  # opaque to the pool; `context_for(origin)` turns it into an SSLContext
    proxy: ForwardProxy | None = None
    server_hostname: str | None = None  # SNI and the name verified; default: host
    label: str = field(default="", compare=False)  # the mappings it serves, for log lines (not part of the key)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def sni(self) -> str:
        return self.server_hostname or self.host

    def __str__(self) -> str:
        via = f" via {self.proxy.address[0]}:{self.proxy.address[1]}" if self.proxy else ""
        return f"{self.scheme}://{self.host}:{self.port}{via}"


def default_context(origin: Origin) -> ssl.SSLContext:
    """Verified against the default store, host name checked (what `trust=None` means)."""
    return ssl.create_default_context()


async def _connect_tunnel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: Origin, proxy: ForwardProxy
) -> None:
    """CONNECT host:port through `proxy`; only the status line is looked at (2xx: tunnel up)."""
    authority = f"[{origin.host}]:{origin.port}" if ":" in origin.host else f"{origin.host}:{origin.port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.authorization:
        head += f"Proxy-Authorization: {proxy.authorization}\r\n"
    writer.write((head + "\r\n").encode("ascii"))
    await writer.drain()
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise TunnelError("forward proxy: CONNECT answer too long") from None
    except asyncio.IncompleteReadError:
        raise TunnelError("forward proxy closed the connection during CONNECT") from None
    status_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (len(parts[1]) == 3 and parts[1].startswith("2")):
        raise TunnelError(f"forward proxy refused CONNECT: {status_line[:80]!r}")


async def open_stream(
    origin: Origin,
    context: ssl.SSLContext | None,
    proxy_context: ssl.SSLContext | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection to `origin`: TCP, CONNECT through its forward proxy, TLS. No timeout here:
    the caller cancels (the addon's watchdog does), and a cancelled open leaves no socket behind."""
    proxy = origin.proxy
    target = proxy.address if proxy is not None else (origin.host, origin.port)
    reader, writer = await asyncio.open_connection(*target, limit=MAX_CONNECT_RESPONSE * 4)
    try:
        if proxy is not None:
            if proxy.scheme == "https":
                await writer.start_tls(proxy_context or ssl.create_default_context(), server_hostname=proxy.address[0])
            await _connect_tunnel(reader, writer, origin, proxy)
        if origin.tls:
            assert context is not None
            await writer.start_tls(context, server_hostname=origin.sni)
    except BaseException:
        writer.close()
        raise
    return reader, writer


Opener = Callable[[Origin, "ssl.SSLContext | None"], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class _Idle:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    since: float


@dataclass
class PoolStats:
    opened: int = 0
    reused: int = 0
    released: int = 0
    discarded: int = 0


class ConnectionPool:
    """Idle upstream connections per `Origin`, most recently used first.

    A connection is either lent (owned by exactly one user until `release` or `discard`) or
    idle in the pool; an idle one is checked before it is lent again (closed by the peer,
    unread bytes) and dropped after `idle_timeout` seconds, which must stay below the
    upstreams' own keep-alive timeouts (a connection the upstream closes just as a request
    goes out makes that request fail).
    """

    def __init__(
        self,
        *,
        max_idle_per_origin: int = 16,
        idle_timeout: float = 30.0,
        context_for: Callable[[Origin], ssl.SSLContext] = default_context,
        opener: Opener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self._context_for = context_for
        self._opener: Opener = opener or open_stream
        self._clock = clock
        self._idle: dict[Origin, deque[_Idle]] = {}
        self._contexts: dict[Origin, ssl.SSLContext] = {}
        self.stats = PoolStats()

    def context_for(self, origin: Origin) -> ssl.SSLContext | None:
        if not origin.tls:
            return None
        ctx = self._contexts.get(origin)
        if ctx is None:
            ctx = self._contexts[origin] = self._context_for(origin)
        return ctx

    async def acquire(self, origin: Origin) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection to `origin` if a healthy one is pooled, else a new one."""
        idle = self._idle.get(origin)
        now = self._clock()
        while idle:
            item = idle.pop()  # most recently released first
            if now - item.since <= self.idle_timeout and _healthy(item.reader, item.writer):
                self.stats.reused += 1
                return item.reader, item.writer
            self._close(item.writer)
        reader, writer = await self._opener(origin, self.context_for(origin))
        self.stats.opened += 1
        return reader, writer

    def release(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Give back a connection whose last exchange is complete; False if it was closed instead."""
        if not _healthy(reader, writer):
            self.discard(writer)
            return False
        idle = self._idle.setdefault(origin, deque())
        idle.append(_Idle(reader, writer, self._clock()))
        while len(idle) > self.max_idle_per_origin:
            self._close(idle.popleft().writer)
        self.stats.released += 1
        return True

    def discard(self, writer: asyncio.StreamWriter) -> None:
        self.stats.discarded += 1
        self._close(writer)

    def expire(self) -> int:
        """Close idle connections older than `idle_timeout` or closed by the peer; returns how many."""
        now = self._clock()
        closed = 0
        for origin, idle in list(self._idle.items()):
            keep = deque(i for i in idle if now - i.since <= self.idle_timeout and _healthy(i.reader, i.writer))
            for item in idle:
                if item not in keep:
                    self._close(item.writer)
                    closed += 1
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        return closed

    def idle_count(self, origin: Origin | None = None) -> int:
        if origin is not None:
            return len(self._idle.get(origin, ()))
        return sum(len(v) for v in self._idle.values())

    def retain(self, keep: Callable[[Origin], bool]) -> None:
        """Close idle connections to origins `keep` rejects (after a configuration change)."""
        for origin in [o for o in self._idle if not keep(o)]:
            for item in self._idle.pop(origin):
                self._close(item.writer)
        self._contexts = {o: c for o, c in self._contexts.items() if keep(o)}

    def close_all(self) -> None:
        for idle in self._idle.values():
            for item in idle:
                self._close(item.writer)
        self._idle.clear()

    @staticmethod
    def _close(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):  # closing a broken transport
            writer.close()


def _healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Open both ways, nothing unread (an idle HTTP/1.1 connection has nothing to say)."""
    if writer.is_closing() or reader.at_eof() or reader.exception() is not None:
        return False
    buffered = getattr(reader, "_buffer", b"")
    return not buffered
