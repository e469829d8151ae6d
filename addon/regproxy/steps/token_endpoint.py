"""The proxy's own token endpoint (`/token`): PASETO tokens wrapping the upstreams' tokens.

It also answers at `/ns/HOST/token`, the realm of requests with containerd's `?ns=HOST` (mirror
mode, see tokens/issuer.py): there scopes name that registry's repositories.

`requestheaders` claims the path and keeps the query for `request` (which has the body of a
POST grant and may await upstream token services); the flow itself keeps neither the query (a
scope can name a capability) nor the client's Authorization, before anything shows it.
"""

from __future__ import annotations

import json
import weakref

from mitmproxy import http

from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import TOKEN_PATH, fail_closed
from ..flow.messages import client_host, client_tls, content_length
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError
from ..protocol.scopes import pull_names
from ..tokens.issuer import mirror_base, parse_token_request, public_base, token_path
from .config_loader import Configuration


class TokenEndpoint:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        # Per flow: the query, the base URL and the mirrored registry (`/ns/HOST/token`), for `request`.
        self._queries: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[list[tuple[str, str]], str, str | None]] = (
            weakref.WeakKeyDictionary()
        )

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        state = self.config.state
        if flow.response or st is None or state is None:
            return
        claimed, ns = token_path(flow.request.path.partition("?")[0])
        if not claimed or (ns is not None and not state.matcher.mirror_mode):
            return
        req = flow.request
        path = TOKEN_PATH if ns is None else f"{mirror_base('', ns)}{TOKEN_PATH}"
        st.kind, st.log_path = "token", path
        base = public_base(state.config, client_host(req), client_tls(flow))
        st.base = base if ns is None else mirror_base(base, ns)
        self._queries[flow] = (list(req.query.fields), base, ns)
        req.path = path
        if "authorization" in req.headers:
            req.headers["Authorization"] = "[redacted]"
        if req.method not in ("GET", "POST"):
            answers.answer_error(flow, RegistryError(405, "UNSUPPORTED", "the token endpoint answers GET and POST"))
        elif content_length(req) > answers.MAX_LOCAL_BODY:
            # Refused before mitmproxy reads the body: the answer closes the connection unread (the log says so).
            answers.answer_error(flow, RegistryError(413, "SIZE_INVALID", "token request too large"))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        state = self.config.state
        if st is None or st.kind != "token" or flow.response or state is None:
            return
        req = flow.request
        host = client_host(req)
        try:
            form = None
            if req.method == "POST":
                form = list(req.urlencoded_form.fields)
                # Parsed: the flow keeps no password or refresh token.
                req.content = state.redactor.text(req.get_text(strict=False) or "").encode()
            query, base, ns = self._queries.pop(flow, ([], st.base, None))
            parsed = parse_token_request(req.method, query, form)
            names = pull_names(list(parsed.scopes))
            matches = [m for n in names if (m := state.matcher.match(n, host, ns)) is not None]
            labels = sorted({m.mapping.label for m in matches})
            if labels:
                st.log_path = f"{st.log_path} ({', '.join(labels)})"
            links = sorted({m.link.id for m in matches if m.link is not None})
            if links:
                st.link = ",".join(links)
            if ns is None:
                answer = await state.tokens.answer(parsed, base, host)
            else:
                answer = await state.tokens.answer(parsed, base, host, ns=ns)
        except RegistryError as e:
            answers.answer_error(flow, e, token=f"refused: {e.message or e.code}", refusal=e.code.lower())
            return
        self.metrics.token_issued(parsed.grant_type or "anonymous")
        body = json.dumps(answer.body).encode()
        answers.answer_locally(flow, 200, body, {"Cache-Control": "no-store"}, token=answer.outcome)
