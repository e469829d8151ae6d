"""Pooled upstream connections for mitmproxy 12: shared across client connections.

mitmproxy opens upstream connections per client connection and does the upstream TLS in a
`ServerTLSLayer` inside that client's layer stack; when the client connection ends, its
upstream connections are closed. skopeo and podman open a new connection per request, so
each of their requests cost a new TCP and TLS handshake to the upstream (two round trips
over the WAN). This module makes mitmproxy take its upstream *streams* from
`regproxy.connpool.ConnectionPool` instead, for the origins a resolver names:

1. `mitmproxy.proxy.layers.http`'s `tls.ServerTLSLayer` (the layer `HttpLayer.get_connection`
   puts under `HttpClient` for an https request) is replaced, for resolved origins only, by a
   pass-through layer: TLS is then done on the socket by `connpool` (the origin's SSLContext:
   the mapping's trust, SNI), so the TLS session is not tied to a client's stack.
   The decision is recorded per server connection, so the socket is never opened without
   TLS when the layer was skipped.
2. `ConnectionHandler.open_connection` is wrapped: for a resolved origin it marks the task,
   and `asyncio.open_connection` as `mitmproxy.proxy.server` sees it (a module-local shim,
   nothing global) then lends a pooled stream (or opens one: TCP, CONNECT through a forward
   proxy, TLS) instead of dialling. Everything else in mitmproxy's function (hooks, the
   transport table, the read loop, errors rendered by `regproxy.failures`) is unchanged.
3. `Http1Client.send` / `mark_done` are wrapped to know whether the connection is between
   exchanges: clean once a response is read completely with keep-alive semantics (framed
   body, no `Connection: close`, no upgrade), dirty from the next request head on.
4. The stream's writer is wrapped: when mitmproxy closes the connection (the client went away,
   the h2-to-h1 single-use rule, the addon's watchdog, an error), a clean connection goes back
   to the pool and anything else is really closed. A stalled or half-read connection is
   therefore never reused, and the watchdog's `close_connection` keeps working.

Only HTTP/1.1 goes over pooled connections (ALPN offers http/1.1 only). Credentials stay per
request: the pool holds sockets, never headers. Installed once; `set_resolver` swaps the
origin table on reload (idle connections to origins no longer resolved are closed).
Written against mitmproxy 12.3.x; `install` refuses other major versions.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mitmproxy import version as mitmproxy_version
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestHeaders

from ..transport.pool import ConnectionPool, Origin, TunnelError
from ..transport.trust import tls_failure
from . import error_pages as failures

logger = logging.getLogger(__name__)

Resolver = Callable[[str, str, int], Origin | None]  # (scheme, host, port) -> Origin, or None: not pooled


@dataclass
class _Lent:
    origin: Origin
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    clean: bool = False
    done: bool = False


_pool: ConnectionPool | None = None
_resolver: Resolver | None = None
_socket_tls: dict[str, Origin] = {}  # server connection id -> origin whose TLS the socket does
_lent: dict[str, _Lent] = {}  # server connection id -> the stream it was lent
_opening: contextvars.ContextVar[tuple[Origin, str] | None] = contextvars.ContextVar(
    "regproxy_pool_opening", default=None
)
_installed = False
_orig: dict[str, Any] = {}


def pool() -> ConnectionPool | None:
    return _pool


def _resolve(scheme: str, host: str, port: int) -> Origin | None:
    if _resolver is None:
        return None
    try:
        return _resolver(scheme, host, port)
    except Exception:  # a broken resolver must not break mitmproxy: no pooling then
        logger.exception("upstream pool: resolver failed")
        return None


class _SocketTls(layer.Layer):
    """Stands where `ServerTLSLayer` would: the socket below already speaks TLS."""

    child_layer: layer.Layer

    def __init__(self, context: Any, origin: Origin) -> None:
        super().__init__(context)
        conn = context.server
        conn.tls = True  # what HttpLayer's connection reuse compares
        conn.sni = origin.sni
        _socket_tls[conn.id] = origin

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.OpenConnectionCompleted) and event.reply is None:
            conn = self.context.server
            lent = _lent.get(conn.id)
            if lent is None or not lent.origin.tls:
                # The socket was not opened by the pool (a patch was undone?): it has no TLS, and
                # the request must not go out in clear. Fail the connection instead.
                logger.error("upstream pool: connection to %s was not opened with TLS; refused", conn.address)
                yield commands.CloseConnection(conn)
                event = events.OpenConnectionCompleted(event.command, "upstream TLS not established")
        yield from self.child_layer.handle_event(event)


def _server_tls_layer(context: Any, conn: Any = None) -> layer.Layer:
    server_conn = conn or context.server
    if conn is None and server_conn.transport_protocol == "tcp" and not server_conn.via and server_conn.address:
        origin = _resolve("https", server_conn.address[0], server_conn.address[1])
        if origin is not None and origin.tls:
            return _SocketTls(context, origin)
    return tls_layers.ServerTLSLayer(context, conn)


class _ModuleShim:
    """A module seen through one replaced attribute; everything else is the real module's."""

    def __init__(self, module: ModuleType, **overrides: Any) -> None:
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _LentWriter:
    """mitmproxy's view of a lent stream's writer: closing it may give it back to the pool."""

    def __init__(self, conn_id: str, lent: _Lent) -> None:
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
        lent = self._lent
        if lent.done:
            return
        lent.done = True
        _lent.pop(self._id, None)
        _socket_tls.pop(self._id, None)
        if (
            lent.clean
            and _pool is not None
            and _resolve(lent.origin.scheme, lent.origin.host, lent.origin.port) == lent.origin
        ):
            _pool.release(lent.origin, lent.reader, lent.writer)
        elif _pool is not None:
            _pool.discard(lent.writer)
        else:
            lent.writer.close()

    async def wait_closed(self) -> None:
        if not self._lent.clean:
            await self._w.wait_closed()


def _mappings(origin: Origin) -> str:
    """The mappings an origin serves, for a log line: `mapping team/`, or `mappings a/, b/`."""
    return f"mappings {origin.label}" if ", " in origin.label else f"mapping {origin.label or '-'}"


async def _pooled_open_connection(host: str, port: int, **kwargs: Any) -> tuple[Any, Any]:
    opening = _opening.get()
    if opening is None or _pool is None:
        return await asyncio.open_connection(host, port, **kwargs)
    origin, conn_id = opening
    # Always suspend once, as a real connect does: mitmproxy registers the connection's transport
    # right after creating this task, and an eagerly run task that finished without suspending
    # would have its transport entry overwritten (seen: `assert writer` in server_event).
    await asyncio.sleep(0)
    try:
        reader, writer = await _pool.acquire(origin)
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
            str(e) if isinstance(e, TunnelError) else "timed out" if isinstance(e, TimeoutError) else type(e).__name__
        )
        logger.warning("registryproxy: upstream connection to %s for %s failed: %s", origin, _mappings(origin), reason)
        raise
    lent = _Lent(origin, reader, writer)
    _lent[conn_id] = lent
    return reader, _LentWriter(conn_id, lent)


async def _open_connection(self: server.ConnectionHandler, command: Any) -> None:
    conn = command.connection
    origin = _socket_tls.get(conn.id)
    if origin is None and not conn.tls and conn.transport_protocol == "tcp" and not conn.via and conn.address:
        origin = _resolve("http", conn.address[0], conn.address[1])
        if origin is not None and origin.tls:
            origin = None  # resolved as https, but mitmproxy was asked for plain: leave it alone
    if origin is None:
        await _orig["open_connection"](self, command)
        return
    token = _opening.set((origin, conn.id))
    try:
        await _orig["open_connection"](self, command)
    finally:
        _opening.reset(token)
        _socket_tls.pop(conn.id, None)
        lent = _lent.get(conn.id)
        if lent is not None and not lent.done:  # mitmproxy left without closing (it always closes)
            _LentWriter(conn.id, lent).close()


def _http1_send(self: _http1.Http1Client, event: Any) -> layer.CommandGenerator[None]:
    if isinstance(event, RequestHeaders):
        lent = _lent.get(self.conn.id)
        if lent is not None:
            lent.clean = False
    return _orig["send"](self, event)  # type: ignore[no-any-return]


def _http1_mark_done(
    self: _http1.Http1Client, *, request: bool = False, response: bool = False
) -> layer.CommandGenerator[None]:
    lent = _lent.get(self.conn.id)
    if lent is not None and (self.request_done or request) and (self.response_done or response):
        lent.clean = _keeps_alive(self)
    return _orig["mark_done"](self, request=request, response=response)  # type: ignore[no-any-return]


def _keeps_alive(client: _http1.Http1Client) -> bool:
    req, resp = client.request, client.response
    if req is None or resp is None or client.buf:
        return False
    try:
        if _http1.should_make_pipe(req, resp) or http1.expected_http_body_size(req, resp) == -1:
            return False
    except ValueError:
        return False
    if http1.connection_close(resp.http_version, resp.headers):
        return False
    # An HTTP/2 client's request is sent as HTTP/1.1 (mitmproxy then closes; the socket is still fine).
    closes = http1.connection_close(req.http_version, req.headers)
    return bool(req.is_http2 or req.is_http3 or not closes)


def install(resolver: Resolver, connection_pool: ConnectionPool | None = None) -> ConnectionPool:
    """Patch mitmproxy (once) and set the resolver; returns the pool in use."""
    global _installed, _pool
    major = mitmproxy_version.VERSION.split(".")[0]
    if major != "12":
        raise RuntimeError(f"upstream pool: written for mitmproxy 12, not {mitmproxy_version.VERSION}")
    failures.install()  # it replaces open_connection too: it must be wrapped, not wrap us
    if connection_pool is not None and connection_pool is not _pool:
        if _pool is not None:
            _pool.close_all()
        _pool = connection_pool  # one pool a process: the last chain to load (tests load many)
    elif _pool is None:
        _pool = ConnectionPool()
    set_resolver(resolver)
    if _installed:
        return _pool
    _orig["open_connection"] = server.ConnectionHandler.open_connection
    _orig["send"] = _http1.Http1Client.send
    _orig["mark_done"] = _http1.Http1Client.mark_done
    setattr(server.ConnectionHandler, "open_connection", _open_connection)  # noqa: B010
    setattr(server, "asyncio", _ModuleShim(asyncio, open_connection=_pooled_open_connection))  # noqa: B010
    setattr(http_layers, "tls", _ModuleShim(tls_layers, ServerTLSLayer=_server_tls_layer))  # noqa: B010
    setattr(_http1.Http1Client, "send", _http1_send)  # noqa: B010
    setattr(_http1.Http1Client, "mark_done", _http1_mark_done)  # noqa: B010
    _installed = True
    return _pool


def set_resolver(resolver: Resolver | None) -> None:
    """Swap the origin table (a reload); idle connections to origins it no longer names are closed."""
    global _resolver
    _resolver = resolver
    if _pool is not None:
        _pool.retain(lambda o: resolver is not None and _resolve(o.scheme, o.host, o.port) == o)
