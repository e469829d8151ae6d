"""Where a flow the proxy answered itself shows it went: the proxy, as the client addressed it.

In reverse mode every request starts out aimed at the mode's default target, a dead address
(`http://127.0.0.1:9`) that is never used: `Router` re-aims what it sends upstream, and the flows the
proxy answers itself (the ping and its challenge, `/token`, refusals, health and metrics) kept the dead
URL, which is what mitmweb showed. When such a flow's answer is about to be sent (`responseheaders`,
which mitmproxy runs for local answers too) or it has failed, `LocalAddress` aims it at the address
the client used: its scheme (TLS or not), and its Host (`:authority`), else the address of the socket
it connected to. Nothing is ever sent there: an answered flow goes nowhere, and a failed one is over.
The client's Host header stays as it was sent. Until then the flow keeps the dead target, the mark
of a request that was never routed.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import http

from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.messages import client_host, client_tls


class LocalAddress:
    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy runs it for a local answer too, once the request is complete, right before the send.
        self._aim(flow)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._aim(flow)

    def _aim(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is None or st.kind == "upstream" or (flow.response is None and flow.error is None):
            return
        address = proxy_address(flow)
        if address is None:
            return
        scheme, host, port = address
        flow.request.scheme = scheme
        # Not the `host`/`port` setters: they would rewrite the client's Host header too.
        flow.request.data.host, flow.request.data.port = host, port


def proxy_address(flow: http.HTTPFlow) -> tuple[str, str, int] | None:
    """(scheme, host, port) of the proxy as the client addressed it; None if it cannot be told."""
    scheme = "https" if client_tls(flow) else "http"
    host = client_host(flow.request)
    if host is not None:
        try:
            parts = urlsplit(f"//{host}")
            name, port = parts.hostname, parts.port
        except ValueError:  # a port beyond 65535
            name, port = None, None
        if name:
            return scheme, name, port if port is not None else (443 if scheme == "https" else 80)
    sockname = flow.client_conn.sockname
    if sockname and len(sockname) >= 2 and isinstance(sockname[0], str) and isinstance(sockname[1], int):
        return scheme, sockname[0], sockname[1]
    return None
