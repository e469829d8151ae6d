"""Configuration: load, validate and normalise the YAML file.

The original project's format keeps working (`listen_addr`, `port`, `secretkey`,
`proxies` with `registry`, `remote`, `auth`), as do its later spellings
(`listen_port`, `secret_key`, `proxy_fqdn`). Validation is strict: any problem raises
`ConfigError` with one line that names the key and never echoes a secret.

This module reads the top level (listen address, keys, public URL, lifetimes, the default trust,
limits, the cache); the package's front door (`regproxy.config`) is where the rest of the addon imports the
configuration from. The forward proxy for the proxy's own connections is read from the environment
(`transport.egress`) into `Config.egress`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..cache.settings import CacheSettingsError, parse_cache
from ..limits.settings import LimitsError, parse_settings
from ..links import LINK_ID_RE, DurationError, parse_duration
from ..transport.egress import Egress, EgressError
from ..transport.trust import Trust, TrustError, default_store
from .mappings import parse_proxies
from .model import (
    DEFAULT_LINK_MAX_AGE,
    HOSTNAME_RE,
    Config,
    ConfigError,
    show_key,
)
from .registry import TrustChoice, ca_file_setting

SECRET_KEY_ENV = "REGISTRYPROXY_SECRETKEY"
SECRET_KEY_FILE_ENV = "REGISTRYPROXY_SECRETKEY_FILE"

TOP_KEYS = {
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
    "cache",
    "revoked_links",
    "link_max_age",
}
MAX_LINK_MAX_AGE = 3650 * 86400


def load_file(path: str | os.PathLike[str], environ: AnyMapping[str, str] | None = None) -> Config:
    """Read and validate a configuration file."""
    return loads(_read(path), environ, base_dir=Path(path).resolve().parent)


def loads(
    text: str, environ: AnyMapping[str, str] | None = None, base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Parse and validate configuration text (relative `ca_file` paths are relative to `base_dir`)."""
    return parse(_yaml(text), os.environ if environ is None else environ, base_dir)


def _read(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {os.fspath(path)}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {os.fspath(path)}: not UTF-8 text") from None


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if getattr(e, "context", None) == "while scanning an alias":
            where += ' (a key or value starting with * must be quoted, as the root key "*")'
        raise ConfigError(f"config: not valid YAML{where}") from None


@dataclass(frozen=True)
class LinkSettings:
    """What `./run.sh link` reads of a configuration (run/link_command.py): the secret keys, the mappings'
    keys as the file writes them, `link_max_age` and `public_url`."""

    secretkeys: tuple[bytes, ...] = field(repr=False)
    generated_key: bool
    mapping_keys: tuple[str, ...]
    link_max_age: int
    public_url: str | None


def link_settings(path: str | os.PathLike[str], environ: AnyMapping[str, str] | None = None) -> LinkSettings:
    """The settings a share link is minted from, read as `parse` reads them (the secret key from the file,
    else `$REGISTRYPROXY_SECRETKEY` or `$REGISTRYPROXY_SECRETKEY_FILE`) and nothing else: no credential,
    trust or cache setting is read, so minting needs none of the proxy's environment."""
    data = _yaml(_read(path))
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of keys to values")
    _exclusive(data, "secretkey", "secret_key", "secretkeys")
    _exclusive(data, "public_url", "proxy_fqdn")
    keys, generated = _secret_keys(data, os.environ if environ is None else environ)
    proxies = data.get("proxies")
    if not isinstance(proxies, dict) or not proxies:
        raise ConfigError("proxies: must be a non-empty mapping of local names to upstreams")
    names = tuple(k for k in proxies if isinstance(k, str))
    return LinkSettings(keys, generated, names, _link_max_age(data), _public_url(data))


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
        if key not in TOP_KEYS:
            raise ConfigError(f"{show_key(key)}: unknown key (known: {', '.join(sorted(TOP_KEYS))})")
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
        if not HOSTNAME_RE.fullmatch(listen_addr.lower()):
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
    top_ca = ca_file_setting(data, "ca_file", base)
    default_trust = TrustChoice(
        Trust(True, top_ca[0], top_ca[1], store) if top_ca else Trust(store=store), "ca_file" if top_ca else None
    )

    proxies = data.get("proxies")
    if not isinstance(proxies, dict) or not proxies:
        raise ConfigError("proxies: must be a non-empty mapping of local names to upstreams")
    mappings = parse_proxies(proxies, environ, default_trust, base)
    try:
        limits = parse_settings(data)
    except LimitsError as e:
        raise ConfigError(str(e)) from None
    try:
        cache = parse_cache(data.get("cache"), environ, base)
    except CacheSettingsError as e:
        raise ConfigError(str(e)) from None
    for m in mappings:
        if m.policy.digests_resolved and (cache is None or not m.cache):
            raise ConfigError(
                f"proxies.{show_key(m.key)}.digests: resolved needs the cache (a cache: section, and the mapping"
                " not cache: false): the record of resolved digests is kept in its store"
            )
    revoked_links = _revoked_links(data.get("revoked_links"))
    link_max_age = _link_max_age(data)
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
        cache=cache,
        revoked_links=revoked_links,
        link_max_age=link_max_age,
    )


def _link_max_age(data: dict[str, Any]) -> int:
    """`link_max_age`: the longest `--expires` of `./run.sh link`, in seconds."""
    try:
        seconds = parse_duration(data.get("link_max_age", DEFAULT_LINK_MAX_AGE), "link_max_age")
    except DurationError as e:
        raise ConfigError(str(e)) from None
    if seconds > MAX_LINK_MAX_AGE:
        raise ConfigError("link_max_age: must be at most 3650d (ten years)")
    return seconds


def _revoked_links(value: object) -> frozenset[str]:
    """`revoked_links`: the ids of share links that no longer work (as `./run.sh link` prints them)."""
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise ConfigError("revoked_links: must be a list of link ids (as ./run.sh link prints them)")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not LINK_ID_RE.fullmatch(item.strip()):
            raise ConfigError(
                f"revoked_links[{i}]: not a link id (16 characters a-z and 2-7, as ./run.sh link prints it)"
            )
    return frozenset(item.strip() for item in value)


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
