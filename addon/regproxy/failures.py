"""mitmproxy's own error answers, made registry errors.

When an upstream cannot be reached or breaks the protocol, mitmproxy answers the
client itself with an HTML page whose text names the upstream address. No hook can
change that answer, so this module replaces the one function each HTTP version uses
to render it: the client gets the registry's JSON error format, decided by the status
alone, and never mitmproxy's message. Installed once, when the addon loads.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2, _http3

from .errors import for_proxy_failure

_installed = False


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


def install() -> None:
    """Replace mitmproxy's HTML error rendering (idempotent)."""
    global _installed
    if _installed:
        return
    # Each module imported the function by name, so each binding is replaced.
    setattr(_http1, "make_error_response", _make_error_response)  # noqa: B010
    setattr(_http2, "format_error", error_body)  # noqa: B010
    setattr(_http3, "format_error", error_body)  # noqa: B010
    _installed = True
