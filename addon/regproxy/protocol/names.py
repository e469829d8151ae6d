"""Repository names, references and registry routes (OCI distribution spec grammar).

Paths are decided on strictly: a route is recognised only when its name matches the
distribution grammar exactly. That grammar has no `%`, `\\`, empty, `.` or `..`
components, so anything percent-encoded, dotted or otherwise unnormalised is refused
before any mapping is looked at and can never leave a mapped remote prefix.

References are decided on as strictly, and answered as the OCI distribution spec's pull
workflow wants (before any token or mapping is looked at, so the answer is the same bytes
whatever repository the path names, mapped or not):
- a manifest reference that is neither a tag nor a digest of a known algorithm names no
  manifest: `404 MANIFEST_UNKNOWN` for GET and HEAD (the conformance suite asks for
  `.INVALID_MANIFEST_NAME`), the same bytes as a missing tag the upstream answers 404 to;
- a blob or referrers digest that is not one is `400 DIGEST_INVALID` (the spec's answer for
  referrers; distribution answers blobs the same way).
A digest is accepted only in the exact form of its algorithm (lower-case hex of the hash's
length), so nothing malformed reaches an upstream: distribution 2.8 answers 500 to a
manifest request for `sha256:<not 64 hex>` or an algorithm it does not know.
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
# The digest algorithms content can be addressed by, each with the exact length of its lower-case
# hex: those the OCI image spec registers (sha256, sha512, blake3) and sha384, which distribution
# accepts too. Anything else names no content, here or upstream.
DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128, "blake3": 64}
DIGEST_RE = re.compile("|".join(f"{alg}:[0-9a-f]{{{n}}}" for alg, n in DIGEST_ALGORITHMS.items()))
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
    return DIGEST_RE.fullmatch(ref) is not None


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

    Raises `RegistryError` for anything that is not a well-formed registry route: 404 for
    unknown paths, 400 NAME_INVALID for a name that breaks the grammar, 404 MANIFEST_UNKNOWN
    for a manifest reference that is neither a tag nor a digest, 400 DIGEST_INVALID for a blob
    or referrers digest that is not one.
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
            # No manifest has such a reference: the answer to a missing one, byte for byte.
            raise RegistryError(404, "MANIFEST_UNKNOWN")
        if kind is RouteKind.UPLOAD and not _UPLOAD_ID_RE.fullmatch(ref):
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN")
        if kind in (RouteKind.BLOB, RouteKind.REFERRERS) and not is_valid_digest(ref):
            raise RegistryError(400, "DIGEST_INVALID", "invalid digest")
        return Route(kind, name, ref, m["suffix"])
    raise RegistryError(404, "NAME_UNKNOWN", "not a registry API path")
