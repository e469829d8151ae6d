"""Pooled streams lent to upstream connections: the pure half of the pool's wiring into mitmproxy.

An upstream connection mitmproxy opens (known here by its id) asks for a stream to an `Origin`; it is lent
one from the pool (`ConnectionPool.acquire`: an idle one, or a new one: TCP, CONNECT through a forward proxy,
TLS) and a writer whose `close` gives the stream back to the pool when the connection was between exchanges
(`Lent.clean`, which regproxy.mitm.pool_layers keeps from mitmproxy's HTTP/1 client) and to an origin still
resolved the same way, and really closes it otherwise. A stalled or half-read connection is therefore never
reused, and closing it (the watchdog's `close_upstream`, the client going away, an error) keeps working.
The resolver (scheme, host, port -> Origin, or None: not pooled) is the origin table; `set_resolver` swaps
it on reload and closes the idle connections to origins it no longer names.

Pure asyncio: no mitmproxy import (mitm/pool_layers.py decides which connections ask, and when).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .pool import ConnectionPool, Origin, TunnelError
from .trust import tls_failure

logger = logging.getLogger(__name__)

Resolver = Callable[[str, str, int], Origin | None]  # (scheme, host, port) -> Origin, or None: not pooled


@dataclass
class Lent:
    """A pooled stream lent to one upstream connection."""

    origin: Origin
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    clean: bool = False  # between exchanges: a response read completely, with keep-alive semantics
    done: bool = False  # given back (or closed)


class Lending:
    """The process's pool, its origin table and the streams lent out, by upstream connection id."""

    def __init__(self) -> None:
        self.pool: ConnectionPool | None = None
        self._resolver: Resolver | None = None
        self._lent: dict[str, Lent] = {}

    def use(self, connection_pool: ConnectionPool | None) -> ConnectionPool:
        """Lend from `connection_pool` (one pool a process: the last chain to load; tests load many),
        or from the pool in use, or a new one; returns the pool in use."""
        if connection_pool is not None and connection_pool is not self.pool:
            if self.pool is not None:
                self.pool.close_all()
            self.pool = connection_pool
        elif self.pool is None:
            self.pool = ConnectionPool()
        return self.pool

    def resolve(self, scheme: str, host: str, port: int) -> Origin | None:
        if self._resolver is None:
            return None
        try:
            return self._resolver(scheme, host, port)
        except Exception:  # a broken resolver must not break mitmproxy: no pooling then
            logger.exception("upstream pool: resolver failed")
            return None

    def set_resolver(self, resolver: Resolver | None) -> None:
        """Swap the origin table (a reload); idle connections to origins it no longer names are closed."""
        self._resolver = resolver
        if self.pool is not None:
            self.pool.retain(lambda o: resolver is not None and self.resolve(o.scheme, o.host, o.port) == o)

    def lent(self, conn_id: str) -> Lent | None:
        return self._lent.get(conn_id)

    async def lend(self, origin: Origin, conn_id: str) -> tuple[asyncio.StreamReader, LentWriter]:
        """A stream to `origin` for connection `conn_id`; a failure is logged (one line) and raised."""
        assert self.pool is not None
        try:
            reader, writer = await self.pool.acquire(origin)
        except ssl.SSLError as e:
            # The same line `upstream_tls` logs for connections mitmproxy sets up itself.
            logger.warning(
                "registryproxy: upstream TLS to %s:%d failed for %s: %s",
                origin.host,
                origin.port,
                _mappings(origin),
                tls_failure(e) or "TLS handshake failed",
            )
            raise
        except OSError as e:
            # mitmproxy answers 502 and the access log says `upstream=failed`; this line says why, and whether it
            # was the forward proxy (`origin` names it by address; its credentials are never in a message).
            reason = (
                str(e)
                if isinstance(e, TunnelError)
                else "timed out"
                if isinstance(e, TimeoutError)
                else type(e).__name__
            )
            logger.warning(
                "registryproxy: upstream connection to %s for %s failed: %s", origin, _mappings(origin), reason
            )
            raise
        lent = self._lent[conn_id] = Lent(origin, reader, writer)
        return reader, LentWriter(self, conn_id, lent)

    def give_back(self, conn_id: str) -> None:
        """Connection `conn_id` is over: its stream, if still lent, goes back to the pool or is closed."""
        lent = self._lent.get(conn_id)
        if lent is not None and not lent.done:
            LentWriter(self, conn_id, lent).close()

    def _returned(self, conn_id: str, lent: Lent) -> None:
        self._lent.pop(conn_id, None)
        pool = self.pool
        if (
            lent.clean
            and pool is not None
            and self.resolve(lent.origin.scheme, lent.origin.host, lent.origin.port) == lent.origin
        ):
            pool.release(lent.origin, lent.reader, lent.writer)
        elif pool is not None:
            pool.discard(lent.writer)
        else:
            lent.writer.close()


class LentWriter:
    """mitmproxy's view of a lent stream's writer: closing it may give it back to the pool."""

    def __init__(self, lending: Lending, conn_id: str, lent: Lent) -> None:
        self._lending = lending
        self._id = conn_id
        self._lent = lent
        self._w = lent.writer
        self.transport = lent.writer.transport

    def write(self, data: bytes) -> None:
        self._w.write(data)

    async def drain(self) -> None:
        await self._w.drain()

    def is_closing(self) -> bool:
        return self._w.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._w.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return self._w.can_write_eof()

    def write_eof(self) -> None:
        # A half-close ends the connection's use as a keep-alive connection.
        self._lent.clean = False
        try:
            self._w.write_eof()
        except NotImplementedError:  # TLS transports cannot half-close
            raise OSError("cannot half-close a TLS connection") from None

    def close(self) -> None:
        if self._lent.done:
            return
        self._lent.done = True
        self._lending._returned(self._id, self._lent)

    async def wait_closed(self) -> None:
        if not self._lent.clean:
            await self._w.wait_closed()


def _mappings(origin: Origin) -> str:
    """The mappings an origin serves, for a log line: `mapping team/`, or `mappings a/, b/`."""
    return f"mappings {origin.label}" if ", " in origin.label else f"mapping {origin.label or '-'}"
