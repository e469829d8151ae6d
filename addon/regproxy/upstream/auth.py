"""What an upstream's answers about authentication mean, and where its credentials may go.

Pure: no I/O. `method_from` reads how an upstream authenticates from its challenge; `realm_allowed`
is the realm policy (a mapping's credentials never follow a challenge to just any place);
`parse_token_response` reads a token service's answer, believing its lifetime only as far as is
safe. upstream/client.py's `RegistryClient` does the asking.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from ..config import Upstream, realm_origin
from ..protocol.challenge import UpstreamChallenge

# An upstream token is reused while at least this share of its life is left, so the client
# tokens that wrap it still live long enough to be worth having.
TOKEN_REUSE_FRACTION = 0.5
MAX_UPSTREAM_TOKEN = 32 * 1024
DEFAULT_EXPIRES_IN = 60
# An `expires_in` above this (ten years) is not a token's life but a broken or hostile answer.
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600
MAX_TRUSTED_LIFETIME = 24 * 3600.0


class UpstreamError(Exception):
    """An upstream failure; the message is safe for logs (no credentials, no tokens)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True)
class AuthMethod:
    kind: Literal["none", "basic", "bearer"]
    realm: str | None = None
    service: str | None = None


@dataclass(frozen=True)
class UpstreamToken:
    token: str = field(repr=False)
    expires_at: float
    issued_at: float = 0.0

    def reusable(self, now: float) -> bool:
        lifetime = self.expires_at - self.issued_at
        return self.expires_at - now >= max(1.0, lifetime * TOKEN_REUSE_FRACTION)


def realm_allowed(realm: str, upstream: Upstream, allowed: tuple[str, ...] = ()) -> bool:
    """Whether the proxy may send a mapping's credentials to this token realm.

    Allowed: https realms on public hosts, any realm on the upstream's own host name
    (which covers a plain-http upstream the operator configured explicitly), and the
    origins the mapping lists in `token_realms` (`allowed`, as config.realm_origin spells
    them). Refused: other schemes, credentials or fragments in the URL, plain http to
    another host, and https to loopback, private or link-local addresses other than the
    upstream's own.
    """
    try:
        parts = urlsplit(realm)
        _ = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password or parts.fragment:
        return False
    if allowed and realm_origin(f"{parts.scheme}://{parts.netloc}") in allowed:
        return True
    if host == upstream.host:
        return parts.scheme == "https" or upstream.scheme == "http"
    if parts.scheme != "https":
        return False
    addr = _ip_literal(host)
    if addr is None:
        bare = host.rstrip(".")
        return bare != "localhost" and not bare.endswith(".localhost")
    return addr.is_global


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host name denotes by itself, including the resolver's legacy IPv4
    forms (`127.1`, `2130706433`, `0x7f000001`) that `ipaddress` does not read."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if all(re.fullmatch(r"0x[0-9a-f]*|[0-9]+", part) for part in host.rstrip(".").split(".")):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return ipaddress.IPv4Address("0.0.0.0")  # unparseable numeric host: treat as not global
    return None


def parse_token_response(body: bytes, requested_at: float) -> UpstreamToken:
    """Read a token server's JSON answer (`token` or `access_token`, `expires_in`, `issued_at`)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays ("[[[[…")
        raise UpstreamError("upstream token response is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("upstream token response is not a JSON object")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token or len(token) > MAX_UPSTREAM_TOKEN or not token.isascii():
        raise UpstreamError("upstream token response has no usable token")
    if any(c in token for c in " \r\n\t\0,\"'"):
        raise UpstreamError("upstream token response has no usable token")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        expires_in = DEFAULT_EXPIRES_IN  # absent or not a number: the token spec's default
    elif not 0 < expires_in <= MAX_EXPIRES_IN:  # NaN fails this too
        raise UpstreamError("upstream token response has an impossible expires_in")
    # Expiry counts from when the request was sent, on this clock: the upstream's
    # `issued_at` is not trusted, so clock skew can only shorten a token, never extend it.
    # A very long life is believed for a day at most, so that a cached token is fetched again.
    return UpstreamToken(token, requested_at + min(float(expires_in), MAX_TRUSTED_LIFETIME), requested_at)


def method_from(ch: UpstreamChallenge | None) -> AuthMethod | None:
    if ch is None:
        return None
    if ch.scheme == "bearer" and ch.realm:
        return AuthMethod("bearer", ch.realm, ch.service)
    if ch.scheme == "basic":
        return AuthMethod("basic")
    return None
