"""Limits: rate limits and a bandwidth circuit breaker, per client and per mapping (limits.py).

In the chain just before `Router`: its `requestheaders` keeps the forwarding headers of a trusted
front end (`Router` drops every header a pull does not need), and its `request` hook, which runs
after every step's `requestheaders` (so after `Router` matched the name and checked the token) and
before anything contacts the upstream, asks the store (limitstore.py: memory, or Redis shared by replicas) to admit the
request against every limit that applies, in one atomic step:

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

If the store fails (Redis down or slow), the proxy keeps serving: `on_store_failure: open` serves
without limits, `closed` answers 503; either way the failure is counted
(`registryproxy_limit_store_failures`) and logged once, and once more when the store is back.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from dataclasses import dataclass, field

from mitmproxy import http

from ..config import Mapping
from ..flow import answers, background
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.state import FlowState
from ..limits.forwarded import client_address, client_key
from ..limits.settings import LimitSettings, Rate, Rules, refusal_message
from ..limits.store import LEASE_TTL, Charge, Check, MemoryStore, Store, StoreError, retry_seconds
from ..limits.store_redis import RedisStore
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError
from ..protocol.names import RouteKind
from .config_loader import Configuration

logger = logging.getLogger("registryproxy")

MARK_LIMITED = ":no_entry:"
CLOSED_RETRY = 5  # Retry-After of a 503 while the store fails (on_store_failure: closed)


@dataclass
class _Admitted:
    """What an admitted flow holds: byte windows to charge, a transfer slot to give back."""

    mapping: str
    byte_windows: list[tuple[str, str, Rate]] = field(default_factory=list)  # (limit, key, rate)
    slot: tuple[str, str] | None = None  # (key, lease)
    charged: int = 0


class Limits:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._store: Store | None = None
        self._store_url: str | None = None
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, _Admitted] = weakref.WeakKeyDictionary()
        # Per flow from a trusted front end: its Forwarded and X-Forwarded-For lines, read before Router.
        self._forwarded: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[list[str], list[str]]] = (
            weakref.WeakKeyDictionary()
        )
        self._leases: dict[str, str] = {}  # lease -> slot key, renewed while held
        self._renewer: asyncio.Task[None] | None = None
        self._failing = False
        self._rules: tuple[object, dict[str, Rules]] = (None, {})

    async def done(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._store is not None:
            await self._store.aclose()

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
        checks, names, admitted = self._checks(flow, st, settings, rules, mapping)
        if not checks:
            return
        store = self._store_for(settings)
        try:
            verdict = await store.admit(checks)
        except StoreError as e:
            self._store_failed(e)
            if settings.on_store_failure == "closed":
                self._refuse(flow, st, "store_unavailable", mapping.label)
                err = RegistryError(503, "UNAVAILABLE", "rate limits cannot be checked now; retry later")
                answers.reply_error(flow, err, {"Retry-After": str(CLOSED_RETRY)})
            return
        self._store_ok()
        for name, check, used in zip(names, checks, verdict.usage, strict=True):
            if name == "manifest_gets":
                self.metrics.limit_usage(name, mapping.label, used, check.limit)
        if verdict.refused is not None:
            name = names[verdict.refused]
            self._refuse(flow, st, name, mapping.label)
            err = RegistryError(429, "TOOMANYREQUESTS", refusal_message(name, rules))
            answers.reply_error(flow, err, {"Retry-After": str(retry_seconds(verdict.retry_after))})
            return
        if admitted.byte_windows or admitted.slot is not None:
            self._flows[flow] = admitted
            if admitted.slot is not None:
                self._hold(*admitted.slot)

    def _checks(
        self, flow: http.HTTPFlow, st: FlowState, settings: LimitSettings, rules: Rules, mapping: Mapping
    ) -> tuple[list[Check], list[str], _Admitted]:
        """The checks this request must pass, the limit each stands for, and what admission holds."""
        req = flow.request
        own = mapping.limits
        given = own.given if own is not None else frozenset()
        label = mapping.label

        def scope(name: str, client: str) -> str:
            # A limit the mapping sets itself is a budget of that mapping; a default is one budget.
            return f"{name}:{label}:{client}" if name in given else f"{name}:*:{client}"

        client = ""
        if rules.client_requests or rules.client_bytes or rules.client_transfers:
            peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
            forwarded, xff = self._forwarded.pop(flow, ([], []))
            addr = client_address(peer, forwarded, xff, settings.trusted_proxies)
            client = client_key(addr)
        checks: list[Check] = []
        names: list[str] = []
        admitted = _Admitted(label)
        kind = st.route.kind if st.route is not None else None
        get = req.method == "GET"
        if rules.client_requests is not None:
            per_second = rules.client_requests.per_second
            checks.append(Check("bucket", scope("client_requests", client), rules.burst, per_second))
            names.append("client_requests")
        if kind is RouteKind.MANIFEST and rules.manifest_gets is not None and (get or rules.count_heads):
            gets = rules.manifest_gets
            checks.append(Check("window", f"manifest_gets:{label}", gets.amount, gets.window))
            names.append("manifest_gets")
        if get and kind in (RouteKind.MANIFEST, RouteKind.BLOB):
            for name, rate, key in (
                ("mapping_bytes", rules.mapping_bytes, f"mapping_bytes:{label}"),
                ("client_bytes", rules.client_bytes, scope("client_bytes", client)),
            ):
                if rate is None:
                    continue
                admitted.byte_windows.append((name, key, rate))
                if kind is RouteKind.BLOB:  # the breaker refuses new transfers; manifests only count
                    checks.append(Check("window", key, rate.amount, rate.window, count=False))
                    names.append(name)
        if get and kind is RouteKind.BLOB and rules.client_transfers is not None:
            lease = uuid.uuid4().hex
            key = scope("client_transfers", client)
            checks.append(Check("slots", key, rules.client_transfers, lease=lease))
            names.append("client_transfers")
            admitted.slot = (key, lease)
        return checks, names, admitted

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

    def _store_for(self, settings: LimitSettings) -> Store:
        if self._store is None or settings.redis_url != self._store_url:
            old = self._store
            self._store = RedisStore(settings.redis_url) if settings.redis_url else MemoryStore()
            self._store_url = settings.redis_url
            self._failing = False
            if old is not None:
                background.spawn(old.aclose())
        return self._store

    def _refuse(self, flow: http.HTTPFlow, st: FlowState, name: str, mapping: str) -> None:
        """The flow is answered here: nothing goes upstream, and the log line and mitmweb say why."""
        self.metrics.limit_refused(name, mapping)
        st.kind = "local"
        st.upstream_auth = None
        st.token = f"{st.token}; limited: {name}"
        flow.marked = MARK_LIMITED

    def _charge(self, held: _Admitted, amount: int) -> None:
        if amount == 0 or self._store is None:
            return
        store = self._store
        charges = [Charge(key, amount, rate.window) for _, key, rate in held.byte_windows]

        async def charge() -> None:
            try:
                used = await store.charge(charges)
            except StoreError as e:
                self._store_failed(e)
                return
            for (name, _, rate), n in zip(held.byte_windows, used, strict=True):
                if name == "mapping_bytes":
                    self.metrics.limit_usage(name, held.mapping, n, rate.amount)

        background.spawn(charge())

    def _let_go(self, held: _Admitted) -> None:
        if held.slot is None or self._store is None:
            return
        key, lease = held.slot
        self._leases.pop(lease, None)
        store = self._store

        async def release() -> None:
            try:
                await store.release(key, lease)
            except StoreError as e:
                self._store_failed(e)  # the lease expires by itself (LEASE_TTL)

        background.spawn(release())

    def _hold(self, key: str, lease: str) -> None:
        self._leases[lease] = key
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Keep the transfer slots this process holds alive (a dead replica's expire by themselves)."""
        while self._leases:
            await asyncio.sleep(LEASE_TTL / 3)
            if self._store is None:
                return
            try:
                await self._store.renew([(k, lease) for lease, k in list(self._leases.items())])
            except StoreError as e:
                self._store_failed(e)

    def _store_failed(self, e: StoreError) -> None:
        self.metrics.limit_store_failed()
        if not self._failing:
            self._failing = True
            state = self.config.state
            mode = state.config.limits.on_store_failure if state is not None else "open"
            what = "serving without limits" if mode == "open" else "answering 503 to limited requests"
            logger.error("registryproxy: limits store failed (%s); %s until it answers again", e, what)

    def _store_ok(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("registryproxy: limits store answers again; limits apply")
