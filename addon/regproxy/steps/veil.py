"""Secrets in flows: mitmweb, `-w` and mitmdump's dump never see what the proxy must not show.

mitmweb shows flows, `-w` saves them, mitmdump prints them; all of them read the flow in hooks
that run after the registryproxy chain, and mitmweb pushes it to the browser in every `update`.
So the flow they see never holds a secret:
- `Veil`, last in the chain, hides at the end of every hook: the client's Authorization; the
  local path of a locally answered request (it can name a capability key); and, in the response,
  whatever the redactor finds (a token, a challenge naming a capability, a signed redirect query).
  The response's real parts are held in `FlowSecrets`, not in the flow;
- `Unveil`, first in the chain for `response` and `error`, puts the held parts back so the chain
  works on the real response (and `Veil` hides them again at the end);
- `Courier`, the very last addon of the whole master, puts in what is about to be sent in the
  `update` that mitmproxy runs right before the send (the upstream Authorization, once the request
  has been shown; the real response, once it is complete), and hides it again once it has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, hooks, http

from ..debug.redact import Redactor
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from .config_loader import Configuration

logger = logging.getLogger("registryproxy")

REDACTED = "[redacted]"
# Bodies up to this size are searched for secrets before a flow is shown or stored: the spec's
# 4 MiB cap on manifests, which `KeepBodies` keeps; larger ones are blobs, streamed, never kept.
MAX_SCRUBBED_BODY = 4 * 1024 * 1024


@dataclass
class Held:
    """Parts of a response the flow shows redacted (None: the part shown is the real one)."""

    headers: http.Headers | None = None
    body: bytes | None = None

    def empty(self) -> bool:
        return self.headers is None and self.body is None


@dataclass
class _Secrets:
    held: Held
    ready: bool = False  # `Courier` puts `held` in at the next update: the response is sent next
    auth_pending: bool = False  # `Courier` adds the upstream Authorization at the next update
    shown: Held | None = None  # the redacted parts, to show again once sent


class FlowSecrets:
    """What each flow must send but not show; shared by `Unveil`, `Veil` and `Courier`."""

    def __init__(self, config: Configuration) -> None:
        self.config = config
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, _Secrets] = weakref.WeakKeyDictionary()

    def of(self, flow: http.HTTPFlow) -> _Secrets:
        s = self._flows.get(flow)
        if s is None:
            s = self._flows[flow] = _Secrets(Held())
        return s

    def get(self, flow: http.HTTPFlow) -> _Secrets | None:
        return self._flows.get(flow)

    def redactor(self) -> Redactor:
        state = self.config.state
        return state.redactor if state is not None else Redactor()


class Unveil:
    """First in the chain for `response` and `error`: the real response, for the chain to work on."""

    def __init__(self, secrets: FlowSecrets) -> None:
        self.secrets = secrets

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._unveil(flow)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._unveil(flow)

    def _unveil(self, flow: http.HTTPFlow) -> None:
        s = self.secrets.get(flow)
        if s is None:
            return
        held, s.held, s.ready = s.held, Held(), False
        if flow.response is not None:
            if held.headers is not None:
                flow.response.headers = held.headers
            if held.body is not None:
                flow.response.raw_content = held.body


class Veil:
    """Last in the chain: leave no secret in the flow for the hooks after the chain."""

    def __init__(self, secrets: FlowSecrets) -> None:
        self.secrets = secrets

    def running(self) -> None:
        # Again after a script reload, so there is always exactly one, at the very end.
        addons = ctx.master.addons
        existing = addons.get(Courier.name)
        if existing is not None:
            addons.remove(existing)
        addons.add(Courier(self.secrets))

    def done(self) -> None:
        # Flows still in flight when the proxy stops are saved (`-w`) after this hook. The courier
        # stays: removing an addon while mitmproxy iterates its chain could skip another's `done`.
        for flow in flowstate.in_flight():
            if "authorization" in flow.request.headers:
                flow.request.headers["Authorization"] = REDACTED

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is None:
            return
        if flow.response is not None and st.kind != "token":
            # Answered locally: the flow keeps only the redacted path (a local path can hold a capability key).
            flow.request.path = st.log_path if st.log_path.startswith("/") else f"/v2/{st.log_path}"
        self._hide(flow, ready=False)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is None:
            return
        self._hide(flow, ready=False)
        if st.kind == "upstream" and flow.response is None and st.upstream_auth:
            self.secrets.of(flow).auth_pending = True

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is not None:
            # A streamed response's headers are sent right after this hook (and its update).
            self._hide(flow, ready=st.streamed)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flowstate.of(flow) is not None:
            self._hide(flow, ready=True)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        if flowstate.of(flow) is not None:
            self._hide(flow, ready=False)

    def _hide(self, flow: http.HTTPFlow, *, ready: bool) -> None:
        """The request's secrets were sent already (or never will be): they go for good. The
        response's may still have to be sent: they are held, and with `ready` (the response is sent
        right after this hook) `Courier` puts them back in the next update."""
        s = self.secrets.get(flow)
        if s is not None:
            s.auth_pending = False
        if "authorization" in flow.request.headers:
            flow.request.headers["Authorization"] = REDACTED
        resp = flow.response
        if resp is None:
            return
        s = s or self.secrets.of(flow)
        redactor = self.secrets.redactor()
        if s.held.headers is None:
            shown = scrubbed_headers(resp.headers, redactor)
            if shown is not None:
                s.held.headers, resp.headers = resp.headers, shown
        if s.held.body is None and resp.raw_content:
            body = scrubbed_body(resp.raw_content, redactor)
            if body != resp.raw_content:
                s.held.body, resp.raw_content = resp.raw_content, body
        s.ready = ready and not s.held.empty()


class Courier:
    """The last addon of the master: puts in, for the send, what `Veil` kept out of the flow.

    mitmproxy runs the `update` hook after every flow hook, and mitmweb pushes the flow to the
    browser in it; the request or response is sent right after. So this acts in `update`, after
    mitmweb (and everything else) has seen the flow without its secrets.
    """

    name = "registryproxy-courier"

    def __init__(self, secrets: FlowSecrets) -> None:
        self.secrets = secrets

    def update(self, flows: list[Any]) -> None:
        for flow in flows:
            if isinstance(flow, http.HTTPFlow):
                try:
                    self._deliver(flow)
                except Exception as e:  # noqa: BLE001 - fail closed: what is sent stays redacted
                    logger.error("internal error delivering a flow (%s)", type(e).__name__)

    def _deliver(self, flow: http.HTTPFlow) -> None:
        s = self.secrets.get(flow)
        st = flowstate.of(flow)
        if s is None or st is None:
            return
        if s.auth_pending:
            s.auth_pending = False
            if st.upstream_auth and flow.live and flow.response is None:
                flow.request.headers["Authorization"] = st.upstream_auth
        resp = flow.response
        if s.ready and resp is not None:
            s.ready = False
            held, s.held = s.held, Held()
            s.shown = Held(
                resp.headers if held.headers is not None else None,
                resp.raw_content if held.body is not None else None,
            )
            if held.headers is not None:
                resp.headers = held.headers
            if held.body is not None:
                resp.raw_content = held.body
            asyncio.get_running_loop().call_soon(self._rehide, weakref.ref(flow), 0)

    def _rehide(self, ref: weakref.ref[http.HTTPFlow], tries: int) -> None:
        """Once the response has been sent, the flow shows the redacted one again."""
        flow = ref()
        s = self.secrets.get(flow) if flow is not None else None
        if flow is None or s is None or s.shown is None or flow.response is None:
            return
        if flow.live and tries < 300:
            asyncio.get_running_loop().call_later(0.01, self._rehide, ref, tries + 1)
            return
        shown, s.shown = s.shown, None
        if shown.headers is not None:
            flow.response.headers = shown.headers
        if shown.body is not None:
            flow.response.raw_content = shown.body
        with contextlib.suppress(Exception):
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))


def scrubbed_headers(headers: http.Headers, redactor: Redactor) -> http.Headers | None:
    """The headers with secrets redacted (a redirect's query too: it may be a storage signature);
    None when there is nothing to redact."""
    location = headers.get("location")
    if (location is None or "?" not in location) and not redactor.needed(
        b"\n".join(v for _, v in headers.fields).decode("latin-1")
    ):
        return None
    fields = []
    changed = False
    for k, v in headers.fields:
        text = v.decode("latin-1")
        shown = text
        if k.lower() == b"location":
            base, sep, _ = shown.partition("?")
            shown = f"{base}?{REDACTED}" if sep else base
        shown = redactor.text(shown)
        if shown != text:
            changed = True
            fields.append((k, shown.encode("latin-1")))
        else:
            fields.append((k, v))
    return http.Headers(fields) if changed else None


def scrubbed_body(raw: bytes, redactor: Redactor) -> bytes:
    """A small body with secrets redacted; larger ones (blobs) are never held in a flow."""
    if len(raw) > MAX_SCRUBBED_BODY:
        return raw
    text = raw.decode("utf-8", "surrogateescape")
    redacted = redactor.text(text)
    return raw if redacted == text else redacted.encode("utf-8", "surrogateescape")
