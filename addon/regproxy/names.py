"""Repository names, references and registry routes (OCI distribution spec grammar).

Paths are decided on strictly: a route is recognised only when its name matches the
distribution grammar exactly. That grammar has no `%`, `\\`, empty, `.` or `..`
components, so anything percent-encoded, dotted or otherwise unnormalised is refused
before any mapping is looked at and can never leave a mapped remote prefix.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import RegistryError

# One path component: lower-case alphanumerics joined by ".", "_", "__" or runs of "-".
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
MAX_NAME_LENGTH = 255

# A capability key: a UUID, or a long run of lower-case letters and digits with digits in it.
_CAPABILITY_RE = re.compile(
    r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|(?=[a-z0-9]*[0-9])[a-z0-9]{20,}",
    re.IGNORECASE,
)
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_=-]*")


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def is_valid_reference(ref: str) -> bool:
    return TAG_RE.fullmatch(ref) is not None or is_valid_digest(ref)


def is_valid_digest(ref: str) -> bool:
    return len(ref) <= 256 and DIGEST_RE.fullmatch(ref) is not None


def looks_like_capability(segment: str) -> bool:
    """True for a path segment that looks like an unguessable capability key."""
    return _CAPABILITY_RE.fullmatch(segment) is not None


class RouteKind(enum.StrEnum):
    PING = "ping"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD = "upload"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True)
class Route:
    """A recognised registry API route. `suffix` is the path after the name, e.g. `/manifests/v1`."""

    kind: RouteKind
    name: str = ""
    reference: str = ""
    suffix: str = ""

    @property
    def is_repository(self) -> bool:
        return bool(self.name)


_REPO_ROUTES: list[tuple[RouteKind, re.Pattern[str]]] = [
    (RouteKind.UPLOAD, re.compile(r"/v2/(?P<name>.+?)(?P<suffix>/blobs/uploads(?:/(?P<ref>[^/]*))?)")),
    (RouteKind.MANIFEST, re.compile(r"/v2/(?P<name>.+)(?P<suffix>/manifests/(?P<ref>[^/]+))")),
    (RouteKind.BLOB, re.compile(r"/v2/(?P<name>.+)(?P<suffix>/blobs/(?P<ref>[^/]+))")),
    (RouteKind.TAGS, re.compile(r"/v2/(?P<name>.+)(?P<suffix>/tags/list)")),
    (RouteKind.REFERRERS, re.compile(r"/v2/(?P<name>.+)(?P<suffix>/referrers/(?P<ref>[^/]+))")),
]

_SAFE_PATH = re.compile(r"/[A-Za-z0-9._:/=+-]*")


def parse_route(path: str) -> Route:
    """Recognise a registry API path (without its query string).

    Raises `RegistryError` for anything that is not a well-formed registry route:
    404 for unknown paths, 400 for a name or reference that breaks the grammar.
    """
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.PING)
    if path == "/v2/_catalog":
        return Route(RouteKind.CATALOG)
    if not path.startswith("/v2/") or _SAFE_PATH.fullmatch(path) is None:
        raise RegistryError(404, "NAME_UNKNOWN", "not a registry API path")
    for kind, pattern in _REPO_ROUTES:
        m = pattern.fullmatch(path)
        if m is None:
            continue
        name, ref = m["name"], m.groupdict().get("ref") or ""
        if not is_valid_name(name):
            raise RegistryError(400, "NAME_INVALID")
        if kind is RouteKind.MANIFEST and not is_valid_reference(ref):
            raise RegistryError(400, "TAG_INVALID", "invalid tag or digest")
        if kind is RouteKind.UPLOAD and not _UPLOAD_ID_RE.fullmatch(ref):
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN")
        if kind in (RouteKind.BLOB, RouteKind.REFERRERS) and not is_valid_digest(ref):
            raise RegistryError(400, "DIGEST_INVALID", "invalid digest")
        return Route(kind, name, ref, m["suffix"])
    raise RegistryError(404, "NAME_UNKNOWN", "not a registry API path")
