"""Facts read off a mitmproxy message: the client's host and TLS, a body's announced length, a
printable path. Shared by the addons that route, answer and rewrite requests."""

from __future__ import annotations

import re

from mitmproxy import http

from ..mapping.matcher import redact_name

UNBOUNDED = 1 << 62
_HOST_RE = re.compile(r"(?:[a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")


def client_host(req: http.Request) -> str | None:
    """The Host (or :authority) the client used, when it is a well-formed host[:port]."""
    host = (req.host_header or "").strip().lower()
    return host if host and _HOST_RE.fullmatch(host) else None


def client_tls(flow: http.HTTPFlow) -> bool:
    return bool(flow.client_conn.tls_established)


def content_length(msg: http.Message) -> int:
    """The body length a message announces; unknown (chunked, or an HTTP/2 or 3 request body
    without content-length) counts as unbounded."""
    value = msg.headers.get("content-length")
    if value is None:
        if "transfer-encoding" in msg.headers:
            return UNBOUNDED
        if isinstance(msg, http.Request) and (msg.is_http2 or msg.is_http3) and msg.method not in ("GET", "HEAD"):
            return UNBOUNDED
        return 0
    try:
        return int(value)
    except ValueError:
        return UNBOUNDED


def safe_path(path: str) -> str:
    """A request path for logs: bounded, printable, capability-like segments hidden."""
    printable = "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in path[:200])
    return redact_name(printable)


def peer(flow: http.HTTPFlow) -> str:
    """The client's address as `host:port` (`[v6]:port`), or `-`."""
    address = flow.client_conn.peername
    if not address:
        return "-"
    host = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])
    return f"{host}:{address[1]}"
