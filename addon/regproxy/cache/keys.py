"""Where everything lives in the store, and which mapping may see it.

Content is stored once by digest (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`); whether a mapping
may be answered from it is a link, written when content came through that mapping from that upstream
repository (distribution's repository links are the model): `links/<link id>/sha256/<hex>`. Tags are
records per link id too: `tags/<link id>/<tag>`, and so are the digests a mapping's policy admits under
`digests: resolved` (policy/): `admitted/<link id>/sha256/<hex>`, written when the cache resolves or stores
a manifest of an admitted tag, or one an admitted index lists. A link id is a hash of the mapping's key, its
upstream's origin and the upstream repository, so it is the same on every replica, and never shows a
capability key (the key is hashed with a fixed label).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
LABEL = b"registryproxy cache link v1\0"


def parse_digest(reference: str) -> str | None:
    """The hex of a `sha256:` digest the cache can verify; None for a tag or another algorithm."""
    m = DIGEST_RE.fullmatch(reference)
    return m.group(1) if m else None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def link_id(mapping_key: str, upstream_origin: str, upstream_repository: str) -> str:
    """The link id of an upstream repository as one mapping reaches it."""
    h = hashlib.sha256(LABEL)
    for part in (mapping_key, upstream_origin, upstream_repository):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def blob_key(hex_digest: str) -> str:
    return f"blobs/sha256/{hex_digest}"


def manifest_key(hex_digest: str) -> str:
    return f"manifests/sha256/{hex_digest}"


def link_key(link: str, hex_digest: str) -> str:
    return f"links/{link}/sha256/{hex_digest}"


def tag_key(link: str, tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise ValueError("not a tag")
    return f"tags/{link}/{tag}"


def admitted_key(link: str, hex_digest: str) -> str:
    return f"admitted/{link}/sha256/{hex_digest}"


def content_hex(key: str) -> str | None:
    """The digest's hex of a content key (`blobs/...` or `manifests/...`), else None."""
    for prefix in ("blobs/sha256/", "manifests/sha256/"):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            return rest if re.fullmatch(r"[0-9a-f]{64}", rest) else None
    return None


@dataclass(frozen=True)
class Link:
    """A link record: the content is reachable through this link id, as this media type and size."""

    kind: str  # "blob" or "manifest"
    media_type: str
    size: int

    def dump(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @staticmethod
    def load(data: bytes) -> Link | None:
        try:
            d = json.loads(data)
            link = Link(str(d["kind"]), str(d["media_type"]), int(d["size"]))
        except (ValueError, KeyError, TypeError):
            return None
        return link if link.kind in ("blob", "manifest") and link.size >= 0 else None


@dataclass(frozen=True)
class TagRecord:
    """What a tag pointed at, and when the upstream last said so (epoch seconds)."""

    digest: str  # "sha256:<hex>"
    media_type: str
    size: int
    checked: float

    def dump(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @staticmethod
    def load(data: bytes) -> TagRecord | None:
        try:
            d = json.loads(data)
            rec = TagRecord(str(d["digest"]), str(d["media_type"]), int(d["size"]), float(d["checked"]))
        except (ValueError, KeyError, TypeError):
            return None
        return rec if parse_digest(rec.digest) is not None else None


@dataclass(frozen=True)
class AdmittedRecord:
    """A digest admitted under `digests: resolved`: the tag it was resolved from (for a manifest an admitted
    index lists, or a blob an admitted manifest lists, the tag that admitted the top), and when."""

    tag: str
    at: float

    def dump(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @staticmethod
    def load(data: bytes) -> AdmittedRecord | None:
        try:
            d = json.loads(data)
            rec = AdmittedRecord(str(d["tag"]), float(d["at"]))
        except (ValueError, KeyError, TypeError):
            return None
        return rec if TAG_RE.fullmatch(rec.tag) else None
