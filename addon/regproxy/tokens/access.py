"""What a registry request names, and whether the client's token lets it have that through a mapping.

The decisions `steps.routing` takes between reading a request and rewriting it for the upstream, without
mitmproxy. `Asked` is what the request names: its route and, for containerd's mirror requests
(`?ns=HOST`), the registry (`mirror_ns`). `read_token` reads the client's PASETO access token from its
Authorization. `authorize` then decides, in this order: the ping and the catalog are answered here
(nothing is listed); a client without a valid token, or whose token grants no pull of the name, is
challenged; a name no mapping serves is 404 (so is a segment that is not a genuine share link); a share
link that expired or was revoked is 403 DENIED, saying which; a grant issued by a mapping that has changed since is
challenged again; anything but a pull is 405; the rest is `Allowed` through its mapping. The name is
looked up only for a client whose token grants a pull of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ..config import mirror_host
from ..mapping.matcher import Match, Matcher, redact_name
from ..protocol.errors import RegistryError
from ..protocol.names import Route, RouteKind, is_valid_name
from ..protocol.scopes import repository_scope
from .paseto import AccessToken, Grant, TokenCodec, TokenError

logger = logging.getLogger("registryproxy")


@dataclass(frozen=True)
class Asked:
    """What a registry request names: its route and query, the Host it was sent to, and for a mirror
    request the registry it is for (`ns`, normalised)."""

    route: Route
    path: str  # without the query
    query: str
    host: str | None
    ns: str | None = None


def mirror_ns(query: str) -> tuple[bool, str | None]:
    """containerd's `?ns=HOST` (the registry a mirror request is for): whether one was given, and the
    registry host, normalised; None when absent, repeated with other values or malformed."""
    if "ns=" not in query:
        return False, None
    values = {v for k, v in parse_qsl(query, keep_blank_values=True) if k == "ns"}
    if not values:
        return False, None
    return True, mirror_host(values.pop()) if len(values) == 1 else None


def log_path(asked: Asked, match: Match | None = None) -> str:
    """The request as logs may show it: the mapping's log name once one matched (capability keys replaced
    by its label), else the name with capability-like segments hidden; the mirrored registry after it."""
    route = asked.route
    if match is not None:
        name = match.log_name + route.suffix
    else:
        name = redact_name(route.name) + route.suffix if route.name else asked.path
    return name + (f"?ns={asked.ns}" if asked.ns is not None else "")


@dataclass(frozen=True)
class Presented:
    """The client's access token as read from its Authorization: the token, or why there is none
    (`refusal`, for metrics: `invalid_token` or `expired`; None when no token was presented)."""

    token: AccessToken | None
    refusal: str | None = None

    @property
    def error(self) -> str | None:
        """The challenge's error: `invalid_token` for a token presented and refused."""
        return "invalid_token" if self.refusal is not None else None

    @property
    def outcome(self) -> str:
        """The token outcome for the log line, when there is no token."""
        return self.error or "none"


def read_token(codec: TokenCodec, authorization: str | None, audience: str) -> Presented:
    """The client's valid access token for `audience`, from its Authorization header's value."""
    if not authorization:
        return Presented(None)
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return Presented(None, "invalid_token")
    try:
        return Presented(codec.read_access(credential.strip(), audience))
    except TokenError as e:
        logger.debug("token refused: %s", e.reason)
        return Presented(None, "expired" if e.reason == "expired" else "invalid_token")


@dataclass(frozen=True)
class Challenge:
    """401 with the proxy's Bearer challenge: the scope to ask a token for, and why (the challenge's error)."""

    scope: str | None
    error: str | None


@dataclass(frozen=True)
class Answer:
    """The proxy answers the request itself: a challenge, a registry error, or a 200 with this JSON body."""

    reply: Challenge | RegistryError | bytes
    token: str  # the token outcome, for the log line
    refusal: str | None = None  # why a token was refused, for metrics
    match: Match | None = None  # the mapping serving the name, when the answer came after it was found


@dataclass(frozen=True)
class Allowed:
    """A pull the client's token allows, through the mapping that serves the name."""

    match: Match
    grant: Grant

    @property
    def upstream_auth(self) -> str | None:
        """The upstream token from the client's token, else the mapping's own credentials, else none."""
        return f"Bearer {self.grant.upstream_token}" if self.grant.upstream_token else self.match.mapping.auth


def authorize(asked: Asked, method: str, presented: Presented, matcher: Matcher) -> Answer | Allowed:
    """Whether the client may have what it asked for, and through which mapping; else the answer."""
    route = asked.route
    if route.kind is RouteKind.PING or route.kind is RouteKind.CATALOG:
        if presented.token is None:
            scope = "registry:catalog:*" if route.kind is RouteKind.CATALOG else None
            return Answer(Challenge(scope, presented.error), presented.outcome, presented.refusal)
        # Capability keys and upstream names are never listed.
        return Answer(b"{}" if route.kind is RouteKind.PING else b'{"repositories":[]}', "ok")

    scope = repository_scope(route.name)
    if presented.token is None:
        return Answer(Challenge(scope, presented.error), presented.outcome, presented.refusal)
    grant = presented.token.grant_for(route.name)
    if grant is None:
        return Answer(Challenge(scope, "insufficient_scope"), "insufficient scope", "insufficient_scope")
    match = matcher.match(route.name, asked.host, asked.ns)
    if match is None or not is_valid_name(match.upstream_name):
        return Answer(RegistryError(404, "NAME_UNKNOWN"), "ok")
    link = match.link
    if link is not None and link.refusal is not None:
        return Answer(RegistryError(403, "DENIED", link.refusal), f"link {link.state}", f"link_{link.state}", match)
    if grant.mapping != match.mapping.identity or grant.link != (link.id if link is not None else None):
        return Answer(Challenge(scope, "invalid_token"), "stale (mapping changed)", "invalid_token", match)
    if method not in ("GET", "HEAD") or route.kind is RouteKind.UPLOAD:
        return Answer(RegistryError(405, "UNSUPPORTED", "this registry is pull-only"), "ok", match=match)
    return Allowed(match, grant)
