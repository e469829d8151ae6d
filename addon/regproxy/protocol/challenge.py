"""WWW-Authenticate challenges: the proxy's own, and reading the upstream's."""

from __future__ import annotations

from dataclasses import dataclass

from werkzeug.datastructures import WWWAuthenticate


@dataclass(frozen=True)
class UpstreamChallenge:
    scheme: str  # "bearer", "basic" or another scheme, lower-case
    realm: str | None = None
    service: str | None = None


def bearer_challenge(realm: str, service: str, scope: str | None = None, error: str | None = None) -> str:
    """The proxy's Bearer challenge, every parameter a quoted string."""
    params = {"realm": realm, "service": service}
    if scope:
        params["scope"] = scope
    if error:
        params["error"] = error
    return "Bearer " + ",".join(f'{k}="{_escape(v)}"' for k, v in params.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def parse_challenge(value: str) -> UpstreamChallenge | None:
    """The first challenge of an upstream WWW-Authenticate header, or None if unreadable."""
    try:
        parsed = WWWAuthenticate.from_header(value)
    except ValueError:
        return None
    if parsed is None:
        return None
    params = parsed.parameters
    return UpstreamChallenge(parsed.type.lower(), params.get("realm"), params.get("service"))
