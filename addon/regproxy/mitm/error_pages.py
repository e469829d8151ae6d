"""mitmproxy's own error answers, made registry errors.

When an upstream cannot be reached or breaks the protocol, mitmproxy answers the
client itself with an HTML page whose text names the upstream address. No hook can
change that answer, so this module replaces the one function each HTTP version uses
to render it: the client gets the registry's JSON error format, decided by the status
alone, and never mitmproxy's message. Installed once, when the chain loads (steps/error_pages.py),
after the compatibility check (compat.py) has found every target as expected.

One more patch, for a hang: mitmproxy 12.3.1 asserts the upstream's peer name right after
connecting (proxy/server.py, `open_connection`). An upstream that resets the connection at once
has none; the assertion kills the connection task, and the request waits for an answer forever
(seen in about 5% of such connects). `_open_connection` turns that into a failed connect, which
mitmproxy answers as a 502 (rendered as a registry error, above).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import events, server
from mitmproxy.proxy.layers.http import _http1, _http2, _http3

from ..protocol.errors import for_proxy_failure
from . import compat

_installed = False
_open_connection_orig: Callable[[server.ConnectionHandler, Any], Awaitable[None]] | None = None


def error_body(status_code: int, message: str = "") -> bytes:
    """A registry error body for a failure mitmproxy reports; `message` is deliberately unused."""
    return for_proxy_failure(status_code).body()


def _make_error_response(status_code: int, message: str = "") -> bytes:
    err = for_proxy_failure(status_code)
    resp = http.Response.make(
        err.status,
        err.body(),
        http.Headers(
            Connection="close",
            Content_Type="application/json; charset=utf-8",
            Docker_Distribution_Api_Version="registry/2.0",
        ),
    )
    raw: bytes = http1.assemble_response(resp)
    return raw


async def _open_connection(self: server.ConnectionHandler, command: Any) -> None:
    assert _open_connection_orig is not None
    try:
        await _open_connection_orig(self, command)
    except AssertionError:
        conn = command.connection
        if conn.peername is not None:
            raise
        io = self.transports.pop(conn, None)
        if io is not None and io.writer is not None:
            io.writer.close()
        conn.state = ConnectionState.CLOSED
        conn.error = "connection reset by peer"
        await self.server_event(events.OpenConnectionCompleted(command, conn.error))


def install() -> None:
    """Replace mitmproxy's HTML error rendering, and wrap its connect (idempotent).

    Raises `compat.Incompatible` instead when the running mitmproxy is not the one these patches fit.
    """
    global _installed, _open_connection_orig
    if _installed:
        return
    compat.require()
    _open_connection_orig = server.ConnectionHandler.open_connection
    functools.update_wrapper(_open_connection, _open_connection_orig, assigned=(), updated=())  # `__wrapped__` only
    # Each module imported the function by name, so each binding is replaced.
    setattr(_http1, "make_error_response", _make_error_response)  # noqa: B010
    setattr(_http2, "format_error", error_body)  # noqa: B010
    setattr(_http3, "format_error", error_body)  # noqa: B010
    setattr(server.ConnectionHandler, "open_connection", _open_connection)  # noqa: B010
    _installed = True
