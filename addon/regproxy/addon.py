"""The mitmproxy addon: hooks only, over the pure modules beside it.

Request path (see README "How a pull flows through the proxy"):
- `requestheaders`: recognise the route; answer locally what the proxy owns (ping,
  catalog, challenges, errors) or check the client's PASETO, and rewrite the request
  to the upstream (URL, allowed headers, upstream credentials).
- `request`: the token endpoint (it needs the request body and awaits upstream).
- `responseheaders`: rewrite what the upstream says about itself (challenges, Location,
  Link, error bodies, identity headers) and turn on streaming.
- `response` / `error`: finish the body rewrites that need the body; one log line; then
  hide every secret the flow holds (see "Secrets in flows" below).

Every hook fails closed: an exception never lets a flow go on unmodified.

Secrets in flows: mitmweb shows flows, `-w` saves them, mitmdump prints them; all of those read
the flow in hooks that run after this addon's. So the flow they see never holds a secret:
- a local path (which can hold a capability key) and the client's Authorization are replaced in
  `requestheaders`, before mitmweb first shows the flow;
- the upstream Authorization is added in `request` (after mitmweb has shown the request) and
  replaced once the upstream has answered;
- what the client is sent (a token, a challenge naming its capability) is replaced at the end of
  this addon's `response` hook, put back for the send by `Courier` (an addon that runs after all
  others), and replaced again as soon as it has been sent, with an `update` so mitmweb refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

from mitmproxy import connection, ctx, exceptions, hooks, http
from mitmproxy.addonmanager import Loader

from . import failures, metrics
from .challenge import bearer_challenge
from .config import Config, ConfigError, load_file
from .errors import RegistryError, for_upstream_status
from .mapping import Match, Matcher, redact_name
from .names import TAG_RE, Route, RouteKind, is_valid_name, parse_route
from .redact import Redactor, capability_keys
from .scopes import pull_names, repository_scope
from .tokens import AccessToken, TokenCodec, TokenError
from .tokenservice import TokenService, parse_token_request, public_base
from .upstream import RegistryClient

logger = logging.getLogger("registryproxy")

CONFIG_ENV = "REGISTRYPROXY_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent.parent / "config.yaml"
TOKEN_PATH = "/token"
API_VERSION = {"Docker-Distribution-Api-Version": "registry/2.0"}
# The largest request body the proxy lets mitmproxy read: the token endpoint's form, and the body of any
# request it answers itself (mitmproxy reads a body in full before it sends a local answer).
MAX_LOCAL_BODY = 64 * 1024
MAX_TAGS_BODY = 16 * 1024 * 1024
# Bodies up to this size are searched for secrets before a flow is shown or stored; larger
# ones are blobs, which are streamed and never kept in a flow.
MAX_SCRUBBED_BODY = 256 * 1024
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MARK_FAILED = ":red_circle:"
MARK_REFUSED = ":warning:"
CONFIG_POLL_SECONDS = 1.0

# Request headers a client may send upstream; everything else (Authorization, cookies,
# X-Forwarded-*, hop-by-hop headers) is dropped. Order and repeated lines are kept.
FORWARD_REQUEST_HEADERS = frozenset(
    {b"accept", b"range", b"if-range", b"if-none-match", b"if-modified-since", b"user-agent"}
)
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
_HOST_RE = re.compile(r"(?:[a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")
_LINK_RE = re.compile(r"\s*<([^>]*)>\s*(;.*)?")


@dataclass
class Held:
    """Parts of a response the flow shows redacted (None: the part shown is the real one)."""

    headers: http.Headers | None = None
    body: bytes | None = None


@dataclass
class FlowState:
    """What the addon decided about one flow (kept out of the flow so it is never stored)."""

    started: float = field(default_factory=time.monotonic)
    kind: str = "local"  # local | token | upstream
    route: Route | None = None
    match: Match | None = None
    log_path: str = "-"
    base: str = ""  # the public base URL the client used: realm and token audience
    page: dict[str, str] = field(default_factory=dict)  # tags/list `n` and `last` as asked
    query: list[tuple[str, str]] = field(default_factory=list)  # the token endpoint's, before redaction
    token: str = "-"
    token_refusal: str | None = None  # for metrics: why a presented or requested token was refused
    upstream_status: int | None = None
    upstream_auth: str | None = field(default=None, repr=False)  # added by `Courier`, after display
    auth_pending: bool = False
    upstream_sent: float = 0.0
    error_body: bytes | None = None
    watchdog: asyncio.TimerHandle | None = None
    timed_out: bool = False
    streamed: bool = False  # the response headers went to the client before the `response` hook
    last_data: float = 0.0
    bytes_streamed: int = 0
    busy: bool = False  # counted as a request in progress on its client connection
    # What the client must be sent, while hooks after this addon see the redacted response.
    held: Held = field(default_factory=lambda: Held(), repr=False)
    ready: bool = False  # `Courier` puts `held` in at the next update: the response is sent next
    shown: Held | None = field(default=None, repr=False)  # the redacted parts, to show again once sent

    def settle(self) -> None:
        """The upstream answered (or failed): stop waiting for it."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None


@dataclass(frozen=True)
class State:
    """Everything derived from one loaded configuration; replaced as a whole on reload."""

    config: Config
    path: str
    matcher: Matcher
    codec: TokenCodec
    tokens: TokenService
    redactor: Redactor


@dataclass
class ClientWatch:
    """One client connection: since when it has had nothing in progress, and how much it has."""

    idle_since: float = field(default_factory=time.monotonic)
    busy: int = 0


F = TypeVar("F", bound=Callable[..., Any])


def fail_closed(hook: F) -> F:
    """Run a hook; on any exception answer the client with an error, or kill the flow."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: RegistryProxy, flow: http.HTTPFlow) -> None:
            try:
                await cast(Callable[..., Awaitable[None]], hook)(self, flow)
            except Exception as e:  # noqa: BLE001 - every failure must fail closed
                self._internal_error(flow, hook.__name__, e)

        return cast(F, async_wrapper)

    @functools.wraps(hook)
    def wrapper(self: RegistryProxy, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:  # noqa: BLE001 - every failure must fail closed
            self._internal_error(flow, hook.__name__, e)

    return cast(F, wrapper)


class RegistryProxy:
    def __init__(self) -> None:
        self.state: State | None = None
        self.client: RegistryClient | None = None
        self.metrics = metrics.Metrics()
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()
        self._streaming: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._idle_check: asyncio.Task[None] | None = None
        self._clients: dict[str, ClientWatch] = {}
        self._client_check: asyncio.Task[None] | None = None
        self._config_watch: asyncio.Task[None] | None = None
        self._config_stat: tuple[int, int, int] | None = None
        self._ops: metrics.OpsServer | None = None
        self._ops_listen = ""
        self._sighup = False
        self._access_log: logging.Logger | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registryproxy_config",
            str,
            "",
            f"Path of the registryproxy YAML configuration (default: ${CONFIG_ENV}, else config.yaml "
            "at the repository root). Reloaded when the file changes and on SIGHUP.",
        )
        loader.add_option(
            "registryproxy_connection_logs",
            bool,
            False,
            "Also log mitmproxy's per-connection lines (client/server connect) at info level.",
        )
        loader.add_option(
            "registryproxy_log_format",
            str,
            "text",
            "The per-request log line: text (readable) or json (one JSON object a line, on stdout).",
            choices=("text", "json"),
        )
        loader.add_option(
            "registryproxy_client_timeout",
            int,
            60,
            "Seconds a client connection may take to send a complete request (headers and the small "
            "bodies the proxy reads), or may sit idle between requests, before it is closed.",
        )
        loader.add_option(
            "registryproxy_ops_listen",
            str,
            "",
            "HOST:PORT of a separate plain-HTTP listener for /metrics, /healthz and /readyz; when set, "
            "the registry port no longer answers those paths.",
        )
        loader.add_option(
            "registryproxy_watch_config",
            bool,
            True,
            "Reload the configuration file when it changes (it is always reloaded on SIGHUP).",
        )
        failures.install()
        _connection_logs(False)

    def configure(self, updated: set[str]) -> None:
        if "registryproxy_connection_logs" in updated:
            _connection_logs(ctx.options.registryproxy_connection_logs)
        if "registryproxy_log_format" in updated:
            self._access_log = _json_access_log() if ctx.options.registryproxy_log_format == "json" else None
        if "registryproxy_client_timeout" in updated and ctx.options.registryproxy_client_timeout <= 0:
            raise exceptions.OptionsError("registryproxy_client_timeout: must be a positive number of seconds")
        if "registryproxy_ops_listen" in updated and ctx.options.registryproxy_ops_listen:
            try:
                metrics.parse_listen(ctx.options.registryproxy_ops_listen)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            if self._ops is not None:
                self._start_ops()
        if "registryproxy_config" not in updated and self.state is not None:
            return
        path = ctx.options.registryproxy_config or os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
        try:
            self._install(self._load(path))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        if self.state is None:
            # Started without any configure call naming our option (e.g. a master that adds the
            # addon directly): load the default configuration now, or fail start-up loudly.
            try:
                self.configure({"registryproxy_config"})
            except exceptions.OptionsError as e:
                logger.error("registryproxy: %s", e)
        # The proxy routes per request and needs the client's Host: never dial the default
        # reverse target eagerly, and keep the Host header mitmproxy would otherwise replace.
        updates: dict[str, Any] = {}
        if ctx.options.connection_strategy != "lazy":
            updates["connection_strategy"] = "lazy"
        if not ctx.options.keep_host_header:
            updates["keep_host_header"] = True
        if updates:
            ctx.options.update(**updates)
        _add_courier(self)
        self._start_ops()
        loop = asyncio.get_running_loop()
        if self._config_watch is None:
            self._config_watch = loop.create_task(self._watch_config())
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True

    async def done(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (self._config_watch, self._client_check, self._idle_check):
            if task is not None:
                task.cancel()
        if self._ops is not None:
            self._ops.stop()
            self._ops = None
        # Flows still in flight when the proxy stops are saved (`-w`) after this hook.
        for flow in list(self._flows):
            if "authorization" in flow.request.headers:
                flow.request.headers["Authorization"] = "[redacted]"
        # The courier stays: removing an addon while mitmproxy iterates its chain for this very
        # hook could skip another addon's `done` (a script reload replaces it in `running`).
        if self.client is not None:
            await self.client.aclose()

    def client_connected(self, client: connection.Client) -> None:
        self._clients[client.id] = ClientWatch()
        if self._client_check is None or self._client_check.done():
            self._client_check = asyncio.get_running_loop().create_task(self._check_clients())

    def client_disconnected(self, client: connection.Client) -> None:
        self._clients.pop(client.id, None)

    # --- configuration -----------------------------------------------------------------

    def _load(self, path: str) -> State:
        """Read and validate a configuration; everything derived from it. Raises ConfigError."""
        config = load_file(path)
        matcher = Matcher(config.mappings)
        codec = TokenCodec(config.secretkeys)
        client = self.client
        if client is None or client.timeout != config.upstream_timeout:
            client = RegistryClient(config.upstream_timeout)
            client.on_token_fetch = self.metrics.upstream_token_fetch
        tokens = TokenService(config, matcher, codec, client)
        return State(config, path, matcher, codec, tokens, Redactor(capability_keys(config.mappings)))

    def _install(self, state: State) -> None:
        old_client = self.client
        self.client = state.tokens.client
        if old_client is not None and old_client is not self.client:
            self._spawn(old_client.aclose())
        self.state = state
        self._config_stat = _stat(state.path)
        config = state.config
        if config.generated_key:
            logger.warning(
                "no secret key configured: using a random one for this process; tokens will survive "
                "neither a restart nor a second replica (set secretkey or $REGISTRYPROXY_SECRETKEY)"
            )
        self.metrics.set_config_info(len(config.mappings), len(config.secretkeys))
        logger.info(
            "registryproxy: %d mappings loaded from %s: %s",
            len(config.mappings),
            Path(state.path).name,
            ", ".join(m.label for m in config.mappings),
        )

    def reload(self, why: str) -> bool:
        """Load the configuration file again; keep serving the old one if the new one is invalid."""
        path = self.state.path if self.state is not None else None
        if path is None:
            path = ctx.options.registryproxy_config or os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
        try:
            state = self._load(path)
        except ConfigError as e:
            self._config_stat = _stat(path)
            self.metrics.config_reload(False)
            logger.error("registryproxy: reload (%s) refused, still serving the previous configuration: %s", why, e)
            return False
        self._install(state)
        self.metrics.config_reload(True)
        logger.info("registryproxy: configuration reloaded (%s)", why)
        return True

    def _on_sighup(self) -> None:
        try:
            self.reload("SIGHUP")
        except Exception as e:  # noqa: BLE001 - a signal must never take the proxy down
            logger.error("registryproxy: reload on SIGHUP failed (%s)", type(e).__name__)

    async def _watch_config(self) -> None:
        """Reload when the configuration file changes (its size, mtime or inode)."""
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            if self.state is None or not ctx.options.registryproxy_watch_config:
                continue
            try:
                current = _stat(self.state.path)
                if current is not None and current != self._config_stat:
                    self.reload("file changed")
            except Exception as e:  # noqa: BLE001 - the watcher must keep running
                logger.error("registryproxy: config watch failed (%s)", type(e).__name__)

    def _ready(self) -> tuple[bool, str]:
        if self.state is None:
            return False, "no valid configuration loaded"
        return True, f"{len(self.state.config.mappings)} mappings loaded"

    def _start_ops(self) -> None:
        """Start (or move) the separate listener for /metrics, /healthz and /readyz, if asked for."""
        listen = ctx.options.registryproxy_ops_listen
        if self._ops is not None and listen == self._ops_listen:
            return
        if self._ops is not None:
            self._ops.stop()
            self._ops = None
        self._ops_listen = listen
        if not listen:
            return
        host, port = metrics.parse_listen(listen)
        ops = metrics.OpsServer(host, port, self.metrics.render, self._ready)
        try:
            bound = ops.start()
        except OSError as e:
            logger.error("registryproxy_ops_listen: cannot listen at %s (%s)", listen, e.strerror or type(e).__name__)
            return
        self._ops = ops
        logger.info("registryproxy: /metrics, /healthz and /readyz listening at %s:%d", *bound)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- hooks -----------------------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = FlowState()
        self._flows[flow] = st
        req = flow.request
        path, _, query = req.path.partition("?")
        if path in OPS_PATHS and not ctx.options.registryproxy_ops_listen:
            # Health and metrics on the registry port (unless moved to their own listener);
            # alive even without a valid configuration.
            st.log_path = path
            answer = metrics.health_answer(path, self._ready(), self.metrics.render, req.headers.get("accept"))
            if answer is not None and req.method in ("GET", "HEAD"):
                status, body, content_type = answer
                self._reply(flow, status, body, {"Content-Type": content_type, "Cache-Control": "no-store"})
                return
        if self.state is None:
            self._reply_error(flow, RegistryError(503, "UNAVAILABLE", "the proxy has no valid configuration"))
            return
        state = self.state
        host = _client_host(req)
        base = st.base = public_base(state.config, host, _client_tls(flow))

        if path == TOKEN_PATH:
            st.kind, st.log_path = "token", TOKEN_PATH
            # Kept here for `request`; the flow keeps no scope (it can name a capability) nor the
            # client's Authorization, before anything (mitmweb) shows it.
            st.query = list(req.query.fields)
            req.path = TOKEN_PATH
            if "authorization" in req.headers:
                req.headers["Authorization"] = "[redacted]"
            if req.method not in ("GET", "POST"):
                self._reply_error(flow, RegistryError(405, "UNSUPPORTED", "the token endpoint answers GET and POST"))
            elif _content_length(req) > MAX_LOCAL_BODY:
                self._reply_error(flow, RegistryError(413, "SIZE_INVALID", "token request too large"))
            return  # answered in `request`, which has the body

        try:
            route = parse_route(path)
        except RegistryError as e:
            st.log_path = _safe_path(path)
            self._reply_error(flow, e)
            return
        st.route = route
        st.log_path = redact_name(route.name) + route.suffix if route.name else path

        # Read here; from now on the client's Authorization is never shown (`_reply`) nor sent
        # upstream (the upstream request's headers are rebuilt from FORWARD_REQUEST_HEADERS).
        token, token_error = self._read_token(req, st, base)
        if route.kind is RouteKind.PING or route.kind is RouteKind.CATALOG:
            if token is None:
                st.token = token_error or "none"
                scope = "registry:catalog:*" if route.kind is RouteKind.CATALOG else None
                self._challenge(flow, base, scope, token_error)
            elif route.kind is RouteKind.PING:
                st.token = "ok"
                self._reply(flow, 200, b"{}")
            else:
                # Capability keys and upstream names are never listed.
                st.token = "ok"
                self._reply(flow, 200, b'{"repositories":[]}')
            return

        scope = repository_scope(route.name)
        if token is None:
            st.token = token_error or "none"
            self._challenge(flow, base, scope, token_error)
            return
        grant = token.grant_for(route.name)
        if grant is None:
            st.token = "insufficient scope"
            st.token_refusal = "insufficient_scope"
            self._challenge(flow, base, scope, "insufficient_scope")
            return
        match = state.matcher.match(route.name, host)
        if match is not None and not is_valid_name(match.upstream_name):
            match = None
        if match is None:
            st.token = "ok"
            self._reply_error(flow, RegistryError(404, "NAME_UNKNOWN"))
            return
        st.match = match
        st.log_path = match.log_name + route.suffix
        if grant.mapping != match.mapping.identity:
            st.token = "stale (mapping changed)"
            st.token_refusal = "invalid_token"
            self._challenge(flow, base, scope, "invalid_token")
            return
        st.token = "ok"
        if req.method not in ("GET", "HEAD") or route.kind is RouteKind.UPLOAD:
            self._reply_error(flow, RegistryError(405, "UNSUPPORTED", "this registry is pull-only"))
            return

        # Rewrite to the upstream.
        upstream = match.mapping.upstream
        # The upstream token from the client's token, else the mapping's own credentials, else none.
        upstream_auth = f"Bearer {grant.upstream_token}" if grant.upstream_token else match.mapping.auth
        # One new header list (building it once is much cheaper than setting headers one by one).
        fields = [(k, v) for k, v in req.headers.fields if k.lower() in FORWARD_REQUEST_HEADERS]
        if req.is_http2 or req.is_http3:
            req.authority = upstream.netloc  # HTTP/2's Host; mitmproxy turns it into Host for HTTP/1
        else:
            # Origin-form upstream, whatever form the client's target had: an absolute-form target
            # (`GET http://other.example/v2/…`) must not name another host to the upstream.
            req.authority = ""
            fields.insert(0, (b"Host", upstream.netloc.encode()))
        st.upstream_auth = upstream_auth  # added in `request`, once mitmweb has shown the request
        req.headers = http.Headers(fields)
        params = _upstream_params(route, query)
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

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None:
            return
        # The whole request is in: from here the proxy (or the upstream) is working on it.
        watch = self._clients.get(flow.client_conn.id)
        if watch is not None and not st.busy:
            st.busy = True
            watch.busy += 1
        if st.kind == "upstream" and flow.response is None:
            st.auth_pending = True  # `Courier` adds it after every hook (and mitmweb) has seen the flow
            st.upstream_sent = time.monotonic()
            # From here on the upstream has `upstream_timeout` to connect and answer with headers.
            st.watchdog = asyncio.get_running_loop().call_later(
                self._timeout(), self._upstream_stalled, weakref.ref(flow)
            )
            return
        if st.kind != "token" or flow.response or self.state is None:
            return
        state = self.state
        req = flow.request
        try:
            form = None
            if req.method == "POST":
                form = list(req.urlencoded_form.fields)
                # Parsed: the flow keeps no password or refresh token.
                req.content = state.redactor.text(req.get_text(strict=False) or "").encode()
            parsed = parse_token_request(req.method, st.query, form)
            labels = sorted(
                {
                    m.mapping.label
                    for n in pull_names(list(parsed.scopes))
                    if (m := state.matcher.match(n, _client_host(req)))
                }
            )
            if labels:
                st.log_path = f"{TOKEN_PATH} ({', '.join(labels)})"
            answer = await state.tokens.answer(parsed, st.base, _client_host(req))
        except RegistryError as e:
            st.token = f"refused: {e.message or e.code}"
            st.token_refusal = e.code.lower()
            self._reply_error(flow, e)
            return
        st.token = answer.outcome
        self.metrics.token_issued(parsed.grant_type or "anonymous")
        self._reply(flow, 200, json.dumps(answer.body).encode(), {"Cache-Control": "no-store"})

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None or st.kind != "upstream" or flow.response is None or st.match is None or st.route is None:
            return
        self._rewrite_response_headers(flow, st, st.match, st.route)
        # A streamed response's headers are sent right after this hook (and its update).
        self._hide(flow, st, ready=st.streamed)

    def _rewrite_response_headers(self, flow: http.HTTPFlow, st: FlowState, match: Match, route: Route) -> None:
        assert flow.response is not None
        st.settle()
        resp = flow.response
        st.upstream_status = resp.status_code
        if st.upstream_sent:
            self.metrics.upstream_latency(match.mapping.label, time.monotonic() - st.upstream_sent)

        upstream_challenge = resp.headers.get("www-authenticate")
        if resp.status_code == 401 and upstream_challenge and self.client is not None:
            self.client.learn(match.mapping.upstream, upstream_challenge)
            self.client.drop_tokens(match.mapping)  # a cached upstream token may be what was refused

        fields = [(k, v) for k, v in resp.headers.fields if k.lower() in FORWARD_RESPONSE_HEADERS]
        resp.headers = http.Headers(fields)

        if resp.status_code >= 400:
            err = for_upstream_status(resp.status_code, route.kind.value)
            resp.status_code = err.status
            resp.reason = ""
            body = err.body()
            resp.headers = http.Headers(
                Content_Type="application/json; charset=utf-8",
                Content_Length=str(len(body)),
                Docker_Distribution_Api_Version="registry/2.0",
            )
            if err.status == 401:
                resp.headers["WWW-Authenticate"] = bearer_challenge(
                    st.base + TOKEN_PATH, _service(st.base), repository_scope(match.local_name), "invalid_token"
                )
            st.error_body = body
            resp.stream = _replace_body(body)
            st.streamed = True
            return

        location = resp.headers.get("location")
        if location is not None and 300 <= resp.status_code < 400:
            self.metrics.redirect(match.mapping.label)
        if location is not None:
            new_location = _rewrite_location(location, flow.request.url, st)
            if new_location is None:
                del resp.headers["location"]
            else:
                resp.headers["Location"] = new_location
        links = resp.headers.get_all("link")
        if links:
            rewritten = [x for x in (_rewrite_link(v, st) for v in links) if x is not None]
            resp.headers.set_all("link", rewritten)
        resp.headers.setdefault("Docker-Distribution-Api-Version", "registry/2.0")

        if route.kind is RouteKind.TAGS and resp.status_code == 200 and flow.request.method == "GET":
            if _content_length(resp) > MAX_TAGS_BODY:
                flow.kill()
            return  # buffered: the body's `name` is rewritten in `response`
        resp.stream = self._watch_stream(flow, st)
        st.streamed = True

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None or flow.response is None:
            return
        self._unhide(flow, st)
        self._streaming.discard(flow)
        resp = flow.response
        if st.kind == "upstream" and st.match is not None:
            if st.error_body is not None:
                if resp.raw_content is not None and flow.request.method != "HEAD":
                    resp.content = st.error_body
            elif st.route is not None and st.route.kind is RouteKind.TAGS and resp.status_code == 200:
                self._rewrite_tags_body(flow, st.match, st.page)
        self._log(flow, st)
        self._hide(flow, st, ready=True)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None:
            return
        self._unhide(flow, st)
        st.settle()
        self._streaming.discard(flow)
        self._log(flow, st)
        self._hide(flow, st, ready=False)

    # --- secrets in flows --------------------------------------------------------------

    def _hide(self, flow: http.HTTPFlow, st: FlowState, *, ready: bool) -> None:
        """Leave no secret in the flow for the hooks after this one (display, saving, dumping).

        The request's secrets were sent already (or never will be): they go for good. The
        response's may still have to be sent: they are held in `st.held`, and with `ready` (the
        response is sent right after this hook) `Courier` puts them back in the next update.
        """
        st.auth_pending = False
        if "authorization" in flow.request.headers:
            flow.request.headers["Authorization"] = "[redacted]"
        resp = flow.response
        if resp is None:
            return
        redactor = self.state.redactor if self.state is not None else Redactor()
        if st.held.headers is None:
            shown = _scrubbed_headers(resp.headers, redactor)
            if shown is not None:
                st.held.headers, resp.headers = resp.headers, shown
        if st.held.body is None and resp.raw_content:
            body = _scrubbed_body(resp.raw_content, redactor)
            if body != resp.raw_content:
                st.held.body, resp.raw_content = resp.raw_content, body
        st.ready = ready and (st.held.headers is not None or st.held.body is not None)

    def _unhide(self, flow: http.HTTPFlow, st: FlowState) -> None:
        """Back to the real response, for a hook of this addon to work on (and hide again)."""
        held, st.held = st.held, Held()
        st.ready = False
        if flow.response is not None:
            if held.headers is not None:
                flow.response.headers = held.headers
            if held.body is not None:
                flow.response.raw_content = held.body

    def deliver(self, flow: http.HTTPFlow) -> None:
        """`Courier`, after every hook has seen the flow: put in what is about to be sent."""
        st = self._flows.get(flow)
        if st is None:
            return
        if st.auth_pending:
            st.auth_pending = False
            if st.upstream_auth and flow.live and flow.response is None:
                flow.request.headers["Authorization"] = st.upstream_auth
        resp = flow.response
        if st.ready and resp is not None:
            st.ready = False
            held, st.held = st.held, Held()
            st.shown = Held(
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
        st = self._flows.get(flow) if flow is not None else None
        if flow is None or st is None or st.shown is None or flow.response is None:
            return
        if flow.live and tries < 300:
            asyncio.get_running_loop().call_later(0.01, self._rehide, ref, tries + 1)
            return
        shown, st.shown = st.shown, None
        if shown.headers is not None:
            flow.response.headers = shown.headers
        if shown.body is not None:
            flow.response.raw_content = shown.body
        with contextlib.suppress(Exception):
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    # --- helpers ---------------------------------------------------------------------

    def _read_token(self, req: http.Request, st: FlowState, audience: str) -> tuple[AccessToken | None, str | None]:
        """The client's valid access token, or None with the challenge error to answer."""
        assert self.state is not None
        value = req.headers.get("authorization")
        if not value:
            return None, None
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            st.token_refusal = "invalid_token"
            return None, "invalid_token"
        try:
            return self.state.codec.read_access(credential.strip(), audience), None
        except TokenError as e:
            logger.debug("token refused: %s", e.reason)
            st.token_refusal = "expired" if e.reason == "expired" else "invalid_token"
            return None, "invalid_token"

    def _challenge(self, flow: http.HTTPFlow, base: str, scope: str | None, error: str | None) -> None:
        challenge = bearer_challenge(base + TOKEN_PATH, _service(base), scope, error)
        self._reply_error(flow, RegistryError(401, "UNAUTHORIZED"), {"WWW-Authenticate": challenge})

    def _reply_error(self, flow: http.HTTPFlow, err: RegistryError, headers: dict[str, str] | None = None) -> None:
        self._reply(flow, err.status, err.body(), headers)

    def _reply(self, flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        # A local answer: the request goes no further, and the flow keeps only its redacted
        # path (the local path can hold a capability key) from now on.
        st = self._flows.get(flow)
        if st is not None and st.kind != "token":
            flow.request.path = st.log_path if st.log_path.startswith("/") else f"/v2/{st.log_path}"
        if "authorization" in flow.request.headers:
            flow.request.headers["Authorization"] = "[redacted]"
        if _content_length(flow.request) > MAX_LOCAL_BODY:
            # mitmproxy would read (and hold) the whole body before sending this answer: a multi-GB
            # upload to a pull-only proxy would fill memory. Close the connection unread instead.
            if st is not None:
                st.token = f"{st.token}; {status} answer replaced by closing: body over {MAX_LOCAL_BODY} bytes"
            flow.kill()
            return
        all_headers = {"Content-Type": "application/json; charset=utf-8", **API_VERSION, **(headers or {})}
        if flow.request.method == "HEAD":
            flow.response = http.Response.make(status, b"", all_headers)
            flow.response.headers["Content-Length"] = str(len(body))
        else:
            flow.response = http.Response.make(status, body, all_headers)
        if st is not None:
            st.held = Held()
            self._hide(flow, st, ready=False)  # mitmweb shows the flow from this hook on

    def _rewrite_tags_body(self, flow: http.HTTPFlow, match: Match, page: dict[str, str]) -> None:
        assert flow.response is not None
        try:
            data = json.loads(flow.response.content or b"")
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("tags", []), list | None):
            err = RegistryError(502, "UNAVAILABLE", "upstream answered a malformed tags list")
            flow.response = http.Response.make(
                err.status, err.body(), {"Content-Type": "application/json; charset=utf-8", **API_VERSION}
            )
            return
        data["name"] = match.local_name
        tags = data.get("tags") or []
        n = int(page["n"]) if "n" in page else None
        if n is not None and len(tags) > n and "link" not in flow.response.headers:
            # The upstream ignored `n` (distribution 2.8 does): paginate here, in lexical order.
            last = page.get("last")
            rest = sorted(t for t in tags if isinstance(t, str) and (last is None or t > last))
            data["tags"] = rest[:n]
            if len(rest) > n > 0:
                query = urlencode({"n": n, "last": rest[n - 1]})
                flow.response.headers["Link"] = f'</v2/{match.local_name}/tags/list?{query}>; rel="next"'
        flow.response.content = json.dumps(data, separators=(",", ":")).encode()

    def _upstream_stalled(self, ref: weakref.ref[http.HTTPFlow]) -> None:
        """No response headers within `upstream_timeout`: close the upstream connection.

        mitmproxy has no response timeout of its own and cannot kill a flow in transit
        (mitmproxy#4711); closing the server connection makes it answer the client with
        its "server closed connection" error, which `failures` renders as a registry 502.
        """
        flow = ref()
        st = self._flows.get(flow) if flow is not None else None
        if flow is None or st is None or flow.response is not None or not flow.live:
            return
        st.watchdog = None
        st.timed_out = True
        logger.warning("%s %s: upstream sent no answer within %ss", flow.request.method, st.log_path, self._timeout())
        _close_upstream(flow)

    def _watch_stream(self, flow: http.HTTPFlow, st: FlowState) -> Callable[[bytes], bytes]:
        """Stream a response body, noting when data last came, so a stalled body is cut off."""
        st.last_data = time.monotonic()
        self._streaming.add(flow)
        if self._idle_check is None or self._idle_check.done():
            self._idle_check = asyncio.get_running_loop().create_task(self._check_idle_streams())

        def stream(data: bytes) -> bytes:
            st.last_data = time.monotonic()
            st.bytes_streamed += len(data)
            return data

        return stream

    async def _check_idle_streams(self) -> None:
        """While bodies stream: close the upstream of any that sent nothing for `upstream_timeout`.

        The client then sees a failed transfer (its Content-Length or chunked framing is not met),
        never a silently short blob.
        """
        while self._streaming:
            timeout = self._timeout()
            await asyncio.sleep(max(0.2, min(1.0, timeout / 4)))
            now = time.monotonic()
            for flow in list(self._streaming):
                st = self._flows.get(flow)
                if st is None or not flow.live or flow.error is not None:
                    self._streaming.discard(flow)
                elif now - st.last_data > timeout:
                    self._streaming.discard(flow)
                    st.timed_out = True
                    logger.warning("%s %s: upstream body stalled for %ss", flow.request.method, st.log_path, timeout)
                    _close_upstream(flow)

    async def _check_clients(self) -> None:
        """Close client connections that take too long to send a request, or idle too long.

        A connection counts as idle from its start and from the end of each request; a request
        counts from its `request` hook (headers and the small bodies the proxy reads are in).
        mitmproxy's own `tcp_timeout` resets on every byte, so it does not stop slowloris.
        """
        while self._clients:
            timeout = float(ctx.options.registryproxy_client_timeout)
            await asyncio.sleep(max(0.2, min(1.0, timeout / 4)))
            now = time.monotonic()
            for client_id, watch in list(self._clients.items()):
                if watch.busy == 0 and now - watch.idle_since > timeout:
                    self._clients.pop(client_id, None)
                    _close_client(client_id)

    def _timeout(self) -> float:
        return self.state.config.upstream_timeout if self.state else 0.0

    def _internal_error(self, flow: http.HTTPFlow, hook: str, exc: Exception) -> None:
        logger.error("internal error in %s hook (%s); the request was refused", hook, type(exc).__name__)
        logger.debug("internal error details", exc_info=exc)
        try:
            if flow.response is None and flow.live:
                err = RegistryError(500, "UNKNOWN", "internal proxy error")
                flow.response = http.Response.make(
                    err.status, err.body(), {"Content-Type": "application/json; charset=utf-8", **API_VERSION}
                )
            elif flow.live:
                flow.kill()
        except Exception:  # noqa: BLE001 - last resort
            if flow.killable:
                flow.kill()

    def _log(self, flow: http.HTTPFlow, st: FlowState) -> None:
        """The flow is over: one log line, its metrics, its comment and mark for mitmweb."""
        watch = self._clients.get(flow.client_conn.id)
        if st.busy:
            st.busy = False
            if watch is not None:
                watch.busy = max(0, watch.busy - 1)
                watch.idle_since = time.monotonic()
        resp = flow.response
        status: int | str = resp.status_code if resp is not None else "error"
        size = "-"
        if resp is not None:
            size = (
                str(st.bytes_streamed)
                if st.streamed and st.error_body is None
                else resp.headers.get("content-length", "-")
            )
        mapping = st.match.mapping.label if st.match else "-"
        upstream: int | str = st.upstream_status if st.upstream_status is not None else "-"
        if flow.error is not None:
            upstream = "timeout" if st.timed_out else "failed"
        elapsed = (time.monotonic() - st.started) * 1000

        route = "token" if st.kind == "token" else st.route.kind.value if st.route else "other"
        self.metrics.request(mapping=mapping, method=flow.request.method, route=route, status=status)
        if st.match is not None and st.bytes_streamed:
            self.metrics.bytes_streamed(st.match.mapping.label, st.bytes_streamed)
        if st.token_refusal is not None:
            self.metrics.token_refused(st.token_refusal)

        if self._access_log is not None:
            record = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "request_id": flow.id,
                "client": _peer(flow),
                "method": flow.request.method,
                "name": st.log_path,
                "mapping": mapping,
                "status": status,
                "upstream_status": None if upstream == "-" else upstream,
                "bytes": int(size) if size.isdigit() else None,
                "duration_ms": round(elapsed, 1),
                "token": st.token,
            }
            if self.state is not None:
                # Redact values, not the line: the redactor hides any JSON "token" member wholesale.
                redact = self.state.redactor.text
                record = {k: redact(v) if isinstance(v, str) else v for k, v in record.items()}
            self._access_log.info(json.dumps(record, separators=(",", ":")))
        else:
            logger.info(
                "%s %s mapping=%s status=%s upstream=%s bytes=%s %.1fms token=%s",
                flow.request.method,
                st.log_path,
                mapping,
                status,
                upstream,
                size,
                elapsed,
                st.token,
            )

        if st.kind == "upstream":
            flow.comment = f"{flow.comment}; token {st.token}; upstream {upstream}"
        else:
            flow.comment = f"registryproxy: {st.log_path} answered locally ({status}); token {st.token}"
        failed = flow.error is not None or st.timed_out or (isinstance(status, int) and status >= 500)
        challenge = status == 401 and st.token == "none"
        if failed:
            flow.marked = MARK_FAILED
        elif isinstance(status, int) and status >= 400 and not challenge:
            flow.marked = MARK_REFUSED


class Courier:
    """The last addon: puts in, for the send, what `RegistryProxy` kept out of the flow.

    mitmproxy runs the `update` hook after every flow hook, and mitmweb pushes the flow to the
    browser in it; the request or response is sent right after. So this acts in `update`, after
    mitmweb (and everything else) has seen the flow without its secrets.
    """

    name = "registryproxy-courier"

    def __init__(self, proxy: RegistryProxy) -> None:
        self.proxy = proxy

    def update(self, flows: list[Any]) -> None:
        for flow in flows:
            if isinstance(flow, http.HTTPFlow):
                try:
                    self.proxy.deliver(flow)
                except Exception as e:  # noqa: BLE001 - fail closed: what is sent stays redacted
                    logger.error("internal error delivering a flow (%s)", type(e).__name__)


def _add_courier(proxy: RegistryProxy) -> None:
    """Append the courier at the very end of the addon chain (again after a script reload)."""
    addons = ctx.master.addons
    _remove_courier()
    addons.add(Courier(proxy))


def _remove_courier() -> None:
    addons = ctx.master.addons
    existing = addons.get(Courier.name)
    if existing is not None:
        addons.remove(existing)


def _scrubbed_headers(headers: http.Headers, redactor: Redactor) -> http.Headers | None:
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
            shown = f"{base}?[redacted]" if sep else base
        shown = redactor.text(shown)
        if shown != text:
            changed = True
            fields.append((k, shown.encode("latin-1")))
        else:
            fields.append((k, v))
    return http.Headers(fields) if changed else None


def _scrubbed_body(raw: bytes, redactor: Redactor) -> bytes:
    """A small body with secrets redacted; larger ones (blobs) are never held in a flow."""
    if len(raw) > MAX_SCRUBBED_BODY:
        return raw
    text = raw.decode("utf-8", "surrogateescape")
    redacted = redactor.text(text)
    return raw if redacted == text else redacted.encode("utf-8", "surrogateescape")


def _close_client(client_id: str) -> None:
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client_id)
    if handler is not None:
        handler.close_connection(handler.client)


def _json_access_log() -> logging.Logger:
    """One JSON object a line on stdout, without mitmproxy's time prefix."""
    log = logging.getLogger("registryproxy.access")
    log.propagate = False
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


def _peer(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    if not peer:
        return "-"
    host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
    return f"{host}:{peer[1]}"


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _close_upstream(flow: http.HTTPFlow) -> None:
    """Close the flow's upstream connection, or the connection attempt still under way.

    Uses the proxy server's connection handler (there is no public API for this): the flow's
    server connection once connected, else the pending connection to the flow's upstream.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    transports = getattr(handler, "transports", {})
    if handler is None:
        return
    if flow.server_conn in transports:
        handler.close_connection(flow.server_conn)
        return
    target = (flow.request.host, flow.request.port)
    for conn in list(transports):
        pending = getattr(conn, "timestamp_tcp_setup", None) is None
        if conn is not flow.client_conn and getattr(conn, "address", None) == target and pending:
            handler.close_connection(conn)


def _connection_logs(on: bool) -> None:
    """One line per request is the addon's; mitmproxy's per-connection lines only when asked for."""
    level = logging.NOTSET if on else logging.WARNING
    for name in ("mitmproxy.proxy.server", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(level)


def _client_host(req: http.Request) -> str | None:
    host = (req.host_header or "").strip().lower()
    return host if host and _HOST_RE.fullmatch(host) else None


def _client_tls(flow: http.HTTPFlow) -> bool:
    return bool(flow.client_conn.tls_established)


def _service(base: str) -> str:
    return urlsplit(base).netloc


def _content_length(msg: http.Message) -> int:
    """The body length a message announces; unknown (chunked, or an HTTP/2 or 3 request body
    without content-length) counts as unbounded."""
    value = msg.headers.get("content-length")
    if value is None:
        if "transfer-encoding" in msg.headers:
            return 1 << 62
        if isinstance(msg, http.Request) and (msg.is_http2 or msg.is_http3) and msg.method not in ("GET", "HEAD"):
            return 1 << 62
        return 0
    try:
        return int(value)
    except ValueError:
        return 1 << 62


def _upstream_params(route: Route, query: str) -> list[tuple[str, str]]:
    """The query parameters sent upstream: only those a pull route defines, validated."""
    if not query or route.kind not in (RouteKind.TAGS, RouteKind.REFERRERS):
        return []
    keep = []
    for k, v in parse_qsl(query, keep_blank_values=False)[:8]:
        if route.kind is RouteKind.TAGS:
            ok = (k == "n" and v.isdigit() and len(v) <= 6) or (k == "last" and TAG_RE.fullmatch(v) is not None)
        else:
            ok = k == "artifactType" and re.fullmatch(r"[\w.+/-]{1,255}", v) is not None
        if ok:
            keep.append((k, v))
    return keep


def _local_path(path: str, st: FlowState) -> str | None:
    """An upstream API path for this flow's repository, as the local path; None if it is not one."""
    assert st.match is not None
    prefix = f"/v2/{st.match.upstream_name}/"
    if not path.startswith(prefix):
        return None
    return f"/v2/{st.match.local_name}/{path[len(prefix) :]}"


def _rewrite_location(location: str, request_url: str, st: FlowState) -> str | None:
    """Make a redirect target absolute; one back into the upstream API becomes the local path."""
    assert st.match is not None
    absolute = urljoin(request_url, location.strip())
    parts = urlsplit(absolute)
    if parts.scheme not in ("http", "https"):
        return None
    upstream = st.match.mapping.upstream
    if f"{parts.scheme}://{parts.netloc}" == upstream.origin:
        local = _local_path(parts.path, st) if parts.path.startswith("/v2/") else None
        if local is None:
            # Elsewhere on the upstream: fine to follow for a namespace, but it would name the
            # upstream to the holder of a capability URL.
            return None if st.match.mapping.capability or parts.path.startswith("/v2/") else absolute
        return local + (f"?{parts.query}" if parts.query else "")
    return absolute


def _rewrite_link(value: str, st: FlowState) -> str | None:
    """`<…/v2/upstream/name/tags/list?…>; rel="next"` with the local name; None to drop it."""
    m = _LINK_RE.fullmatch(value)
    if m is None:
        return None
    parts = urlsplit(m[1])
    local = _local_path(parts.path, st)
    if local is None:
        return None
    target = local + (f"?{parts.query}" if parts.query else "")
    return f"<{target}>{m[2] or ''}"


def _replace_body(body: bytes) -> Callable[[bytes], bytes]:
    """A stream function that discards the upstream body and sends `body` instead."""

    def stream(data: bytes) -> bytes:
        return b"" if data else body

    return stream


def _safe_path(path: str) -> str:
    """A request path for logs: bounded, printable, capability-like segments hidden."""
    printable = "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in path[:200])
    return redact_name(printable)
