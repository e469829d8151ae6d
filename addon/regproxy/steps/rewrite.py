"""What the upstream says about itself, said as the proxy: response headers and small bodies.

`responseheaders` keeps only the headers a registry client needs (identity and quota headers go),
replaces every upstream error with the proxy's own registry error (a 401 with the proxy's
challenge; the upstream body, which may name the upstream repository, is never read), rewrites
`Location` and `Link` to local names (see `links`), and turns on streaming for everything but a
tags list, whose body `response` rewrites.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.messages import content_length
from ..flow.state import FlowState
from ..mapping.matcher import Match
from ..mapping.translate import rewrite_link, rewrite_location, rewrite_tags
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError, for_upstream_status
from ..protocol.names import Route, RouteKind
from ..protocol.scopes import repository_scope
from .config_loader import Configuration

MAX_TAGS_BODY = 16 * 1024 * 1024
# Response headers the upstream may send a client; identity and quota headers are dropped.
FORWARD_RESPONSE_HEADERS = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-range",
        b"accept-ranges",
        b"transfer-encoding",
        b"content-encoding",
        b"docker-content-digest",
        b"docker-distribution-api-version",
        b"etag",
        b"last-modified",
        b"cache-control",
        b"expires",
        b"date",
        b"location",
        b"link",
        b"oci-subject",
        b"oci-filters-applied",
    }
)


class ResponseRewrite:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is None or st.kind != "upstream" or flow.response is None or st.match is None or st.route is None:
            return
        self._rewrite(flow, flow.response, st, st.match, st.route)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        resp = flow.response
        if st is None or st.kind != "upstream" or resp is None or st.match is None:
            return
        if st.error_body is not None:
            if resp.raw_content is not None and flow.request.method != "HEAD":
                resp.content = st.error_body
        elif st.route is not None and st.route.kind is RouteKind.TAGS and resp.status_code == 200:
            rewritten = rewrite_tags(resp.content or b"", st.match, st.page, "link" in resp.headers, st.tag_filter)
            if rewritten is None:
                flow.response = answers.error_response(
                    RegistryError(502, "UNAVAILABLE", "upstream answered a malformed tags list")
                )
                return
            resp.content, link = rewritten
            if link is not None:
                resp.headers["Link"] = link

    def _rewrite(self, flow: http.HTTPFlow, resp: http.Response, st: FlowState, match: Match, route: Route) -> None:
        st.upstream_status = resp.status_code
        upstream_challenge = resp.headers.get("www-authenticate")
        client = self.config.client
        if resp.status_code == 401 and upstream_challenge and client is not None:
            client.learn(match.mapping.upstream, upstream_challenge)
            client.drop_tokens(match.mapping)  # a cached upstream token may be what was refused

        resp.headers = http.Headers([(k, v) for k, v in resp.headers.fields if k.lower() in FORWARD_RESPONSE_HEADERS])

        if resp.status_code >= 400:
            upstream_status = resp.status_code
            err = for_upstream_status(upstream_status, route.kind.value)
            resp.status_code = err.status
            resp.reason = ""
            body = err.body()
            content_range = resp.headers.get("content-range")
            resp.headers = http.Headers(
                Content_Type=answers.JSON_TYPE,
                Content_Length=str(len(body)),
                Docker_Distribution_Api_Version="registry/2.0",
            )
            if flow.request.http_version.startswith("HTTP/1"):
                # The client has its whole answer before the upstream's body is over (which it may never
                # be as announced): the connection must not carry another request.
                resp.headers["Connection"] = "close"
            if upstream_status == 416 and content_range is not None and content_range.startswith("bytes */"):
                resp.headers["Content-Range"] = content_range  # the blob's size, as a client needs it
            if err.status == 401:
                scope = repository_scope(match.local_name)
                resp.headers["WWW-Authenticate"] = answers.challenge_header(st.base, scope, "invalid_token")
            st.error_body = body
            resp.stream = _replace_body(body)
            st.streamed = True
            return

        location = resp.headers.get("location")
        if location is not None:
            if 300 <= resp.status_code < 400:
                self.metrics.redirect(match.mapping.label)
            new_location = rewrite_location(location, flow.request.url, match)
            if new_location is None:
                del resp.headers["location"]
            else:
                resp.headers["Location"] = new_location
        links = resp.headers.get_all("link")
        if links:
            resp.headers.set_all("link", [x for x in (rewrite_link(v, match) for v in links) if x is not None])
        resp.headers.setdefault("Docker-Distribution-Api-Version", "registry/2.0")

        if route.kind is RouteKind.TAGS and resp.status_code == 200 and flow.request.method == "GET":
            if content_length(resp) > MAX_TAGS_BODY:
                flow.kill()
            return  # buffered: the body's `name` is rewritten in `response`
        resp.stream = True  # upstream_watch wraps it to count bytes and notice stalls
        st.streamed = True


def _replace_body(body: bytes) -> Callable[[bytes], bytes]:
    """A stream function that discards the upstream body and sends `body` instead, at once: an upstream
    error body may never end as announced (distribution's 416 announces the blob's length)."""
    sent = False

    def stream(data: bytes) -> bytes:
        nonlocal sent
        if sent:
            return b""
        sent = True
        return body

    return stream
