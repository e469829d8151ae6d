"""Which mapping serves a local repository name: one matcher for routes and token scopes.

The longest key wins, compared by whole path segments (`bp/` never matches `bpx/app`).
A namespace key (`bp/`) matches every repository below it, a repository key
(`0ebb…/nginx`) exactly that repository, and the root key (`*`) every name no other key
matches. Mappings restricted with `hosts:` only match requests for those domains.

Mirror mode (a configuration with the root key or `mirror_of`): a name asked for with
containerd's `?ns=HOST` is served by the mapping whose `mirror_of` lists HOST, as if it were that
mapping's root (the whole name goes below its remote), and by no other: an unknown HOST matches
nothing. Without mirror mode `?ns=` is ignored, as it always was.

A capability key's secret segments (and share links) are never sent upstream as part of a repository name: a
name that holds one below the key that matched it (`<key>/typo` falling to the root mapping,
or any name asked for with `?ns=`) matches nothing, as an unknown name.

Share links (links/): a name whose first segment has a link's shape is resolved through the
`LinkBook` and nothing else: a genuine link of a namespace mapping serves `LINK/REST` as the mapping
serves `KEY/REST`, one of a repository mapping serves `LINK/<the key's last segment>` only. The
`Match` then names the link (`link`: id, expiry, state), also when it has expired or was revoked,
for the caller to refuse; a segment that is not a genuine link matches nothing, as an unknown name
(never the root mapping: it is not sent upstream). The router and the token endpoint both ask here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Mapping, mirror_host
from ..links import LinkBook, LinkUse, looks_like_link
from ..policy import spellings
from ..protocol.names import looks_like_capability


@dataclass(frozen=True)
class Match:
    mapping: Mapping
    local_name: str
    upstream_name: str
    # The share link the name came through (its first segment), None for a name with the key itself.
    link: LinkUse | None = None
    # The name was asked for with `?ns=` of a registry the mapping mirrors: all of it is below the key.
    mirrored: bool = False

    @property
    def key_length(self) -> int:
        """How many leading segments of `local_name` stand for the mapping's key: the link, and for a
        repository mapping the key's last segment after it; else the key's own segments."""
        if self.link is not None:
            return 1 if self.mapping.namespace else 2
        return len(self.mapping.prefix)

    @property
    def rest(self) -> str:
        """The name's segments below the mapping's key (or the link standing for it; all of them for the
        root key and for `?ns=`): what a mapping's policy decides on."""
        if self.mirrored:
            return self.local_name
        return "/".join(self.local_name.split("/")[self.key_length :])

    @property
    def log_name(self) -> str:
        """The local name with capability keys replaced by the mapping's label, a link by its id."""
        rest = self.local_name.split("/")[self.key_length :]
        if self.link is not None:
            return "/".join([f"<link:{self.link.id}>", *rest])
        if not self.mapping.capability:
            return self.local_name
        return "/".join([f"<{self.mapping.label}>", *rest])


class Matcher:
    def __init__(self, mappings: tuple[Mapping, ...], links: LinkBook | None = None) -> None:
        self._links = links
        self._by_key = {m.key: m for m in mappings}
        self._by_prefix: dict[tuple[tuple[str, ...], bool], Mapping] = {(m.prefix, m.namespace): m for m in mappings}
        self._longest = max((len(m.prefix) for m in mappings), default=0)
        self._mirrors = {host: m for m in mappings for host in m.mirror_of}
        self._secrets = frozenset(s for m in mappings if m.capability for s in m.prefix if looks_like_capability(s))
        # With a root mapping, a name meant for another registry would be served from the root's.
        self.mirror_mode = bool(self._mirrors) or ((), True) in self._by_prefix

    def match(self, name: str, host: str | None, ns: str | None = None) -> Match | None:
        """The mapping for a valid repository name on the given Host (and `?ns=` registry), or None."""
        segments = name.split("/")
        if ns is not None:
            registry = mirror_host(ns)
            mapping = self._mirrors.get(registry) if registry is not None else None
            if mapping is None or not mapping.serves_host(host) or self._holds_secret(segments):
                return None
            return Match(mapping, name, mapping.upstream_name_of(segments), mirrored=True)
        if looks_like_link(segments[0]):
            return self._through_link(name, segments, host)
        key = tuple(segments)
        # Down to 0 segments: the root key.
        for n in range(min(len(key), self._longest), -1, -1):
            mapping = self._by_prefix.get((key[:n], n < len(key)))
            if mapping is not None and mapping.serves_host(host):
                if self._holds_secret(segments[n:]):
                    return None
                return Match(mapping, name, mapping.upstream_name_of(segments[n:]))
        return None

    def _through_link(self, name: str, segments: list[str], host: str | None) -> Match | None:
        """The mapping a genuine link stands for, serving this name on this Host; else None."""
        link = self._links.resolve(segments[0]) if self._links is not None else None
        mapping = self._by_key.get(link.mapping_key) if link is not None else None
        if link is None or mapping is None or not mapping.serves_host(host):
            return None
        if mapping.namespace:
            rest = segments[1:]
            if not rest:
                return None
        elif segments[1:] != [mapping.prefix[-1]]:
            return None
        else:
            rest = []
        if self._holds_secret(rest):
            return None
        return Match(mapping, name, mapping.upstream_name_of(rest), link)

    def _holds_secret(self, segments: list[str]) -> bool:
        """Whether these segments (those that would go upstream) hold a capability key's secret segment or
        something of a share link's shape. A set lookup of whole segments: no faster for a key that is almost
        right."""
        if any(looks_like_link(s) for s in segments):
            return True
        return bool(self._secrets) and any(s in self._secrets for s in segments)


def policy_names(match: Match) -> tuple[str, ...]:
    """The spellings of the name below the key a mapping's policy decides on (policy/): with Docker Hub's
    implied `library/` (no `remote`), `busybox` and `library/busybox` are one repository."""
    mapping = match.mapping
    return spellings(match.rest, mapping.upstream.dockerhub and not mapping.remote)


def redact_name(name: str) -> str:
    """A name for logs when no mapping matched: capability-like segments hidden."""
    return "/".join("<capability?>" if looks_like_capability(s) else s for s in name.split("/"))
