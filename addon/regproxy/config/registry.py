"""How a mapping reaches its upstream: the registry's address, the credentials sent to it and the
trust its TLS is verified with.

`parse_registry` reads `registry` (Docker Hub's aliases become its API host), `upstream_auth` the
credentials (`auth`, or `username` with `password`/`password_env`), `trust_choice` the mapping's
`ca_file`/`tls_verify` over the top-level default (transport/trust.py); mappings of one https upstream must
trust it alike (`check_shared_upstreams`). `mirror_host` and `realm_origin` normalise the hosts of
`mirror_of` and the origins of `token_realms`, and are used again at run time to compare with them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..transport.trust import Trust, TrustError, read_ca_file
from .model import (
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_API_HOST,
    DOCKER_HUB_NS,
    HOSTNAME_RE,
    ConfigError,
    Mapping,
    Upstream,
    show_key,
)

_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


def parse_registry(value: object, where: str) -> Upstream:
    """`host[:port]` (https) or an http(s) URL without path; Docker Hub aliases normalised."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a host[:port] or an http(s) URL")
    text = value.strip()
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: scheme must be http or https")
    if parts.username or parts.password:
        raise ConfigError(f"{where}: must not contain credentials (use auth, username/password)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: must be a host[:port] or URL without a path")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: has an invalid port") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.fullmatch(host):
            raise ConfigError(f"{where}: {host!r} is not a valid host name") from None
    if host in DOCKER_HUB_ALIASES:
        return Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if port == 0:
        raise ConfigError(f"{where}: port 0 is not a port to connect to")
    return Upstream(parts.scheme, host, port)


def mirror_host(value: object) -> str | None:
    """A registry host as containerd names it in `?ns=` and as `mirror_of` lists it: `host[:port]`
    (a name, an IPv4 address or a bracketed IPv6 address), lower case, Docker Hub's aliases as
    `docker.io`. None if the value is not one."""
    if not isinstance(value, str) or not 0 < len(value) <= 300:
        return None
    text = value.lower()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if not bracket or (rest and not rest.startswith(":")):
            return None
        shown, has_port, port = f"[{host}]", bool(rest), rest[1:]
    else:
        host, colon, port = text.partition(":")
        if not HOSTNAME_RE.fullmatch(host):
            return None
        shown, has_port = host, bool(colon)
    if has_port and not (_PORT_RE.fullmatch(port) and int(port) <= 65535):
        return None
    if not has_port and host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB_NS
    return f"{shown}:{port}" if has_port else shown


def realm_origin(url: str) -> str | None:
    """`scheme://host:port` of a URL (lower case, default port spelled out), or None if it is not an http(s)
    origin without credentials, path, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or (443 if parts.scheme == 'https' else 80)}"


def upstream_auth(value: dict[str, Any], where: str, environ: AnyMapping[str, str]) -> str | None:
    """The Authorization value used upstream, from `auth` or `username` + `password[_env]`."""
    given = [k for k in ("auth", "username") if k in value]
    if len(given) > 1:
        raise ConfigError(f"{where}.username: conflicts with auth (give one of them)")
    if "auth" in value:
        auth = value["auth"]
        if not isinstance(auth, str) or not auth.strip():
            raise ConfigError(f"{where}.auth: must be a full Authorization value such as 'Basic dXNlcjpwYXNz'")
        scheme, _, cred = auth.strip().partition(" ")
        if scheme.lower() not in ("basic", "bearer") or not cred.strip():
            raise ConfigError(f"{where}.auth: must start with 'Basic ' or 'Bearer ' followed by the credential")
        if any(c in auth for c in "\r\n\0"):
            raise ConfigError(f"{where}.auth: must not contain control characters")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(cred.strip(), validate=True).decode()
            except ValueError:
                raise ConfigError(f"{where}.auth: the Basic credential is not valid base64 of user:password") from None
            if ":" not in decoded:
                raise ConfigError(f"{where}.auth: the Basic credential must encode user:password")
        return f"{scheme[0].upper()}{scheme[1:].lower()} {cred.strip()}"
    for k in ("password", "password_env"):
        if k in value and "username" not in value:
            raise ConfigError(f"{where}.{k}: needs username")
    if "username" not in value:
        return None
    user = value["username"]
    if not isinstance(user, str) or not user or ":" in user or any(c in user for c in "\r\n\0"):
        raise ConfigError(f"{where}.username: must be a non-empty name without ':'")
    if ("password" in value) == ("password_env" in value):
        raise ConfigError(f"{where}.username: needs exactly one of password or password_env")
    if "password" in value:
        password = value["password"]
        if not isinstance(password, str) or not password:
            raise ConfigError(f"{where}.password: must be a non-empty string")
    else:
        env_name = value["password_env"]
        if not isinstance(env_name, str) or not env_name:
            raise ConfigError(f"{where}.password_env: must name an environment variable")
        password = environ.get(env_name, "")
        if not password:
            raise ConfigError(f"{where}.password_env: environment variable {env_name} is not set or empty")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"


@dataclass(frozen=True)
class TrustChoice:
    """A mapping's trust and the key that decided it (None: the default store, nothing configured)."""

    trust: Trust
    key: str | None


def ca_file_setting(data: dict[str, Any], where: str, base: Path | None) -> tuple[str, bytes] | None:
    """A `ca_file` setting: its resolved path and certificates, or None when absent."""
    key = where.rsplit(".", 1)[-1]
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{where}: must be the path of a PEM file of CA certificates")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        pem = read_ca_file(path)
    except TrustError as e:
        raise ConfigError(f"{where}: {e}") from None
    return str(path), pem


def trust_choice(
    value: dict[str, Any], where: str, upstream: Upstream, default: TrustChoice, base: Path | None
) -> TrustChoice:
    verify = value.get("tls_verify", True)
    if not isinstance(verify, bool):
        raise ConfigError(f"{where}.tls_verify: must be true or false")
    own_ca = ca_file_setting(value, f"{where}.ca_file", base)
    if upstream.scheme != "https":
        if own_ca is not None:
            raise ConfigError(f"{where}.ca_file: the registry is plain http; ca_file applies to https registries")
        if not verify:
            raise ConfigError(f"{where}.tls_verify: the registry is plain http; tls_verify applies to https registries")
        return default
    if not verify:
        if own_ca is not None:
            raise ConfigError(f"{where}.ca_file: conflicts with tls_verify: false (nothing would be verified)")
        return TrustChoice(Trust(False, store=default.trust.store), f"{where}.tls_verify")
    if own_ca is not None:
        return TrustChoice(Trust(True, own_ca[0], own_ca[1], default.trust.store), f"{where}.ca_file")
    return default


def check_shared_upstreams(chosen: list[tuple[Mapping, TrustChoice]]) -> None:
    """Mappings of one https upstream must trust it the same way.

    mitmproxy reuses an upstream connection for the next request of the same client connection,
    whichever mapping that request is for, and the upstream's auth discovery is cached per
    upstream: a connection verified for one mapping must be good enough for every other.
    """
    first: dict[str, tuple[Mapping, TrustChoice]] = {}
    for m, choice in chosen:
        if m.upstream.scheme != "https":
            continue
        seen = first.setdefault(m.upstream.origin, (m, choice))
        other, other_choice = seen
        if other is m or choice.trust.same_as(other_choice.trust):
            continue
        mine = choice.key or f"proxies.{show_key(m.key)} (default store)"
        theirs = other_choice.key or f"proxies.{show_key(other.key)} (default store)"
        if choice.key == "ca_file":
            mine = f"proxies.{show_key(m.key)} (top-level ca_file)"
        if other_choice.key == "ca_file":
            theirs = f"proxies.{show_key(other.key)} (top-level ca_file)"
        raise ConfigError(
            f"{mine}: trusts {m.upstream.origin} differently from {theirs}; mappings of one upstream "
            "share its connections, so give them the same ca_file and tls_verify"
        )
