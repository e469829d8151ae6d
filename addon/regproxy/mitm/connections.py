"""Closing a client or an upstream connection from an addon, which mitmproxy has no API for.

Both go through the proxy server addon's connection handlers (`Proxyserver.connections`, keyed by
client connection id; each handler's `transports` and `close_connection`), the same objects mitmproxy
itself uses to close connections. These are private to mitmproxy: compat.py checks them at start-up, and
here they are read as attributes, never with a default, so a rename fails loudly instead of closing nothing.
A master without the proxy server addon (mitmproxy's test context) has no connections to close.

`CONNECTION_LOGGER` is the logger of mitmproxy's per-connection lines (client connect and disconnect,
server connect), which the access log quiets unless asked for.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import connection, ctx, http

CONNECTION_LOGGER = "mitmproxy.proxy.server"  # mitmproxy/proxy/server.py's `logger` (compat.py checks it)


def _handler(client_id: str) -> Any:
    """The proxy server's handler of client connection `client_id`, or None (gone, or no proxy server)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    if proxyserver is None:
        return None
    return proxyserver.connections.get(client_id)


def close_client(client_id: str) -> None:
    """Close a client connection (and with it the flows on it)."""
    handler = _handler(client_id)
    if handler is not None:
        handler.close_connection(handler.client)


def close_upstream(flow: http.HTTPFlow) -> None:
    """Close the flow's upstream connection, or the connection attempt still under way.

    The flow's server connection once connected, else the pending connection to the flow's
    upstream. mitmproxy then answers the client with its "server closed connection" error (a
    registry 502, see `error_pages`), or fails a body in transit (never a silently short one).
    """
    handler = _handler(flow.client_conn.id)
    if handler is None:
        return
    transports = handler.transports
    if flow.server_conn in transports:
        handler.close_connection(flow.server_conn)
        return
    target = (flow.request.host, flow.request.port)
    for conn in list(transports):
        if isinstance(conn, connection.Server) and conn.address == target and conn.timestamp_tcp_setup is None:
            handler.close_connection(conn)
