"""The mitmproxy addon: hooks only, over the pure modules beside it.

Request path (see README "How a pull flows through the proxy"):
- `requestheaders`: recognise the route; answer locally what the proxy owns (ping,
  catalog, challenges, errors) or check the client's PASETO, and rewrite the request
  to the upstream (URL, allowed headers, upstream credentials).
- `request`: the token endpoint (it needs the request body and awaits upstream).
- `responseheaders`: rewrite what the upstream says about itself (challenges, Location,
  Link, error bodies, identity headers) and turn on streaming.
- `response` / `error`: finish the body rewrites that need the body; one log line.

Every hook fails closed: an exception never lets a flow go on unmodified.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from . import failures
from .challenge import bearer_challenge
from .config import Config, ConfigError, load_file
from .errors import RegistryError, for_upstream_status
from .mapping import Match, Matcher, redact_name
from .names import TAG_RE, Route, RouteKind, is_valid_name, parse_route
from .scopes import repository_scope
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
class FlowState:
    """What the addon decided about one flow (kept out of the flow so it is never stored)."""

    started: float = field(default_factory=time.monotonic)
    kind: str = "local"  # local | token | upstream
    route: Route | None = None
    match: Match | None = None
    log_path: str = "-"
    base: str = ""  # the public base URL the client used: realm and token audience
    page: dict[str, str] = field(default_factory=dict)  # tags/list `n` and `last` as asked
    token: str = "-"
    upstream_status: int | None = None
    error_body: bytes | None = None
    watchdog: asyncio.TimerHandle | None = None
    timed_out: bool = False
    last_data: float = 0.0

    def settle(self) -> None:
        """The upstream answered (or failed): stop waiting for it."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None


@dataclass(frozen=True)
class State:
    """Everything derived from one loaded configuration; replaced as a whole on reload."""

    config: Config
    matcher: Matcher
    codec: TokenCodec
    tokens: TokenService


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
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()
        self._streaming: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._idle_check: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registryproxy_config",
            str,
            "",
            f"Path of the registryproxy YAML configuration (default: ${CONFIG_ENV}, else config.yaml "
            "at the repository root).",
        )
        loader.add_option(
            "registryproxy_connection_logs",
            bool,
            False,
            "Also log mitmproxy's per-connection lines (client/server connect) at info level.",
        )
        failures.install()
        _connection_logs(False)

    def configure(self, updated: set[str]) -> None:
        if "registryproxy_connection_logs" in updated:
            _connection_logs(ctx.options.registryproxy_connection_logs)
        if "registryproxy_config" not in updated and self.state is not None:
            return
        path = ctx.options.registryproxy_config or os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
        try:
            config = load_file(path)
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        if config.generated_key:
            logger.warning(
                "no secret key configured: using a random one for this process; tokens will survive "
                "neither a restart nor a second replica (set secretkey or $REGISTRYPROXY_SECRETKEY)"
            )
        if self.client is None or self.client.timeout != config.upstream_timeout:
            self.client = RegistryClient(config.upstream_timeout)
        matcher = Matcher(config.mappings)
        codec = TokenCodec(config.secretkeys)
        self.state = State(config, matcher, codec, TokenService(config, matcher, codec, self.client))
        logger.info(
            "registryproxy: %d mappings loaded from %s: %s",
            len(config.mappings),
            Path(path).name,
            ", ".join(m.label for m in config.mappings),
        )

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

    async def done(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # --- hooks -----------------------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = FlowState()
        self._flows[flow] = st
        if self.state is None:
            self._reply_error(flow, RegistryError(503, "UNAVAILABLE", "the proxy has no valid configuration"))
            return
        state = self.state
        req = flow.request
        path, _, query = req.path.partition("?")
        host = _client_host(req)
        base = st.base = public_base(state.config, host, _client_tls(flow))

        if path == TOKEN_PATH:
            st.kind, st.log_path = "token", TOKEN_PATH
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

        token, token_error = self._read_token(req, base)
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
            fields.insert(0, (b"Host", upstream.netloc.encode()))
        if upstream_auth:
            fields.append((b"Authorization", upstream_auth.encode()))
        req.headers = http.Headers(fields)
        params = _upstream_params(route, query)
        st.page = dict(params)
        qs = f"?{urlencode(params)}" if params else ""
        req.scheme = upstream.scheme
        req.data.host = upstream.host
        req.data.port = upstream.port
        req.path = f"/v2/{match.upstream_name}{route.suffix}{qs}"
        st.kind = "upstream"
        st.watchdog = asyncio.get_running_loop().call_later(
            state.config.upstream_timeout, self._upstream_stalled, weakref.ref(flow)
        )
        flow.comment = (
            f"registryproxy: {st.log_path} via {match.mapping.label} -> {upstream.netloc}/{match.upstream_name}"
        )

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None or st.kind != "token" or flow.response or self.state is None:
            return
        state = self.state
        req = flow.request
        try:
            form = None
            if req.method == "POST":
                form = list(req.urlencoded_form.fields)
            parsed = parse_token_request(req.method, list(req.query.fields), form)
            answer = await state.tokens.answer(parsed, st.base, _client_host(req))
        except RegistryError as e:
            st.token = f"refused: {e.message or e.code}"
            self._reply_error(flow, e)
            return
        st.token = answer.outcome
        flow.response = http.Response.make(
            200,
            json.dumps(answer.body).encode(),
            {"Content-Type": "application/json", "Cache-Control": "no-store", **API_VERSION},
        )

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None or st.kind != "upstream" or flow.response is None or st.match is None or st.route is None:
            return
        st.settle()
        resp = flow.response
        match, route = st.match, st.route
        st.upstream_status = resp.status_code
        # The outgoing credential has been sent: keep it out of stored and displayed flows.
        if "authorization" in flow.request.headers:
            flow.request.headers["Authorization"] = "[redacted]"

        upstream_challenge = resp.headers.get("www-authenticate")
        if resp.status_code == 401 and upstream_challenge and self.client is not None:
            self.client.learn(match.mapping.upstream, upstream_challenge)

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
            return

        location = resp.headers.get("location")
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

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None or flow.response is None:
            return
        self._streaming.discard(flow)
        resp = flow.response
        if st.kind == "upstream" and st.match is not None:
            if st.error_body is not None:
                if resp.raw_content is not None and flow.request.method != "HEAD":
                    resp.content = st.error_body
            elif st.route is not None and st.route.kind is RouteKind.TAGS and resp.status_code == 200:
                self._rewrite_tags_body(flow, st.match, st.page)
        self._log(flow, st)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        st = self._flows.get(flow)
        if st is None:
            return
        st.settle()
        self._streaming.discard(flow)
        self._log(flow, st)

    # --- helpers ---------------------------------------------------------------------

    def _read_token(self, req: http.Request, audience: str) -> tuple[AccessToken | None, str | None]:
        """The client's valid access token, or None with the challenge error to answer."""
        assert self.state is not None
        value = req.headers.get("authorization")
        if not value:
            return None, None
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return None, "invalid_token"
        try:
            return self.state.codec.read_access(credential.strip(), audience), None
        except TokenError as e:
            logger.debug("token refused: %s", e.reason)
            return None, "invalid_token"

    def _challenge(self, flow: http.HTTPFlow, base: str, scope: str | None, error: str | None) -> None:
        challenge = bearer_challenge(base + TOKEN_PATH, _service(base), scope, error)
        self._reply_error(flow, RegistryError(401, "UNAUTHORIZED"), {"WWW-Authenticate": challenge})

    def _reply_error(self, flow: http.HTTPFlow, err: RegistryError, headers: dict[str, str] | None = None) -> None:
        self._reply(flow, err.status, err.body(), headers)

    def _reply(self, flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        if _content_length(flow.request) > MAX_LOCAL_BODY:
            # mitmproxy would read (and hold) the whole body before sending this answer: a multi-GB
            # upload to a pull-only proxy would fill memory. Close the connection unread instead.
            st = self._flows.get(flow)
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
        status = flow.response.status_code if flow.response else "error"
        size = "-"
        if flow.response is not None:
            size = flow.response.headers.get("content-length", "-")
        mapping = st.match.mapping.label if st.match else "-"
        upstream = st.upstream_status if st.upstream_status is not None else "-"
        if flow.error is not None:
            upstream = "timeout" if st.timed_out else "failed"
        elapsed = (time.monotonic() - st.started) * 1000
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
        # Keep secrets out of stored and displayed flows: the client's credential, and for
        # locally answered requests the local path and query (which can hold a capability key).
        if "authorization" in flow.request.headers:
            flow.request.headers["Authorization"] = "[redacted]"
        if st.kind != "upstream":
            flow.request.path = st.log_path


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
    value = msg.headers.get("content-length")
    if value is None:
        return 0 if "transfer-encoding" not in msg.headers else 1 << 62
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
    if f"{parts.scheme}://{parts.netloc}" == upstream.origin and parts.path.startswith("/v2/"):
        local = _local_path(parts.path, st)
        if local is None:
            return None
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
