"""Configuration: load, validate and normalise the YAML file.

The original project's format keeps working (`listen_addr`, `port`, `secretkey`,
`proxies` with `registry`, `remote`, `auth`), as do its later spellings
(`listen_port`, `secret_key`, `proxy_fqdn`). Validation is strict: any problem raises
`ConfigError` with one line that names the key and never echoes a secret.

Upstream trust (`ca_file` at the top level and per mapping, `tls_verify` per mapping; see
trust.py) becomes each mapping's `Trust`; mappings of one https upstream must agree on it. The
forward proxy for the proxy's own connections is read from the environment (egress.py) into
`Config.egress`.

Mirror mode: the key `*` (ROOT_KEY) is the root namespace, serving every name no other key
matches; `mirror_of` lists the registry hosts a namespace mapping serves for containerd's
`?ns=HOST` (see mapping.py).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .egress import Egress, EgressError
from .limits import LimitsError, LimitSettings, Rules, parse_limits, parse_settings
from .names import is_valid_name, looks_like_capability
from .trust import DefaultStore, Trust, TrustError, default_store, read_ca_file

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DOCKER_HUB_NS = "docker.io"  # how containerd names Docker Hub in `?ns=`
ROOT_KEY = "*"  # the mapping key of the root namespace: every name no other key matches
SECRET_KEY_ENV = "REGISTRYPROXY_SECRETKEY"
SECRET_KEY_FILE_ENV = "REGISTRYPROXY_SECRETKEY_FILE"

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


class ConfigError(ValueError):
    """A configuration problem, as one line naming the key."""


@dataclass(frozen=True)
class Upstream:
    """Where a mapping's bytes come from."""

    scheme: str
    host: str
    port: int
    dockerhub: bool = False

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True)
class Mapping:
    """One entry of `proxies`: a local namespace or repository served from an upstream."""

    key: str
    prefix: tuple[str, ...]
    namespace: bool
    upstream: Upstream
    remote: str
    auth: str | None = field(default=None, repr=False)
    hosts: tuple[str, ...] = ()
    capability: bool = False
    # How the upstream (and its token realm) is verified: ca_file, tls_verify (see trust.py).
    trust: Trust = field(default_factory=Trust)
    # Registry hosts (normalised by `mirror_host`) whose `?ns=HOST` requests this mapping serves.
    mirror_of: tuple[str, ...] = ()
    # Token realm origins (`scheme://host:port`) the operator allows beyond upstream.realm_allowed's policy.
    token_realms: tuple[str, ...] = ()
    # This mapping's own `limits:` (limits.py): the keys it names replace the top-level ones.
    limits: Rules | None = None

    @property
    def label(self) -> str:
        """A stable, non-secret name for logs and metrics."""
        if not self.capability:
            return self.key
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:10]
        return f"cap:{digest}"

    @property
    def identity(self) -> str:
        """What a token's grant is bound to: the key and everything that decides where it leads.

        A mapping whose upstream, remote or credentials change on reload is another mapping: tokens
        issued for the old one (which may wrap an upstream token of the old upstream) are refused.
        """
        parts = (self.key, self.upstream.origin, self.remote, self.auth or "", ",".join(self.hosts))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]

    def upstream_name(self, local_name: str) -> str:
        """The upstream repository name for a local name that this mapping matched."""
        return self.upstream_name_of(local_name.split("/")[len(self.prefix) :])

    def upstream_name_of(self, rest: list[str]) -> str:
        """The upstream repository name for the segments of a name below the key (all of them for
        the root key, and for a name asked for with `?ns=` of a registry this mapping mirrors)."""
        parts = ([self.remote] if self.remote else []) + rest
        name = "/".join(parts)
        if self.upstream.dockerhub and "/" not in name:
            name = f"library/{name}"
        return name

    def serves_host(self, host: str | None) -> bool:
        """Whether this mapping answers requests for the given Host (hostname[:port])."""
        if not self.hosts:
            return True
        if host is None:
            return False
        host = host.lower()
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return host in self.hosts or hostname in self.hosts


@dataclass(frozen=True)
class Config:
    listen_addr: str
    port: int
    secretkeys: tuple[bytes, ...] = field(repr=False)
    generated_key: bool
    public_url: str | None
    mappings: tuple[Mapping, ...]
    token_ttl: int = 300
    refresh_ttl: int = 7 * 24 * 3600
    upstream_timeout: float = 30.0
    # Forward proxies for the proxy's own connections (HTTPS_PROXY, HTTP_PROXY, NO_PROXY).
    egress: Egress = field(default_factory=Egress)
    # The store every mapping's trust starts from (None: not resolved, e.g. a Config built by hand).
    trust_store: DefaultStore | None = None
    # `limits:`, `redis_url` and `trusted_proxies` (limits.py).
    limits: LimitSettings = field(default_factory=LimitSettings)

    @property
    def domains(self) -> frozenset[str]:
        """Every host name the configuration names (public_url and all `hosts:`)."""
        names = {h for m in self.mappings for h in m.hosts}
        if self.public_url:
            names.add(urlsplit(self.public_url).netloc.lower())
        return frozenset(names)


_TOP_KEYS = {
    "listen_addr",
    "port",
    "listen_port",
    "secretkey",
    "secret_key",
    "secretkeys",
    "public_url",
    "proxy_fqdn",
    "proxies",
    "token_ttl",
    "refresh_ttl",
    "upstream_timeout",
    "ca_file",
    "limits",
    "redis_url",
    "trusted_proxies",
}
_MAPPING_KEYS = {
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
}


def load_file(path: str | os.PathLike[str], environ: AnyMapping[str, str] | None = None) -> Config:
    """Read and validate a configuration file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {os.fspath(path)}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {os.fspath(path)}: not UTF-8 text") from None
    return loads(text, environ, base_dir=Path(path).resolve().parent)


def loads(
    text: str, environ: AnyMapping[str, str] | None = None, base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Parse and validate configuration text (relative `ca_file` paths are relative to `base_dir`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if getattr(e, "context", None) == "while scanning an alias":
            where += ' (a key or value starting with * must be quoted, as the root key "*")'
        raise ConfigError(f"config: not valid YAML{where}") from None
    return parse(data, os.environ if environ is None else environ, base_dir)


def parse(data: Any, environ: AnyMapping[str, str], base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate an already-parsed YAML document.

    `environ` gives password_env variables, the secret key fallbacks, the forward proxy
    (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and the system CA store's location (SSL_CERT_FILE,
    SSL_CERT_DIR). Relative `ca_file` paths are relative to `base_dir` (the config file's
    directory when loaded from a file), else to the working directory.
    """
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of keys to values")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{_show(key)}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    _exclusive(data, "port", "listen_port")
    _exclusive(data, "secretkey", "secret_key", "secretkeys")
    _exclusive(data, "public_url", "proxy_fqdn")

    listen_addr = data.get("listen_addr", "0.0.0.0")
    if not isinstance(listen_addr, str):
        raise ConfigError("listen_addr: must be an IP address or host name")
    listen_addr = listen_addr.strip()
    try:
        ipaddress.ip_address(listen_addr)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(listen_addr.lower()):
            raise ConfigError("listen_addr: must be an IP address or host name") from None
    port_key = "listen_port" if "listen_port" in data else "port"
    port = _int(data, port_key, 5000, 0, 65535)

    keys, generated = _secret_keys(data, environ)
    public_url = _public_url(data)
    token_ttl = _int(data, "token_ttl", 300, 60, 86400)
    refresh_ttl = _int(data, "refresh_ttl", 7 * 24 * 3600, 60, 365 * 24 * 3600)
    timeout = data.get("upstream_timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 600:
        raise ConfigError("upstream_timeout: must be a number of seconds between 1 and 600")

    try:
        egress = Egress.from_environ(environ)
    except EgressError as e:
        raise ConfigError(str(e)) from None
    try:
        store = default_store(environ)
    except TrustError as e:
        raise ConfigError(str(e)) from None
    base = Path(base_dir) if base_dir is not None else None
    top_ca = _ca_file(data, "ca_file", base)
    default_trust = _TrustChoice(
        Trust(True, top_ca[0], top_ca[1], store) if top_ca else Trust(store=store), "ca_file" if top_ca else None
    )

    proxies = data.get("proxies")
    if not isinstance(proxies, dict) or not proxies:
        raise ConfigError("proxies: must be a non-empty mapping of local names to upstreams")
    chosen = [_mapping(k, v, environ, default_trust, base) for k, v in proxies.items()]
    mappings = tuple(m for m, _ in chosen)
    _check_collisions(mappings)
    _check_mirrors(mappings)
    _check_shared_upstreams(chosen)
    try:
        limits = parse_settings(data)
    except LimitsError as e:
        raise ConfigError(str(e)) from None
    return Config(
        listen_addr=listen_addr,
        port=port,
        secretkeys=keys,
        generated_key=generated,
        public_url=public_url,
        mappings=mappings,
        token_ttl=token_ttl,
        refresh_ttl=refresh_ttl,
        upstream_timeout=float(timeout),
        egress=egress,
        trust_store=store,
        limits=limits,
    )


def _show(key: object) -> str:
    """A key for an error message, shortened and with capability keys hidden."""
    text = str(key).encode("unicode_escape").decode("ascii")
    text = "/".join("<capability>" if looks_like_capability(s) else s for s in text.split("/"))
    return text if len(text) <= 80 else text[:77] + "..."


def _exclusive(data: dict[str, Any], *keys: str) -> None:
    present = [k for k in keys if k in data]
    if len(present) > 1:
        raise ConfigError(f"{present[1]}: conflicts with {present[0]} (they are spellings of one setting)")


def _int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer from {low} to {high}")
    return value


def parse_secret_key(value: object, key: str) -> bytes:
    """A secret key: 32 bytes as 64 hex digits. The message never shows the value."""
    if isinstance(value, int | float):
        raise ConfigError(f"{key}: YAML read it as a number; quote it (64 hex digits as a string)")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be 64 hex digits (32 bytes); generate one with ./run.sh keygen")
    text = value.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{key}: is not hex; it must be 64 hex digits (32 bytes)") from None
    if len(raw) != 32:
        raise ConfigError(f"{key}: must be 32 bytes (64 hex digits), got {len(raw)} bytes")
    return raw


def _secret_keys(data: dict[str, Any], environ: AnyMapping[str, str]) -> tuple[tuple[bytes, ...], bool]:
    if "secretkeys" in data:
        values = data["secretkeys"]
        if not isinstance(values, list) or not values:
            raise ConfigError("secretkeys: must be a non-empty list of 64-hex-digit keys")
        keys = tuple(parse_secret_key(v, f"secretkeys[{i}]") for i, v in enumerate(values))
        return keys, False
    for name in ("secretkey", "secret_key"):
        if name in data and data[name] not in (None, ""):
            return (parse_secret_key(data[name], name),), False
    if environ.get(SECRET_KEY_ENV):
        # A comma-separated list is allowed, as in `secretkeys:` (the first encrypts).
        values = [v.strip() for v in environ[SECRET_KEY_ENV].split(",") if v.strip()]
        return tuple(parse_secret_key(v, SECRET_KEY_ENV) for v in values), False
    if environ.get(SECRET_KEY_FILE_ENV):
        # A mounted file (a Kubernetes Secret, a Docker secret): one key a line, the first encrypts.
        path = environ[SECRET_KEY_FILE_ENV]
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{SECRET_KEY_FILE_ENV}: cannot read the key file ({type(e).__name__})") from None
        lines = [v.strip() for v in text.splitlines() if v.strip() and not v.strip().startswith("#")]
        if not lines:
            raise ConfigError(f"{SECRET_KEY_FILE_ENV}: the key file holds no key")
        return tuple(parse_secret_key(v, SECRET_KEY_FILE_ENV) for v in lines), False
    return (secrets.token_bytes(32),), True


def _public_url(data: dict[str, Any]) -> str | None:
    if "proxy_fqdn" in data:
        value = data["proxy_fqdn"]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("proxy_fqdn: must be a host name such as reg.example.com")
        value = value.strip()
        url = value if "://" in value else f"https://{value}"
        key = "proxy_fqdn"
    elif data.get("public_url") is not None:
        url, key = data["public_url"], "public_url"
        if not isinstance(url, str):
            raise ConfigError("public_url: must be an http(s) URL such as https://reg.example.com")
    else:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{key}: must be an http(s) URL such as https://reg.example.com")
    if parts.username or parts.password or parts.path not in ("", "/"):
        raise ConfigError(f"{key}: must be a scheme and host only, without a path or user")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{key}: has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc.lower()}"


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
        if not _HOSTNAME_RE.fullmatch(host):
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
        if not _HOSTNAME_RE.fullmatch(host):
            return None
        shown, has_port = host, bool(colon)
    if has_port and not (_PORT_RE.fullmatch(port) and int(port) <= 65535):
        return None
    if not has_port and host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB_NS
    return f"{shown}:{port}" if has_port else shown


@dataclass(frozen=True)
class _TrustChoice:
    """A mapping's trust and the key that decided it (None: the default store, nothing configured)."""

    trust: Trust
    key: str | None


def _ca_file(data: dict[str, Any], where: str, base: Path | None) -> tuple[str, bytes] | None:
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


def _trust(
    value: dict[str, Any], where: str, upstream: Upstream, default: _TrustChoice, base: Path | None
) -> _TrustChoice:
    verify = value.get("tls_verify", True)
    if not isinstance(verify, bool):
        raise ConfigError(f"{where}.tls_verify: must be true or false")
    own_ca = _ca_file(value, f"{where}.ca_file", base)
    if upstream.scheme != "https":
        if own_ca is not None:
            raise ConfigError(f"{where}.ca_file: the registry is plain http; ca_file applies to https registries")
        if not verify:
            raise ConfigError(f"{where}.tls_verify: the registry is plain http; tls_verify applies to https registries")
        return default
    if not verify:
        if own_ca is not None:
            raise ConfigError(f"{where}.ca_file: conflicts with tls_verify: false (nothing would be verified)")
        return _TrustChoice(Trust(False, store=default.trust.store), f"{where}.tls_verify")
    if own_ca is not None:
        return _TrustChoice(Trust(True, own_ca[0], own_ca[1], default.trust.store), f"{where}.ca_file")
    return default


def _check_shared_upstreams(chosen: list[tuple[Mapping, _TrustChoice]]) -> None:
    """Mappings of one https upstream must trust it the same way.

    mitmproxy reuses an upstream connection for the next request of the same client connection,
    whichever mapping that request is for, and the upstream's auth discovery is cached per
    upstream: a connection verified for one mapping must be good enough for every other.
    """
    first: dict[str, tuple[Mapping, _TrustChoice]] = {}
    for m, choice in chosen:
        if m.upstream.scheme != "https":
            continue
        seen = first.setdefault(m.upstream.origin, (m, choice))
        other, other_choice = seen
        if other is m or choice.trust.same_as(other_choice.trust):
            continue
        mine = choice.key or f"proxies.{_show(m.key)} (default store)"
        theirs = other_choice.key or f"proxies.{_show(other.key)} (default store)"
        if choice.key == "ca_file":
            mine = f"proxies.{_show(m.key)} (top-level ca_file)"
        if other_choice.key == "ca_file":
            theirs = f"proxies.{_show(other.key)} (top-level ca_file)"
        raise ConfigError(
            f"{mine}: trusts {m.upstream.origin} differently from {theirs}; mappings of one upstream "
            "share its connections, so give them the same ca_file and tls_verify"
        )


def _mapping(
    key: object, value: object, environ: AnyMapping[str, str], default_trust: _TrustChoice, base: Path | None
) -> tuple[Mapping, _TrustChoice]:
    if not isinstance(key, str):
        raise ConfigError(f"proxies.{_show(key)}: the key must be a repository name or a namespace ending in /")
    where = f"proxies.{_show(key)}"
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
        if k not in _MAPPING_KEYS:
            raise ConfigError(f"{where}.{_show(k)}: unknown key (known: {', '.join(sorted(_MAPPING_KEYS))})")
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
        if not _HOSTNAME_RE.fullmatch(hostname) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
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
    trust = _trust(value, where, upstream, default_trust, base)
    try:
        limits = parse_limits(value["limits"], f"{where}.limits") if "limits" in value else None
    except LimitsError as e:
        raise ConfigError(str(e)) from None
    mapping = Mapping(
        key=key,
        prefix=() if root else tuple(name.split("/")),
        namespace=namespace,
        upstream=upstream,
        remote=remote,
        auth=_auth(value, where, environ),
        hosts=tuple(norm_hosts),
        capability=capability,
        trust=trust.trust,
        mirror_of=mirror_of,
        token_realms=_token_realms(value, where),
        limits=limits,
    )
    return mapping, trust


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
                f"{where}.token_realms: {_show(r)!r} must be an http(s) origin (scheme://host[:port], no path)"
            )
        if origin not in found:
            found.append(origin)
    return tuple(found)


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
            raise ConfigError(f"{where}.mirror_of: {_show(h)!r} is not a registry host[:port]")
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
                    f"proxies.{_show(m.key)}.mirror_of: {host} is already mirrored by proxies.{_show(other.key)}"
                )


def _auth(value: dict[str, Any], where: str, environ: AnyMapping[str, str]) -> str | None:
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


def _check_collisions(mappings: tuple[Mapping, ...]) -> None:
    seen: dict[tuple[str, ...], Mapping] = {}
    for m in mappings:
        other = seen.get(m.prefix)
        if other is not None:
            raise ConfigError(f"proxies.{_show(m.key)}: collides with proxies.{_show(other.key)} (same name)")
        seen[m.prefix] = m
