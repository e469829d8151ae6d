"""Limits: rate limits and a bandwidth circuit breaker, per client and per mapping (limits/).

In the chain just before `Router`: its `requestheaders` keeps the forwarding headers of a trusted
front end (`Router` drops every header a pull does not need), and its `request` hook, which runs
after every step's `requestheaders` (so after `Router` matched the name and checked the token) and
before anything contacts the upstream, asks the store (limits/store.py: memory, or Redis shared by
replicas) to admit the request against every limit that applies (limits/admission.py), in one atomic
step:

- `client_requests`: every request routed upstream takes a token from the client's bucket;
- `manifest_gets`: a manifest GET (and HEAD with `count_heads`) counts in the mapping's window;
- `mapping_bytes`, `client_bytes`: a blob GET is refused once the window's bytes are spent;
- `client_transfers`: a blob GET takes one of the client's slots until it ends.

A refused request gets `429 TOOMANYREQUESTS` with `Retry-After` and the limit's name, and never
reaches the upstream. What is admitted is never cut: a blob transfer running when a count or a
byte budget runs out completes. Bytes are charged when the response headers arrive (the whole
`Content-Length`, so concurrent transfers see the budget spent at once; a transfer that fails
gives back what it did not send), so a budget is exceeded by at most the transfers admitted
before it was spent. Limits a mapping sets itself are kept per mapping (a client's budget there is
its own); the defaults are one budget across the mappings that use them.

Which store, and whether it answers, is `StoreKeeper`'s (limits/keeper.py): if the store fails (Redis
down or slow), the proxy keeps serving: `on_store_failure: open` serves without limits, `closed`
answers 503; either way the failure is counted (`registryproxy_limit_store_failures`) and logged once,
and once more when the store is back.
"""

from __future__ import annotations

import asyncio
import weakref

from mitmproxy import http

from ..config import Mapping
from ..flow import answers, background
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..limits.admission import Held, admission
from ..limits.forwarded import client_address, client_key
from ..limits.keeper import StoreKeeper
from ..limits.settings import FailMode, LimitSettings, Rules, refusal_message
from ..limits.store import LEASE_TTL, Charge, StoreError, retry_seconds
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError
from .config_loader import Configuration

MARK_LIMITED = ":no_entry:"
CLOSED_RETRY = 5  # Retry-After of a 503 while the store fails (on_store_failure: closed)


class Limits:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.keeper = StoreKeeper(metrics, self._fail_mode, background.spawn)
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, Held] = weakref.WeakKeyDictionary()
        # Per flow from a trusted front end: its Forwarded and X-Forwarded-For lines, read before Router.
        self._forwarded: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[list[str], list[str]]] = (
            weakref.WeakKeyDictionary()
        )
        self._leases: dict[str, str] = {}  # lease -> slot key, renewed while held
        self._renewer: asyncio.Task[None] | None = None
        self._rules: tuple[object, dict[str, Rules]] = (None, {})

    async def done(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self.keeper.aclose()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.config.state
        if flow.response or state is None or not state.config.limits.trusted_proxies:
            return
        headers = flow.request.headers
        if "forwarded" in headers or "x-forwarded-for" in headers:
            self._forwarded[flow] = (headers.get_all("forwarded"), headers.get_all("x-forwarded-for"))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        state = self.config.state
        if st is None or st.kind != "upstream" or flow.response is not None or st.match is None or state is None:
            return
        settings = state.config.limits
        mapping = st.match.mapping
        rules = self._rules_for(settings, mapping)
        if not rules.any:
            return
        client = self._client(flow, settings) if rules.per_client else ""
        kind = st.route.kind if st.route is not None else None
        asked = admission(rules, mapping, kind, flow.request.method, client, cached=st.cache in ("hit", "stale"))
        if not asked.checks:
            return
        store = self.keeper.store_for(settings.redis_url)
        try:
            verdict = await store.admit(asked.checks)
        except StoreError as e:
            self.keeper.failed(e)
            if settings.on_store_failure == "closed":
                err = RegistryError(503, "UNAVAILABLE", "rate limits cannot be checked now; retry later")
                self._refuse(flow, "store_unavailable", mapping.label, err, CLOSED_RETRY)
            return
        self.keeper.answered()
        for name, check, used in zip(asked.names, asked.checks, verdict.usage, strict=True):
            if name == "manifest_gets":
                self.metrics.limit_usage(name, mapping.label, used, check.limit)
        if verdict.refused is not None:
            name = asked.names[verdict.refused]
            err = RegistryError(429, "TOOMANYREQUESTS", refusal_message(name, rules))
            self._refuse(flow, name, mapping.label, err, retry_seconds(verdict.retry_after))
            return
        held = asked.held
        if held.byte_windows or held.slot is not None:
            self._flows[flow] = held
            if held.slot is not None:
                self._hold(*held.slot)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        held = self._flows.get(flow)
        resp = flow.response
        if held is None or resp is None or not held.byte_windows:
            return
        length = resp.headers.get("content-length", "")
        if resp.status_code in (200, 206) and length.isdigit():
            held.charged = int(length)
            self._charge(held, held.charged)

    def response(self, flow: http.HTTPFlow) -> None:
        held = self._flows.pop(flow, None)
        if held is None:
            return
        resp = flow.response
        if held.byte_windows and not held.charged and resp is not None and resp.status_code in (200, 206):
            # No Content-Length (a chunked body): charged once it is through.
            st = flowstate.of(flow)
            sent = st.bytes_streamed if st is not None and st.streamed else len(resp.raw_content or b"")
            self._charge(held, sent)
        self._let_go(held)

    def error(self, flow: http.HTTPFlow) -> None:
        held = self._flows.pop(flow, None)
        if held is None:
            return
        if held.charged:
            # The transfer failed: give back what was charged and never sent.
            st = flowstate.of(flow)
            sent = st.bytes_streamed if st is not None and st.streamed else 0
            if held.charged > sent:
                self._charge(held, sent - held.charged)
        self._let_go(held)

    # --- helpers ------------------------------------------------------------------------

    def _rules_for(self, settings: LimitSettings, mapping: Mapping) -> Rules:
        """The mapping's rules over the defaults, computed once per configuration."""
        owner, cache = self._rules
        if owner is not settings:
            cache = {}
            self._rules = (settings, cache)
        rules = cache.get(mapping.key)
        if rules is None:
            rules = cache[mapping.key] = settings.defaults.over(mapping.limits)
        return rules

    def _client(self, flow: http.HTTPFlow, settings: LimitSettings) -> str:
        """The client's key: its address, or the one a trusted front end forwarded for it."""
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        forwarded, xff = self._forwarded.pop(flow, ([], []))
        return client_key(client_address(peer, forwarded, xff, settings.trusted_proxies))

    def _fail_mode(self) -> FailMode:
        state = self.config.state
        return state.config.limits.on_store_failure if state is not None else "open"

    def _refuse(self, flow: http.HTTPFlow, name: str, mapping: str, err: RegistryError, retry: int) -> None:
        """The flow is answered here: nothing goes upstream, and the log line and mitmweb say why."""
        self.metrics.limit_refused(name, mapping)
        flow.marked = MARK_LIMITED
        answers.answer_error(flow, err, {"Retry-After": str(retry)}, note=f"limited: {name}")

    def _charge(self, held: Held, amount: int) -> None:
        store = self.keeper.current
        if amount == 0 or store is None:
            return
        charges = [Charge(key, amount, rate.window) for _, key, rate in held.byte_windows]

        async def charge() -> None:
            try:
                used = await store.charge(charges)
            except StoreError as e:
                self.keeper.failed(e)
                return
            for (name, _, rate), n in zip(held.byte_windows, used, strict=True):
                if name == "mapping_bytes":
                    self.metrics.limit_usage(name, held.mapping, n, rate.amount)

        background.spawn(charge())

    def _let_go(self, held: Held) -> None:
        store = self.keeper.current
        if held.slot is None or store is None:
            return
        key, lease = held.slot
        self._leases.pop(lease, None)

        async def release() -> None:
            try:
                await store.release(key, lease)
            except StoreError as e:
                self.keeper.failed(e)  # the lease expires by itself (LEASE_TTL)

        background.spawn(release())

    def _hold(self, key: str, lease: str) -> None:
        self._leases[lease] = key
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Keep the transfer slots this process holds alive (a dead replica's expire by themselves)."""
        while self._leases:
            await asyncio.sleep(LEASE_TTL / 3)
            store = self.keeper.current
            if store is None:
                return
            try:
                await store.renew([(k, lease) for lease, k in list(self._leases.items())])
            except StoreError as e:
                self.keeper.failed(e)
