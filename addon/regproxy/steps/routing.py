"""Routing: which repository a request names, whether its token allows it, and where it goes.

For every registry path except the token endpoint, `Router.requestheaders` takes three steps:
`_parse` reads which route (and repository) the request names, answering what is not a route;
`_authorize` reads the client's PASETO token and decides (`mapping.access.authorize`) whether it
allows the request and through which mapping, answering the ping and the catalog, challenges, 404 for
unknown names and 405 for anything but a pull; `_rewrite` points the request at that mapping's
upstream: URL, the pull headers a client may send, and the upstream credential (sent later by
`veil.Courier`, after display).

Mirror mode: a request with containerd's `?ns=HOST` is served by the mapping that mirrors HOST
(mapping/matcher.py), its challenges name the realm of that registry and its token must have been
issued there (tokens/issuer.py); an unknown HOST is answered as an unknown name, a malformed one 404
at once.
"""

from __future__ import annotations

from typing import assert_never

from mitmproxy import http

from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.messages import client_host, client_tls, safe_path
from ..flow.state import FlowState
from ..mapping.translate import upstream_params, upstream_path
from ..protocol.errors import RegistryError
from ..protocol.names import parse_route
from ..tokens.access import Allowed, Answer, Asked, Challenge, authorize, log_path, mirror_ns, read_token
from ..tokens.issuer import mirror_base, public_base
from .config_loader import Configuration, State

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
        if flow.response or flow.error or not flow.live or st is None or state is None or st.kind == "token":
            return
        asked = self._parse(flow, st, state)
        if asked is None:
            return
        allowed = self._authorize(flow, st, state, asked)
        if allowed is not None:
            self._rewrite(flow, st, asked, allowed)

    def _parse(self, flow: http.HTTPFlow, st: FlowState, state: State) -> Asked | None:
        """What the request names: its route, and for a mirror request the registry. Notes the route,
        the public base URL and the name for the log; None: answered here (not a route, or a name asked
        for from a registry no mapping can mirror)."""
        req = flow.request
        path, _, query = req.path.partition("?")
        host = client_host(req)
        asked_ns, ns = mirror_ns(query) if state.matcher.mirror_mode else (False, None)
        base = public_base(state.config, host, client_tls(flow))
        st.base = mirror_base(base, ns) if ns is not None else base
        try:
            route = parse_route(path)
        except RegistryError as e:
            st.log_path = safe_path(path)
            answers.answer_error(flow, e)
            return None
        asked = Asked(route, path, query, host, ns)
        st.route = route
        st.log_path = log_path(asked)
        if ns is None and asked_ns and route.is_repository:
            # No registry has such a name: nothing to look up or ask for a token.
            answers.answer_error(flow, RegistryError(404, "NAME_UNKNOWN"))
            return None
        return asked

    def _authorize(self, flow: http.HTTPFlow, st: FlowState, state: State, asked: Asked) -> Allowed | None:
        """Whether the client's token allows the request, and through which mapping (noted with the name
        the log shows); None: answered here (the ping, the catalog, a challenge, 404 or 405)."""
        # Read here; from now on the client's Authorization is never shown (veil.Veil) nor sent
        # upstream (the upstream request's headers are rebuilt from FORWARD_REQUEST_HEADERS).
        presented = read_token(state.codec, flow.request.headers.get("authorization"), st.base)
        decided = authorize(asked, flow.request.method, presented, state.matcher)
        if decided.match is not None:
            st.match = decided.match
            st.log_path = log_path(asked, decided.match)
            if decided.match.link is not None:
                st.link, st.link_state = decided.match.link.id, decided.match.link.state
        if isinstance(decided, Allowed):
            st.token = "ok"
            return decided
        self._answer(flow, st.base, decided)
        return None

    @staticmethod
    def _answer(flow: http.HTTPFlow, base: str, answer: Answer) -> None:
        """The answer `authorize` decided on, with the token outcome it notes."""
        token, refusal = answer.token, answer.refusal
        match answer.reply:
            case Challenge(scope, error):
                answers.answer_challenge(flow, base, scope, error, token=token, refusal=refusal)
            case RegistryError() as err:
                answers.answer_error(flow, err, token=token, refusal=refusal)
            case bytes() as body:
                answers.answer_locally(flow, 200, body, token=token, refusal=refusal)
            case _:
                assert_never(answer.reply)

    def _rewrite(self, flow: http.HTTPFlow, st: FlowState, asked: Asked, allowed: Allowed) -> None:
        """Point the request at the mapping's upstream: scheme, host, port, path and query, the pull
        headers only; and note the upstream credential, sent after display."""
        req = flow.request
        match = allowed.match
        upstream = match.mapping.upstream
        st.upstream_auth = allowed.upstream_auth
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
        params = upstream_params(asked.route, asked.query)
        st.page = dict(params)
        req.scheme = upstream.scheme
        req.data.host = upstream.host
        req.data.port = upstream.port
        req.path = upstream_path(match, asked.route, params)
        st.kind = "upstream"
        flow.comment = (
            f"registryproxy: {st.log_path} via {match.mapping.label} -> {upstream.netloc}/{match.upstream_name}"
        )
