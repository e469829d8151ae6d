"""The `proxies:` entries: each key and its settings become a `Mapping`, then the checks across them
(no two keys for one name, no registry host mirrored twice, one trust per https upstream).

A key is a repository (`bp/true`), a namespace (`bp/`) or the root `*` (ROOT_KEY: every name no
other key matches); a key with a segment that looks like a capability (a UUID or 128 random bits) is
a capability mapping unless `capability:` says otherwise. `mirror_of` lists the registry hosts a
namespace mapping serves for containerd's `?ns=HOST` (see mapping/matcher.py).
"""

from __future__ import annotations

from collections.abc import Mapping as AnyMapping
from pathlib import Path
from typing import Any

from ..limits.settings import LimitsError, parse_limits
from ..policy import Pattern, Policy, PolicyError, compile_pattern
from ..protocol.names import is_valid_name, looks_like_capability
from .model import HOSTNAME_RE, ROOT_KEY, ConfigError, Mapping, show_key
from .registry import (
    TrustChoice,
    check_shared_upstreams,
    mirror_host,
    parse_registry,
    realm_origin,
    trust_choice,
    upstream_auth,
)

MAPPING_KEYS = {
    "registry",
    "remote",
    "auth",
    "username",
    "password",
    "password_env",
    "hosts",
    "capability",
    "ca_file",
    "tls_verify",
    "mirror_of",
    "token_realms",
    "limits",
    "cache",
    "allow",
    "deny",
    "digests",
}
POLICY_KEYS = ("allow", "deny", "digests")


def parse_proxies(
    proxies: dict[Any, Any], environ: AnyMapping[str, str], default_trust: TrustChoice, base: Path | None
) -> tuple[Mapping, ...]:
    """Every entry of `proxies` (a non-empty mapping), checked one by one and against each other."""
    chosen = [_mapping(k, v, environ, default_trust, base) for k, v in proxies.items()]
    mappings = tuple(m for m, _ in chosen)
    _check_collisions(mappings)
    _check_mirrors(mappings)
    check_shared_upstreams(chosen)
    return mappings


def _mapping(
    key: object, value: object, environ: AnyMapping[str, str], default_trust: TrustChoice, base: Path | None
) -> tuple[Mapping, TrustChoice]:
    if not isinstance(key, str):
        raise ConfigError(f"proxies.{show_key(key)}: the key must be a repository name or a namespace ending in /")
    where = f"proxies.{show_key(key)}"
    root = key == ROOT_KEY
    namespace = root or key.endswith("/")
    name = "" if root else key[:-1] if namespace else key
    if not root and not is_valid_name(name):
        raise ConfigError(
            f"{where}: not a valid repository name (lower-case components joined by /, each of "
            "letters and digits separated by ., _, __ or -)"
            + ("; the root of every name is the key *" if key == "/" else "")
        )
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with registry and remote")
    for k in value:
        if k not in MAPPING_KEYS:
            raise ConfigError(f"{where}.{show_key(k)}: unknown key (known: {', '.join(sorted(MAPPING_KEYS))})")
    if "registry" not in value:
        raise ConfigError(f"{where}.registry: missing")
    upstream = parse_registry(value["registry"], f"{where}.registry")
    remote = value.get("remote", "")
    if remote is None:
        remote = ""
    if not isinstance(remote, str):
        raise ConfigError(f"{where}.remote: must be a repository name or namespace")
    remote = remote.strip().strip("/")
    if remote and not is_valid_name(remote):
        raise ConfigError(f"{where}.remote: not a valid repository name")
    if not remote and not namespace:
        raise ConfigError(f"{where}.remote: missing (a single-repository key needs the upstream repository)")
    hosts = value.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ConfigError(f"{where}.hosts: must be a list of host names")
    norm_hosts = []
    for h in hosts:
        h = h.strip().lower()
        hostname, _, port = h.partition(":")
        if not HOSTNAME_RE.fullmatch(hostname) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ConfigError(f"{where}.hosts: {h!r} is not a host name[:port]")
        norm_hosts.append(h)
    capability = value.get("capability")
    if capability is None:
        capability = any(looks_like_capability(s) for s in name.split("/"))
    elif not isinstance(capability, bool):
        raise ConfigError(f"{where}.capability: must be true or false")
    if root and capability:
        raise ConfigError(f"{where}.capability: the root key * serves every name; it has no key to keep secret")
    mirror_of = _mirror_of(value, where, namespace, capability)
    trust = trust_choice(value, where, upstream, default_trust, base)
    try:
        limits = parse_limits(value["limits"], f"{where}.limits") if "limits" in value else None
    except LimitsError as e:
        raise ConfigError(str(e)) from None
    cache = value.get("cache", True)
    if not isinstance(cache, bool):
        raise ConfigError(f"{where}.cache: must be true or false (false: this mapping is never cached)")
    mapping = Mapping(
        key=key,
        prefix=() if root else tuple(name.split("/")),
        namespace=namespace,
        upstream=upstream,
        remote=remote,
        auth=upstream_auth(value, where, environ),
        hosts=tuple(norm_hosts),
        capability=capability,
        trust=trust.trust,
        mirror_of=mirror_of,
        token_realms=_token_realms(value, where),
        limits=limits,
        cache=cache,
        policy=_policy(value, where, namespace and not capability),
    )
    return mapping, trust


def _policy(value: dict[str, Any], where: str, namespace: bool) -> Policy:
    """`allow`, `deny` (REPO[:TAG] patterns, policy/patterns.py) and `digests` (`resolved` or `any`)."""
    named = [k for k in POLICY_KEYS if k in value]
    if not named:
        return Policy()
    if not namespace:
        raise ConfigError(
            f"{where}.{named[0]}: only a namespace mapping has a policy (an exact or capability mapping serves one"
            " repository)"
        )
    digests = value.get("digests", "any")
    if digests not in ("any", "resolved"):
        raise ConfigError(f"{where}.digests: must be resolved or any (resolved needs the cache: see docs/policy.md)")
    allow = _patterns(value, "allow", where) if "allow" in value else None
    deny = _patterns(value, "deny", where) if "deny" in value else ()
    return Policy(allow, deny, digests == "resolved")


def _patterns(value: dict[str, Any], key: str, where: str) -> tuple[Pattern, ...]:
    patterns = value[key]
    if not isinstance(patterns, list):
        raise ConfigError(f"{where}.{key}: must be a list of REPO[:TAG] patterns such as [library/*, grafana/**:v*]")
    try:
        return tuple(compile_pattern(p) for p in patterns)
    except PolicyError as e:
        raise ConfigError(f"{where}.{key}: {e}") from None


def _token_realms(value: dict[str, Any], where: str) -> tuple[str, ...]:
    """`token_realms`: token services on a private address or another host, allowed by name (origins only)."""
    realms = value.get("token_realms")
    if realms is None:
        return ()
    if not isinstance(realms, list) or not all(isinstance(r, str) for r in realms):
        raise ConfigError(f"{where}.token_realms: must be a list of URLs such as [https://auth.corp.example:8443]")
    found: list[str] = []
    for r in realms:
        origin = realm_origin(r.strip())
        if origin is None:
            raise ConfigError(
                f"{where}.token_realms: {show_key(r)!r} must be an http(s) origin (scheme://host[:port], no path)"
            )
        if origin not in found:
            found.append(origin)
    return tuple(found)


def _mirror_of(value: dict[str, Any], where: str, namespace: bool, capability: bool) -> tuple[str, ...]:
    """`mirror_of`: the registry hosts whose `?ns=` requests the mapping serves (a namespace, not a capability)."""
    hosts = value.get("mirror_of")
    if hosts is None:
        return ()
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ConfigError(f"{where}.mirror_of: must be a list of registry hosts such as [docker.io, ghcr.io]")
    found: list[str] = []
    for h in hosts:
        host = mirror_host(h.strip())
        if host is None:
            raise ConfigError(f"{where}.mirror_of: {show_key(h)!r} is not a registry host[:port]")
        if host in found:
            raise ConfigError(f"{where}.mirror_of: {host} is listed twice")
        found.append(host)
    if found and not namespace:
        raise ConfigError(f"{where}.mirror_of: needs a namespace key (ending in /, or the root key *)")
    if found and capability:
        raise ConfigError(
            f"{where}.mirror_of: a capability mapping cannot be a mirror (?ns= would reach it without its key)"
        )
    return tuple(found)


def _check_mirrors(mappings: tuple[Mapping, ...]) -> None:
    seen: dict[str, Mapping] = {}
    for m in mappings:
        for host in m.mirror_of:
            other = seen.setdefault(host, m)
            if other is not m:
                raise ConfigError(
                    f"proxies.{show_key(m.key)}.mirror_of: {host} is already mirrored by proxies.{show_key(other.key)}"
                )


def _check_collisions(mappings: tuple[Mapping, ...]) -> None:
    seen: dict[tuple[str, ...], Mapping] = {}
    for m in mappings:
        other = seen.get(m.prefix)
        if other is not None:
            raise ConfigError(f"proxies.{show_key(m.key)}: collides with proxies.{show_key(other.key)} (same name)")
        seen[m.prefix] = m
