"""Which forward proxy, if any, the proxy's own outgoing connections go through.

Decided from the environment, as for curl, docker and containerd: `HTTPS_PROXY` for https
upstreams and token realms, `HTTP_PROXY` for plain-http ones, `NO_PROXY` for the exceptions
(upper or lower case; when both spellings are set they must agree). `ALL_PROXY` and SOCKS
proxies are not supported. Loopback (`localhost`, `127.0.0.0/8`, `::1`) is never proxied, as in
Go's clients: a forward proxy's own loopback is never what was meant.

`NO_PROXY` is a comma-separated list of: `*` (no proxy at all); host names, each matching itself
and its subdomains (a leading `.` or `*.` is ignored); `host:port` (that port only); IP addresses;
CIDR ranges (`10.0.0.0/8`, `fd00::/8`).

`proxy_for(url)` is the one decision both the token client (`upstream/client.py`, httpx) and mitmproxy's
own upstream connections use. No mitmproxy import.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

PROXY_VARIABLES = {"https": ("HTTPS_PROXY", "https_proxy"), "http": ("HTTP_PROXY", "http_proxy")}
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
_NAME_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,252})")


class EgressError(ValueError):
    """An unusable proxy setting, as one line naming the variable (never its credentials)."""


@dataclass(frozen=True)
class ProxySpec:
    """A forward proxy. `str()` and `repr()` never show its credentials."""

    scheme: str  # "http" (plain connection to the proxy) or "https" (TLS to the proxy)
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (for logs, and for clients given auth separately)."""
        return f"{self.scheme}://{self.netloc}"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def authorization(self) -> str | None:
        """The `Proxy-Authorization` value (Basic), or None without credentials."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __str__(self) -> str:
        return self.url


def parse_proxy_url(value: str, where: str) -> ProxySpec:
    """`[http|https://][user:password@]host[:port][/]`; the message names `where`, never the value."""
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise EgressError(f"{where}: not a proxy URL (http://host:port)") from None
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise EgressError(f"{where}: SOCKS proxies are not supported (use an http:// or https:// proxy)")
    if scheme not in ("http", "https"):
        raise EgressError(f"{where}: the proxy's scheme must be http or https")
    host = (parts.hostname or "").lower()
    if not host or any(c in host for c in " \t\r\n/\\@"):
        raise EgressError(f"{where}: names no proxy host (http://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressError(f"{where}: a proxy URL has no path or query (http://host:port)")
    if port == 0:
        raise EgressError(f"{where}: port 0 is not a port to connect to")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if any(c in (username or "") + (password or "") for c in "\r\n\0"):
        raise EgressError(f"{where}: the proxy credentials hold control characters")
    return ProxySpec(scheme, host, port or (443 if scheme == "https" else 80), username, password)


@dataclass(frozen=True)
class Egress:
    """The forward proxies for https and http destinations, and the destinations that bypass them."""

    https: ProxySpec | None = None
    http: ProxySpec | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Egress:
        """Read HTTPS_PROXY, HTTP_PROXY and NO_PROXY (either case). Raises EgressError."""
        proxies: dict[str, ProxySpec | None] = {}
        for scheme, names in PROXY_VARIABLES.items():
            value, name = _one_of(environ, names)
            proxies[scheme] = parse_proxy_url(value, name) if value else None
        no_proxy, name = _one_of(environ, NO_PROXY_VARIABLES)
        entries = tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip())
        for entry in entries:
            if not _valid_entry(entry):
                raise EgressError(f"{name}: {entry[:60]!r} is not a host name, host:port, address or CIDR range")
        return cls(proxies["https"], proxies["http"], entries)

    def proxy_for(self, url: str) -> ProxySpec | None:
        """The proxy to reach `url` through, or None to connect directly."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        host = (parts.hostname or "").lower().rstrip(".")
        if proxy is None or not host or _loopback(host):
            return None
        if bypassed(host, port or (443 if scheme == "https" else 80), self.no_proxy):
            return None
        return proxy

    @property
    def configured(self) -> bool:
        return self.https is not None or self.http is not None


def proxy_for(url: str, egress: Egress | None = None) -> ProxySpec | None:
    """The forward proxy for a connection to `url` (None: direct), from `egress` or the environment."""
    return (egress if egress is not None else Egress.from_environ(os.environ)).proxy_for(url)


def bypassed(host: str, port: int, no_proxy: tuple[str, ...]) -> bool:
    """Whether NO_PROXY-style `no_proxy` entries exempt `host`:`port` from the proxy."""
    addr = _address(host)
    for entry in no_proxy:
        if entry == "*":
            return True
        network = _network(entry)
        if network is not None:
            if addr is not None and addr.version == network.version and addr in network:
                return True
            continue
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if not name:
            continue
        if addr is not None:
            entry_addr = _address(name)
            if entry_addr is not None and entry_addr == addr:
                return True
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def _valid_entry(entry: str) -> bool:
    if entry == "*" or _network(entry) is not None:
        return True
    name, port = _split_port(entry)
    if port is None and ":" in entry and _address(entry) is None:
        return False  # host:notaport
    if port is not None and not 0 < port < 65536:
        return False
    name = name.removeprefix("*").lstrip(".").rstrip(".")
    return bool(name) and (_address(name) is not None or _NAME_RE.fullmatch(name) is not None)


def _one_of(environ: Mapping[str, str], names: tuple[str, str]) -> tuple[str, str]:
    """The value of the one set of an upper- and a lower-case variable (empty if neither)."""
    upper, lower = names
    a, b = environ.get(upper, "").strip(), environ.get(lower, "").strip()
    if a and b and a != b:
        raise EgressError(f"{lower}: differs from {upper}; set one of them, or both to the same value")
    return (a or b), (upper if a else lower)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if "/" not in entry:
        return None
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    addr = _address(host)
    return addr is not None and addr.is_loopback
