"""The configuration's model: what `config.parse` returns, and the pieces its parsers share.

`Config` is the whole file, `Mapping` one entry of `proxies`, `Upstream` the registry it reads from;
all frozen. `ConfigError` is the one exception a bad file raises (one line naming the key);
`show_key` is how every message names a key (shortened, capability keys hidden).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..cache.settings import CacheSettings
from ..limits.settings import LimitSettings, Rules
from ..policy import Policy
from ..protocol.names import looks_like_capability
from ..transport.egress import Egress
from ..transport.trust import DefaultStore, Trust

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DOCKER_HUB_NS = "docker.io"  # how containerd names Docker Hub in `?ns=`
DEFAULT_LINK_MAX_AGE = 90 * 86400  # `link_max_age`: the longest expiry `./run.sh link` mints (seconds)
ROOT_KEY = "*"  # the mapping key of the root namespace: every name no other key matches

HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


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
    # How the upstream (and its token realm) is verified: ca_file, tls_verify (see transport/trust.py).
    trust: Trust = field(default_factory=Trust)
    # Registry hosts (normalised by `mirror_host`) whose `?ns=HOST` requests this mapping serves.
    mirror_of: tuple[str, ...] = ()
    # Token realm origins (`scheme://host:port`) the operator allows beyond upstream_auth.realm_allowed's policy.
    token_realms: tuple[str, ...] = ()
    # This mapping's own `limits:` (limits/settings.py): the keys it names replace the top-level ones.
    limits: Rules | None = None
    # `cache: false` opts the mapping out of the pull-through cache (`cache:` at the top, cache/settings.py).
    cache: bool = True
    # `allow`, `deny` and `digests` (policy/): what the mapping serves; the default admits everything.
    policy: Policy = field(default_factory=Policy)

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
    # `limits:`, `redis_url` and `trusted_proxies` (limits/settings.py).
    limits: LimitSettings = field(default_factory=LimitSettings)
    # `cache:` (cache/settings.py); None: no cache.
    cache: CacheSettings | None = None
    # Share links (links/): the ids of revoked ones, and the longest expiry `./run.sh link` mints (seconds).
    revoked_links: frozenset[str] = frozenset()
    link_max_age: int = DEFAULT_LINK_MAX_AGE

    @property
    def domains(self) -> frozenset[str]:
        """Every host name the configuration names (public_url and all `hosts:`)."""
        names = {h for m in self.mappings for h in m.hosts}
        if self.public_url:
            names.add(urlsplit(self.public_url).netloc.lower())
        return frozenset(names)


def show_key(key: object) -> str:
    """A key for an error message, shortened and with capability keys hidden."""
    text = str(key).encode("unicode_escape").decode("ascii")
    text = "/".join("<capability>" if looks_like_capability(s) else s for s in text.split("/"))
    return text if len(text) <= 80 else text[:77] + "..."
