"""The proxy's token endpoint (distribution token auth, as real clients use it).

`GET /token?service=…&scope=…` (scope repeated or space-separated; `account`,
`client_id`, `offline_token` accepted; Basic credentials accepted and ignored) and
`POST /token` with `grant_type=password` or `grant_type=refresh_token`. The proxy has
no user accounts: access is decided by the mappings alone, so any caller gets pull
tokens for what the configuration maps, and client credentials never go upstream.

Each requested repository scope is cut down to `pull`, matched with the same matcher
as the routes, and exchanged for an upstream token with the mapping's credentials;
the answer is a PASETO that wraps those upstream tokens.

Share links: a name through a genuine link is granted as a name of its mapping, in a grant of its own
that names the link's id; the token expires no later than the link. A link that expired or was revoked
is granted nothing, as a name no mapping serves: the registry request then answers why (403 DENIED).

Mirror mode: containerd sends `?ns=HOST` on its registry requests but not on its token
requests, so a challenge for an `?ns=` request names the realm `BASE/ns/HOST/token`
(`mirror_base`). There scope names are matched as that registry's names, and the token's
audience is `BASE/ns/HOST`: it is good only for requests with that `?ns=`, and a token
issued without one is not good for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from ..config import Config, Mapping, mirror_host
from ..mapping.matcher import Matcher, policy_names
from ..policy import refuses_repository
from ..protocol.errors import RegistryError
from ..protocol.names import is_valid_name
from ..protocol.scopes import pull_names
from ..upstream.auth import UpstreamError, UpstreamToken
from ..upstream.client import RegistryClient
from .paseto import Grant, TokenCodec, TokenError

MAX_PARAM_LENGTH = 4096
MAX_PARAMS = 128


@dataclass(frozen=True)
class TokenRequest:
    grant_type: str | None  # None for GET
    scopes: tuple[str, ...]
    offline: bool
    refresh_token: str | None
    subject: str


def parse_token_request(
    method: str, query: Sequence[tuple[str, str]], form: Sequence[tuple[str, str]] | None
) -> TokenRequest:
    """Read the parameters of a token request. Raises `RegistryError` (400/405)."""
    if method not in ("GET", "POST"):
        raise RegistryError(405, "UNSUPPORTED", "the token endpoint answers GET and POST")
    params = list(query) + list(form or ())
    if len(params) > MAX_PARAMS or any(len(k) + len(v) > MAX_PARAM_LENGTH for k, v in params):
        raise RegistryError(400, "UNSUPPORTED", "token request parameters too large")
    for k, v in params:
        if any(ord(c) < 0x20 or c == "\x7f" for c in k + v):
            raise RegistryError(400, "UNSUPPORTED", "control characters in token request parameters")

    def first(name: str) -> str | None:
        return next((v for k, v in params if k == name), None)

    scopes = tuple(v for k, v in params if k == "scope")
    if method == "GET":
        return TokenRequest(
            grant_type=None,
            scopes=scopes,
            offline=(first("offline_token") or "").lower() == "true",
            refresh_token=None,
            subject=first("account") or "anonymous",
        )
    grant = first("grant_type")
    if grant == "password":
        return TokenRequest("password", scopes, True, None, first("username") or "anonymous")
    if grant == "refresh_token":
        refresh = first("refresh_token")
        if not refresh:
            raise RegistryError(400, "UNSUPPORTED", "refresh_token grant without refresh_token")
        return TokenRequest("refresh_token", scopes, True, refresh, "anonymous")
    raise RegistryError(400, "UNSUPPORTED", "grant_type must be password or refresh_token")


@dataclass(frozen=True)
class TokenAnswer:
    body: dict[str, object]
    outcome: str  # for logs: what was granted, no secrets


class TokenService:
    def __init__(self, config: Config, matcher: Matcher, codec: TokenCodec, client: RegistryClient) -> None:
        self._config = config
        self._matcher = matcher
        self._codec = codec
        self._client = client

    @property
    def client(self) -> RegistryClient:
        return self._client

    async def answer(self, req: TokenRequest, audience: str, host: str | None, ns: str | None = None) -> TokenAnswer:
        """Issue a token for the request (at `audience`, the base URL, or at its mirror realm for the
        registry `ns`). Raises `RegistryError` on refusal or upstream failure."""
        subject = req.subject
        if req.refresh_token is not None:
            try:
                subject = self._codec.read_refresh(req.refresh_token, audience)
            except TokenError as e:
                raise RegistryError(401, "UNAUTHORIZED", f"refresh token refused: {e.reason}") from None

        # By (mapping identity, link id): a grant names one mapping and at most one link.
        groups: dict[tuple[str, str | None] | None, tuple[Mapping | None, list[str], list[str]]] = {}
        link_left: dict[str, float] = {}
        # Names a mapping's policy refuses whatever the reference: granted (so a request answers 403 DENIED,
        # not a challenge) without an upstream token, and never named to the upstream's token service.
        refused: dict[tuple[str, str | None], list[str]] = {}
        for name in pull_names(list(req.scopes)):
            match = self._matcher.match(name, host, ns)
            link = match.link if match is not None else None
            # A link with less than a second left is granted nothing: no token may outlive it.
            spent = link is not None and (link.state != "ok" or link.remaining < 1)
            if match is None or not is_valid_name(match.upstream_name) or spent:
                groups.setdefault(None, (None, [], []))[1].append(name)
                continue
            if link is not None:
                link_left[link.id] = link.remaining
            group = (match.mapping.identity, link.id if link is not None else None)
            if refuses_repository(match.mapping.policy, policy_names(match)):
                refused.setdefault(group, []).append(name)
                continue
            entry = groups.setdefault(group, (match.mapping, [], []))
            entry[1].append(name)
            entry[2].append(match.upstream_name)

        keys = list(groups)
        results = await asyncio.gather(
            *(self._upstream_token(groups[k][0], groups[k][2]) for k in keys), return_exceptions=True
        )
        now = time.time()
        lifetime = float(self._config.token_ttl)
        grants = []
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, UpstreamError):
                status = 504 if result.timeout else 502
                raise RegistryError(status, "UNAVAILABLE", str(result))
            if isinstance(result, BaseException):
                raise result
            upstream_token = result.token if result else None
            if result is not None:
                lifetime = min(lifetime, result.expires_at - now)
            identity, link_id = key if key is not None else (None, None)
            grants.append(Grant(identity, tuple(groups[key][1]), upstream_token, link_id))
        grants.extend(Grant(identity, tuple(names), None, link_id) for (identity, link_id), names in refused.items())
        # Rounded, not truncated: an upstream token of 60 s fetched in a few milliseconds is
        # answered as 60 s (protocol.md: never below 60), at most half a second over. A link's
        # time left is truncated: the token never outlives the link.
        lifetime_s = max(1, min([round(lifetime), *(int(left) for left in link_left.values())]))

        # The access token is good where it was asked for; refresh tokens (an identity, bound to no
        # mapping) stay at the base, so one `docker login` serves every realm.
        access_audience = mirror_base(audience, ns) if ns is not None else audience
        token = self._codec.issue_access(access_audience, tuple(grants), lifetime_s)
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": lifetime_s,
            "issued_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if req.offline:
            body["refresh_token"] = self._codec.issue_refresh(audience, subject, self._config.refresh_ttl)
        granted = sum(len(g.names) for g in grants if g.mapping is not None)
        return TokenAnswer(body, f"issued pull on {granted} repositories for {lifetime_s}s")

    async def _upstream_token(self, mapping: Mapping | None, upstream_names: list[str]) -> UpstreamToken | None:
        if mapping is None:
            return None
        return await self._client.fetch_token(mapping, upstream_names)


def public_base(config: Config, host: str | None, tls: bool) -> str:
    """The base URL clients reach this proxy at, for the realm and the token audience.

    A Host the configuration names (public_url or a mapping's `hosts:`) is used as given;
    any other Host falls back to `public_url`, and only without one to the Host itself.
    """
    scheme = urlsplit(config.public_url).scheme if config.public_url else ("https" if tls else "http")
    if host:
        host = host.lower()
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if host in config.domains or hostname in config.domains:
            return f"{scheme}://{host}"
    if config.public_url:
        return config.public_url
    return f"{scheme}://{host or 'localhost'}"


MIRROR_PATH = "/ns/"
TOKEN_PATH = "/token"  # answers.TOKEN_PATH (this module imports no mitmproxy)


def mirror_base(base: str, ns: str) -> str:
    """The base URL for requests with `?ns=NS` (a normalised `mirror_host`): the realm is this + /token,
    and it is the audience of the tokens issued there."""
    return f"{base}{MIRROR_PATH}{ns}"


def token_path(path: str) -> tuple[bool, str | None]:
    """Whether `path` is the token endpoint, and for which mirrored registry: (True, None) for
    `/token`, (True, NS) for `/ns/NS/token` with a well-formed registry host, else (False, None)."""
    if path == TOKEN_PATH:
        return True, None
    if path.startswith(MIRROR_PATH) and path.endswith(TOKEN_PATH):
        ns = mirror_host(path[len(MIRROR_PATH) : -len(TOKEN_PATH)])
        if ns is not None:
            return True, ns
    return False, None
