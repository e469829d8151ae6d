"""What the proxy needs to know about an upstream registry, and asks it.

How an upstream authenticates is learned from its own challenge on `GET /v2/` (lazily,
on the first token request, and cached, so an unreachable upstream never stops
start-up), and refreshed from any later 401 it answers. Upstream tokens are fetched
from the upstream's realm with the mapping's credentials, but only from a realm the
configuration allows: credentials never follow a challenge to another place.

Every connection is verified with the mapping's trust (`transport/trust.py`: the system store plus its
`ca_file`, or nothing with `tls_verify: false`), to the registry and to its realm alike, and goes
through the forward proxy `transport/egress.py` chooses for its URL. httpx reads nothing from the
environment itself (`trust_env=False`): both decisions are made explicitly, per request.

What the answers mean (the challenge's method, the realm policy, a token answer) is decided by the
pure functions of upstream/auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx

from ..config import Mapping, Upstream
from ..protocol.challenge import parse_challenge
from ..transport import trust as trust_module
from ..transport.egress import Egress, EgressError, ProxySpec
from ..transport.trust import Trust
from .auth import AuthMethod, UpstreamError, UpstreamToken, method_from, parse_token_response, realm_allowed

logger = logging.getLogger(__name__)

AUTH_CACHE_SECONDS = 600.0
TOKEN_CACHE_SIZE = 1024
MAX_TOKEN_RESPONSE = 256 * 1024
KEEPALIVE_SECONDS = 30.0


class RegistryClient:
    """Talks to upstream registries and their token services (async, bounded in time and size).

    One httpx client per (trust, forward proxy): a connection verified one way is never reused for
    a request that must be verified another way. `egress` gives the forward proxies (default: the
    process environment, read once).
    """

    def __init__(self, timeout: float, *, egress: Egress | None = None) -> None:
        self.timeout = timeout
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._egress = egress
        # Set (tests only), one client that serves every request whatever its trust and proxy.
        self._http: httpx.AsyncClient | None = None
        self._clients: dict[tuple[Trust, ProxySpec | None], httpx.AsyncClient] = {}
        self._auth: dict[str, tuple[float, AuthMethod]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Upstream tokens by (mapping, upstream repositories): a mapping carries its own upstream and
        # credentials, so a token is never shared across mappings or credentials.
        self._tokens: OrderedDict[tuple[Mapping, tuple[str, ...]], UpstreamToken] = OrderedDict()
        self._token_locks: dict[tuple[Mapping, tuple[str, ...]], asyncio.Lock] = {}
        self.token_fetches = 0
        # Told (upstream netloc, ok) once per token request sent to a realm, never for a cached token.
        self.on_token_fetch: Callable[[str, bool], None] | None = None

    def _client(self, url: str, trust: Trust) -> httpx.AsyncClient:
        """The client for a request to `url` verified with `trust`. Raises UpstreamError."""
        if self._http is not None:
            return self._http
        try:
            if self._egress is None:
                self._egress = Egress.from_environ(os.environ)
            proxy = self._egress.proxy_for(url)
        except EgressError as e:
            raise UpstreamError(f"forward proxy setting unusable ({e})") from None
        key = (trust, proxy)
        client = self._clients.get(key)
        if client is None:
            try:
                verify = trust_module.ssl_context(trust)
                proxy_tls = trust_module.ssl_context(Trust(store=trust.store)) if proxy else None
            except (OSError, ssl.SSLError, trust_module.TrustError) as e:
                raise UpstreamError(f"cannot load the trusted certificates ({type(e).__name__})") from None
            client = self._clients[key] = httpx.AsyncClient(
                follow_redirects=False,
                timeout=self._timeout,
                # Kept as long as the pool keeps mitmproxy's upstream connections (steps/pooling.py): the cache's
                # tag HEADs between pulls would otherwise open a new connection (TCP and TLS: three round trips).
                limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=KEEPALIVE_SECONDS),
                headers={"User-Agent": "registryproxy"},
                trust_env=False,
                verify=verify,
                proxy=_httpx_proxy(proxy, proxy_tls) if proxy else None,
            )
        return client

    async def aclose(self) -> None:
        clients = list(self._clients.values()) + ([self._http] if self._http is not None else [])
        self._clients.clear()
        self._http = None
        for client in clients:
            await client.aclose()

    def learn(self, upstream: Upstream, www_authenticate: str) -> None:
        """Update what is known from a challenge the upstream answered on a live request."""
        method = method_from(parse_challenge(www_authenticate))
        if method is not None:
            self._auth[upstream.origin] = (time.monotonic(), method)

    def forget(self, upstream: Upstream) -> None:
        self._auth.pop(upstream.origin, None)

    def drop_tokens(self, mapping: Mapping) -> None:
        """The upstream refused a token of this mapping's: fetch new ones from now on."""
        for key in [k for k in self._tokens if k[0] == mapping]:
            del self._tokens[key]

    async def auth_method(self, upstream: Upstream, mapping: Mapping | None = None) -> AuthMethod:
        """How `upstream` authenticates (asked on `/v2/` with `mapping`'s trust, and cached)."""
        cached = self._auth.get(upstream.origin)
        if cached and time.monotonic() - cached[0] < AUTH_CACHE_SECONDS:
            return cached[1]
        lock = self._locks.setdefault(upstream.origin, asyncio.Lock())
        async with lock:
            cached = self._auth.get(upstream.origin)
            if cached and time.monotonic() - cached[0] < AUTH_CACHE_SECONDS:
                return cached[1]
            method = await self._discover(upstream, mapping)
            self._auth[upstream.origin] = (time.monotonic(), method)
            return method

    async def _discover(self, upstream: Upstream, mapping: Mapping | None) -> AuthMethod:
        url = f"{upstream.origin}/v2/"
        trust = mapping.trust if mapping is not None else Trust()
        try:
            # Only the status and the challenge matter: the body is never read (a hostile upstream
            # could send gigabytes), and the whole exchange is bounded, not just each read.
            async with asyncio.timeout(self.timeout), self._client(url, trust).stream("GET", url) as resp:
                pass
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamError("upstream registry timed out", timeout=True) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise _unreachable("upstream registry", e, mapping, upstream.netloc) from None
        if resp.status_code == 200:
            return AuthMethod("none")
        if resp.status_code in (401, 403):
            method = method_from(parse_challenge(resp.headers.get("www-authenticate", "")))
            if method is not None:
                return method
            raise UpstreamError(f"upstream registry answered {resp.status_code} without a usable challenge")
        raise UpstreamError(f"upstream registry answered {resp.status_code} to /v2/")

    async def fetch_token(self, mapping: Mapping, upstream_names: list[str]) -> UpstreamToken | None:
        """An upstream token for pulling these upstream repositories, or None if not needed.

        A token fetched earlier for the same mapping and repositories is reused while at least
        half of its life is left (never past its expiry).
        """
        if mapping.auth and mapping.auth.startswith("Bearer "):
            return None
        key = (mapping, tuple(sorted(set(upstream_names))))
        cached = self._cached_token(key)
        if cached is not None:
            return cached
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            cached = self._cached_token(key)
            if cached is not None:
                return cached
            token = await self._fetch_token(mapping, list(key[1]))
            if token is not None:
                self._tokens[key] = token
                while len(self._tokens) > TOKEN_CACHE_SIZE:
                    old, _ = self._tokens.popitem(last=False)
                    self._token_locks.pop(old, None)
            return token

    def _cached_token(self, key: tuple[Mapping, tuple[str, ...]]) -> UpstreamToken | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if not token.reusable(time.time()):
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token

    async def _fetch_token(self, mapping: Mapping, upstream_names: list[str]) -> UpstreamToken | None:
        method = await self.auth_method(mapping.upstream, mapping)
        if method.kind != "bearer" or method.realm is None:
            return None
        if not realm_allowed(method.realm, mapping.upstream, mapping.token_realms):
            raise UpstreamError("upstream token realm is not allowed by the configuration")
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", f"repository:{n}:pull") for n in upstream_names
        ]
        if method.service:
            params.insert(0, ("service", method.service))
        headers = {"Authorization": mapping.auth} if mapping.auth else {}
        started = time.time()
        self.token_fetches += 1
        ok = False
        try:
            # Bounded as a whole: a token service that dribbles its answer never trips the per-read timeout.
            async with (
                asyncio.timeout(self.timeout),
                self._client(method.realm, mapping.trust).stream(
                    "GET", method.realm, params=params, headers=headers
                ) as resp,
            ):
                if resp.status_code != 200:
                    if resp.status_code in (401, 403):
                        raise UpstreamError(
                            f"upstream token service refused the mapping's credentials ({resp.status_code})"
                        )
                    raise UpstreamError(f"upstream token service answered {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE:
                        raise UpstreamError("upstream token response too large")
            token = parse_token_response(bytes(body), started)
            ok = True
            return token
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamError("upstream token service timed out", timeout=True) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise _unreachable("upstream token service", e, mapping, _netloc(method.realm)) from None
        finally:
            if self.on_token_fetch is not None:
                try:
                    self.on_token_fetch(mapping.upstream.netloc, ok)
                except Exception as e:  # noqa: BLE001 - metrics must never fail a token fetch
                    logger.warning("token fetch observer failed (%s)", type(e).__name__)

    async def head(self, mapping: Mapping, url: str, headers: dict[str, str]) -> httpx.Response:
        """A HEAD of `url` on the mapping's upstream (the cache asks a tag's digest this way: Docker Hub counts
        GETs, not HEADs), bounded as a whole. Raises UpstreamError when it cannot be asked."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._client(url, mapping.trust).head(url, headers=headers)
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamError("upstream registry timed out", timeout=True) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise _unreachable("upstream registry", e, mapping, mapping.upstream.netloc) from None

    @contextlib.asynccontextmanager
    async def stream_get(self, mapping: Mapping, url: str, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """A streaming GET of `url` on the mapping's upstream for the cache's fill, following redirects (a blob
        store or CDN behind a 307: httpx drops Authorization when a redirect leaves the origin). Each read is
        bounded by the timeout; the body is the caller's to read. Raises UpstreamError when it cannot connect."""
        try:
            client = self._client(url, mapping.trust)
            async with client.stream("GET", url, headers=headers, follow_redirects=True) as resp:
                yield resp
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamError("upstream registry timed out", timeout=True) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise _unreachable("upstream registry", e, mapping, mapping.upstream.netloc) from None


def _unreachable(what: str, exc: BaseException, mapping: Mapping | None, netloc: str) -> UpstreamError:
    """The error for a failed connection; a TLS failure is also logged, with its precise reason.

    The client's answer names only the kind of TLS failure (OpenSSL's own words can name the
    upstream host, which a capability mapping keeps from its clients); the log line has it all.
    """
    reason = trust_module.tls_failure(exc)
    if reason is None:
        return UpstreamError(f"{what} unreachable ({type(exc).__name__})")
    label = mapping.label if mapping is not None else "-"
    logger.warning("registryproxy: upstream TLS to %s failed for mapping %s: %s", netloc, label, reason)
    return UpstreamError(f"{what} unreachable (TLS: {trust_module.failure_category(reason)})")


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc.rpartition("@")[2] or "-"
    except ValueError:
        return "-"


def _httpx_proxy(proxy: ProxySpec, tls: ssl.SSLContext | None) -> httpx.Proxy:
    auth = (proxy.username, proxy.password or "") if proxy.username is not None else None
    return httpx.Proxy(proxy.url, auth=auth, ssl_context=tls if proxy.scheme == "https" else None)
