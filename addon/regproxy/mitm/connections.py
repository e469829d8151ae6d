"""Closing a client or an upstream connection from an addon, which mitmproxy has no API for.

Both go through the proxy server addon's connection handlers (`Proxyserver.connections`, keyed by
client connection id), the same objects mitmproxy itself uses to close connections.
"""

from __future__ import annotations

from mitmproxy import ctx, http


def close_client(client_id: str) -> None:
    """Close a client connection (and with it the flows on it)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client_id)
    if handler is not None:
        handler.close_connection(handler.client)


def close_upstream(flow: http.HTTPFlow) -> None:
    """Close the flow's upstream connection, or the connection attempt still under way.

    The flow's server connection once connected, else the pending connection to the flow's
    upstream. mitmproxy then answers the client with its "server closed connection" error (a
    registry 502, see `failures`), or fails a body in transit (never a silently short one).
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is None:
        return
    transports = getattr(handler, "transports", {})
    if flow.server_conn in transports:
        handler.close_connection(flow.server_conn)
        return
    target = (flow.request.host, flow.request.port)
    for conn in list(transports):
        pending = getattr(conn, "timestamp_tcp_setup", None) is None
        if conn is not flow.client_conn and getattr(conn, "address", None) == target and pending:
            handler.close_connection(conn)
