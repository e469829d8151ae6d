"""Routing: which repository a request names, whether its token allows it, and where it goes.

For every registry path except the token endpoint, `Router.requestheaders` parses the route,
answers locally what the proxy owns (the ping, the catalog, challenges, 404 for unknown names,
405 for anything but a pull), checks the client's PASETO token against the mapping that serves
the name, and rewrites the request to that mapping's upstream: URL, the pull headers a client
may send, and the upstream credential (sent later by `secrets.Courier`, after display).

Mirror mode: a request with containerd's `?ns=HOST` is served by the mapping that mirrors HOST
(mapping.py), its challenges name the realm of that registry and its token must have been issued
there (tokenservice.py); an unknown HOST is answered as an unknown name, a malformed one 404 at once.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode

from mitmproxy import http

from ..config import mirror_host
from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.messages import client_host, client_tls, safe_path
from ..flow.state import FlowState
from ..mapping.matcher import redact_name
from ..mapping.translate import upstream_params
from ..protocol.errors import RegistryError
from ..protocol.names import RouteKind, is_valid_name, parse_route
from ..protocol.scopes import repository_scope
from ..tokens.issuer import mirror_base, public_base
from ..tokens.paseto import AccessToken, TokenError
from .config_loader import Configuration, State

logger = logging.getLogger("registryproxy")

# Request headers a client may send upstream; everything else (Authorization, cookies,
# X-Forwarded-*, hop-by-hop headers) is dropped. Order and repeated lines are kept.
FORWARD_REQUEST_HEADERS = frozenset(
    {b"accept", b"range", b"if-range", b"if-none-match", b"if-modified-since", b"user-agent"}
)


class Router:
    def __init__(self, config: Configuration) -> None:
        self.config = config

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        state = self.config.state
        if flow.response or st is None or state is None or st.kind == "token":
            return
        req = flow.request
        path, _, query = req.path.partition("?")
        host = client_host(req)
        asked_ns, ns = _mirror_ns(query) if state.matcher.mirror_mode else (False, None)
        base = public_base(state.config, host, client_tls(flow))
        base = st.base = mirror_base(base, ns) if ns is not None else base
        try:
            route = parse_route(path)
        except RegistryError as e:
            st.log_path = safe_path(path)
            answers.reply_error(flow, e)
            return
        st.route = route
        st.log_path = redact_name(route.name) + route.suffix if route.name else path
        if ns is not None:
            st.log_path += f"?ns={ns}"
        elif asked_ns and route.is_repository:
            # No registry has such a name: nothing to look up or ask for a token.
            answers.reply_error(flow, RegistryError(404, "NAME_UNKNOWN"))
            return

        # Read here; from now on the client's Authorization is never shown (secrets.Veil) nor sent
        # upstream (the upstream request's headers are rebuilt from FORWARD_REQUEST_HEADERS).
        token, token_error = _read_token(state, req, st, base)
        if route.kind is RouteKind.PING or route.kind is RouteKind.CATALOG:
            if token is None:
                st.token = token_error or "none"
                scope = "registry:catalog:*" if route.kind is RouteKind.CATALOG else None
                answers.challenge(flow, base, scope, token_error)
            else:
                st.token = "ok"
                # Capability keys and upstream names are never listed.
                answers.reply(flow, 200, b"{}" if route.kind is RouteKind.PING else b'{"repositories":[]}')
            return

        scope = repository_scope(route.name)
        if token is None:
            st.token = token_error or "none"
            answers.challenge(flow, base, scope, token_error)
            return
        grant = token.grant_for(route.name)
        if grant is None:
            st.token, st.token_refusal = "insufficient scope", "insufficient_scope"
            answers.challenge(flow, base, scope, "insufficient_scope")
            return
        match = state.matcher.match(route.name, host, ns)
        if match is not None and not is_valid_name(match.upstream_name):
            match = None
        if match is None:
            st.token = "ok"
            answers.reply_error(flow, RegistryError(404, "NAME_UNKNOWN"))
            return
        st.match = match
        st.log_path = match.log_name + route.suffix + (f"?ns={ns}" if ns is not None else "")
        if grant.mapping != match.mapping.identity:
            st.token, st.token_refusal = "stale (mapping changed)", "invalid_token"
            answers.challenge(flow, base, scope, "invalid_token")
            return
        st.token = "ok"
        if req.method not in ("GET", "HEAD") or route.kind is RouteKind.UPLOAD:
            answers.reply_error(flow, RegistryError(405, "UNSUPPORTED", "this registry is pull-only"))
            return

        upstream = match.mapping.upstream
        # The upstream token from the client's token, else the mapping's own credentials, else none.
        st.upstream_auth = f"Bearer {grant.upstream_token}" if grant.upstream_token else match.mapping.auth
        # One new header list (building it once is much cheaper than setting headers one by one).
        fields = [(k, v) for k, v in req.headers.fields if k.lower() in FORWARD_REQUEST_HEADERS]
        if req.is_http2 or req.is_http3:
            req.authority = upstream.netloc  # HTTP/2's Host; mitmproxy turns it into Host for HTTP/1
        else:
            # Origin-form upstream, whatever form the client's target had: an absolute-form target
            # (`GET http://other.example/v2/…`) must not name another host to the upstream.
            req.authority = ""
            fields.insert(0, (b"Host", upstream.netloc.encode()))
        req.headers = http.Headers(fields)
        params = upstream_params(route, query)
        st.page = dict(params)
        qs = f"?{urlencode(params)}" if params else ""
        req.scheme = upstream.scheme
        req.data.host = upstream.host
        req.data.port = upstream.port
        req.path = f"/v2/{match.upstream_name}{route.suffix}{qs}"
        st.kind = "upstream"
        flow.comment = (
            f"registryproxy: {st.log_path} via {match.mapping.label} -> {upstream.netloc}/{match.upstream_name}"
        )


def _mirror_ns(query: str) -> tuple[bool, str | None]:
    """containerd's `?ns=HOST` (the registry a mirror request is for): whether one was given, and the
    registry host, normalised; None when absent, repeated with other values or malformed."""
    if "ns=" not in query:
        return False, None
    values = {v for k, v in parse_qsl(query, keep_blank_values=True) if k == "ns"}
    if not values:
        return False, None
    return True, mirror_host(values.pop()) if len(values) == 1 else None


def _read_token(state: State, req: http.Request, st: FlowState, audience: str) -> tuple[AccessToken | None, str | None]:
    """The client's valid access token, or None with the challenge error to answer."""
    value = req.headers.get("authorization")
    if not value:
        return None, None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        st.token_refusal = "invalid_token"
        return None, "invalid_token"
    try:
        return state.codec.read_access(credential.strip(), audience), None
    except TokenError as e:
        logger.debug("token refused: %s", e.reason)
        st.token_refusal = "expired" if e.reason == "expired" else "invalid_token"
        return None, "invalid_token"
