"""Which mapping serves a local repository name: one matcher for routes and token scopes.

The longest key wins, compared by whole path segments (`bp/` never matches `bpx/app`).
A namespace key (`bp/`) matches every repository below it, a repository key
(`0ebb…/nginx`) exactly that repository. Mappings restricted with `hosts:` only match
requests for those domains.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Mapping
from .names import looks_like_capability


@dataclass(frozen=True)
class Match:
    mapping: Mapping
    local_name: str
    upstream_name: str

    @property
    def log_name(self) -> str:
        """The local name with capability keys replaced by the mapping's label."""
        if not self.mapping.capability:
            return self.local_name
        rest = self.local_name.split("/")[len(self.mapping.prefix) :]
        return "/".join([f"<{self.mapping.label}>", *rest])


class Matcher:
    def __init__(self, mappings: tuple[Mapping, ...]) -> None:
        self._by_prefix: dict[tuple[tuple[str, ...], bool], Mapping] = {(m.prefix, m.namespace): m for m in mappings}
        self._longest = max((len(m.prefix) for m in mappings), default=0)

    def match(self, name: str, host: str | None) -> Match | None:
        """The mapping for a valid repository name on the given Host, or None."""
        segments = tuple(name.split("/"))
        for n in range(min(len(segments), self._longest), 0, -1):
            mapping = self._by_prefix.get((segments[:n], n < len(segments)))
            if mapping is not None and mapping.serves_host(host):
                return Match(mapping, name, mapping.upstream_name(name))
        return None


def redact_name(name: str) -> str:
    """A name for logs when no mapping matched: capability-like segments hidden."""
    return "/".join("<capability?>" if looks_like_capability(s) else s for s in name.split("/"))
