"""Pooled upstream connections for mitmproxy 12: shared across client connections.

mitmproxy opens upstream connections per client connection and does the upstream TLS in a
`ServerTLSLayer` inside that client's layer stack; when the client connection ends, its
upstream connections are closed. skopeo and podman open a new connection per request, so
each of their requests cost a new TCP and TLS handshake to the upstream (two round trips
over the WAN). This module makes mitmproxy take its upstream *streams* from the pool instead
(`regproxy.transport.pool.ConnectionPool`, lent through `regproxy.transport.lending`), for the
origins a resolver names:

1. `mitmproxy.proxy.layers.http`'s `tls.ServerTLSLayer` (the layer `HttpLayer.get_connection`
   puts under `HttpClient` for an https request) is replaced, for resolved origins only, by a
   pass-through layer: TLS is then done on the socket by the pool (the origin's SSLContext:
   the mapping's trust, SNI), so the TLS session is not tied to a client's stack.
   The decision is recorded per server connection, so the socket is never opened without
   TLS when the layer was skipped.
2. `ConnectionHandler.open_connection` is wrapped: for a resolved origin it marks the task,
   and `asyncio.open_connection` as `mitmproxy.proxy.server` sees it (a module-local shim,
   nothing global) then lends a pooled stream (or opens one: TCP, CONNECT through a forward
   proxy, TLS) instead of dialling. Everything else in mitmproxy's function (hooks, the
   transport table, the read loop, errors rendered by `mitm.error_pages`) is unchanged.
3. `Http1Client.send` / `mark_done` are wrapped to know whether the connection is between
   exchanges: clean once a response is read completely with keep-alive semantics (framed
   body, no `Connection: close`, no upgrade), dirty from the next request head on.
4. The stream's writer is wrapped (`lending.LentWriter`): when mitmproxy closes the connection (the
   client went away, the h2-to-h1 single-use rule, the addon's watchdog, an error), a clean
   connection goes back to the pool and anything else is really closed. A stalled or half-read
   connection is therefore never reused, and the watchdog's `close_connection` keeps working.

Only HTTP/1.1 goes over pooled connections (ALPN offers http/1.1 only). Credentials stay per
request: the pool holds sockets, never headers. Installed once; `set_resolver` swaps the
origin table on reload (idle connections to origins no longer resolved are closed).
Written against mitmproxy 12.3.x; `install` requires the compatibility check (compat.py) to pass.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from types import ModuleType
from typing import Any

from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestHeaders

from ..transport.lending import Lending, Resolver
from ..transport.pool import ConnectionPool, Origin
from . import compat
from . import error_pages as failures

logger = logging.getLogger(__name__)

__all__ = ["Resolver", "install", "pool", "set_resolver"]

_lending = Lending()
_socket_tls: dict[str, Origin] = {}  # server connection id -> origin whose TLS the socket does
_opening: contextvars.ContextVar[tuple[Origin, str] | None] = contextvars.ContextVar(
    "regproxy_pool_opening", default=None
)
_installed = False
_orig: dict[str, Any] = {}


def pool() -> ConnectionPool | None:
    return _lending.pool


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
            lent = _lending.lent(conn.id)
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
        origin = _lending.resolve("https", server_conn.address[0], server_conn.address[1])
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


async def _pooled_open_connection(host: str, port: int, **kwargs: Any) -> tuple[Any, Any]:
    opening = _opening.get()
    if opening is None or _lending.pool is None:
        return await asyncio.open_connection(host, port, **kwargs)
    origin, conn_id = opening
    # Always suspend once, as a real connect does: mitmproxy registers the connection's transport
    # right after creating this task, and an eagerly run task that finished without suspending
    # would have its transport entry overwritten (seen: `assert writer` in server_event).
    await asyncio.sleep(0)
    return await _lending.lend(origin, conn_id)


async def _open_connection(self: server.ConnectionHandler, command: Any) -> None:
    conn = command.connection
    origin = _socket_tls.get(conn.id)
    if origin is None and not conn.tls and conn.transport_protocol == "tcp" and not conn.via and conn.address:
        origin = _lending.resolve("http", conn.address[0], conn.address[1])
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
        _lending.give_back(conn.id)  # if mitmproxy left without closing (it always closes)


def _http1_send(self: _http1.Http1Client, event: Any) -> layer.CommandGenerator[None]:
    if isinstance(event, RequestHeaders):
        lent = _lending.lent(self.conn.id)
        if lent is not None:
            lent.clean = False
    return _orig["send"](self, event)  # type: ignore[no-any-return]


def _http1_mark_done(
    self: _http1.Http1Client, *, request: bool = False, response: bool = False
) -> layer.CommandGenerator[None]:
    lent = _lending.lent(self.conn.id)
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
    """Patch mitmproxy (once) and set the resolver; returns the pool in use.

    Raises `compat.Incompatible` instead when the running mitmproxy is not the one these patches fit.
    """
    global _installed
    if not _installed:
        compat.require()
    failures.install()  # it replaces open_connection too: it must be wrapped, not wrap us
    in_use = _lending.use(connection_pool)
    set_resolver(resolver)
    if _installed:
        return in_use
    _orig["open_connection"] = server.ConnectionHandler.open_connection
    _orig["send"] = _http1.Http1Client.send
    _orig["mark_done"] = _http1.Http1Client.mark_done
    functools.update_wrapper(_open_connection, _orig["open_connection"], assigned=(), updated=())  # `__wrapped__`
    setattr(server.ConnectionHandler, "open_connection", _open_connection)  # noqa: B010
    setattr(server, "asyncio", _ModuleShim(asyncio, open_connection=_pooled_open_connection))  # noqa: B010
    setattr(http_layers, "tls", _ModuleShim(tls_layers, ServerTLSLayer=_server_tls_layer))  # noqa: B010
    setattr(_http1.Http1Client, "send", _http1_send)  # noqa: B010
    setattr(_http1.Http1Client, "mark_done", _http1_mark_done)  # noqa: B010
    _installed = True
    return in_use


def set_resolver(resolver: Resolver | None) -> None:
    """Swap the origin table (a reload); idle connections to origins it no longer names are closed."""
    _lending.set_resolver(resolver)
