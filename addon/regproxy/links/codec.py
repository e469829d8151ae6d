"""The share link's format: one path segment, `rpl1` then 64 characters of lower-case base32.

The 40 bytes under the base32 are, in order: the link id (10 random bytes; its base32, 16 characters,
is the id logs, metrics and `revoked_links` use), the expiry (5 bytes, seconds since the epoch, big
endian), the mapping reference (9 bytes: an HMAC of the mapping's key, so the link names its mapping
without carrying the key) and the tag (16 bytes: HMAC-SHA256 of the marker and everything before it,
truncated to 128 bits). Both HMACs use a key derived with HKDF-SHA256 from a secret key, for links
alone (the `info` names the purpose), so a link never reveals or reuses the key that seals tokens.

40 bytes are exactly 64 base32 characters: no padding bits, so every string has at most one meaning
and no two spellings of a link verify. The segment is in the distribution name grammar (letters and
digits only) and 68 characters long, under the 80 every client accepts in a reference; it always holds
a digit, so `protocol.names.looks_like_capability` hides it where unknown names are logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MARKER = "rpl1"
ID_BYTES = 10
EXPIRY_BYTES = 5
REF_BYTES = 9
TAG_BYTES = 16
BODY_BYTES = ID_BYTES + EXPIRY_BYTES + REF_BYTES + TAG_BYTES  # 40: a multiple of 5, no base32 padding
LINK_LENGTH = len(MARKER) + BODY_BYTES * 8 // 5  # 68
MAX_EXPIRY = 2 ** (8 * EXPIRY_BYTES) - 1
HKDF_INFO = b"registryproxy share links v1"

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
# A link's shape, as a pattern (debug/redact.py finds links in text with it).
LINK_PATTERN = rf"{MARKER}[{_B32}]{{{LINK_LENGTH - len(MARKER)}}}"
_LINK_RE = re.compile(LINK_PATTERN)
LINK_ID_RE = re.compile(rf"[{_B32}]{{{ID_BYTES * 8 // 5}}}")


@dataclass(frozen=True)
class Link:
    """What a genuine link says: its id, its expiry (seconds since the epoch) and its mapping reference."""

    id: str
    expires_at: int
    ref: bytes


class LinkKey:
    """The link key derived from one secret key: tags links and names mappings in them."""

    def __init__(self, secret: bytes) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(secret)

    def ref(self, mapping_key: str) -> bytes:
        """The reference a link carries for the mapping with this key (not the key itself)."""
        return hmac.digest(self._key, b"mapping\0" + mapping_key.encode(), hashlib.sha256)[:REF_BYTES]

    def tag(self, signed: bytes) -> bytes:
        return hmac.digest(self._key, b"tag\0" + signed, hashlib.sha256)[:TAG_BYTES]

    def open(self, body: bytes) -> Link | None:
        """The link `body` (the decoded segment) is, if this key tagged it; compared in constant time."""
        signed, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
        if not hmac.compare_digest(self.tag(MARKER.encode() + signed), tag):
            return None
        return _link(signed)


def new_link_id() -> bytes:
    return secrets.token_bytes(ID_BYTES)


def mint(secret: bytes, mapping_key: str, expires_at: int, link_id: bytes | None = None) -> tuple[str, Link]:
    """A new link for the mapping `mapping_key`, good until `expires_at`: the segment and what it says."""
    if not 0 < expires_at <= MAX_EXPIRY:
        raise ValueError("expiry out of range")
    raw_id = new_link_id() if link_id is None else link_id
    if len(raw_id) != ID_BYTES:
        raise ValueError(f"a link id is {ID_BYTES} bytes")
    key = LinkKey(secret)
    signed = raw_id + expires_at.to_bytes(EXPIRY_BYTES, "big") + key.ref(mapping_key)
    body = signed + key.tag(MARKER.encode() + signed)
    return MARKER + _b32(body), _link(signed)


def looks_like_link(segment: str) -> bool:
    """Whether a path segment has a link's shape (not whether it is genuine)."""
    return len(segment) == LINK_LENGTH and _LINK_RE.fullmatch(segment) is not None


def decode(segment: str) -> bytes | None:
    """The 40 bytes of a link-shaped segment, else None."""
    if not looks_like_link(segment):
        return None
    return base64.b32decode(segment[len(MARKER) :].upper())


def _link(signed: bytes) -> Link:
    raw_id = signed[:ID_BYTES]
    expires = int.from_bytes(signed[ID_BYTES : ID_BYTES + EXPIRY_BYTES], "big")
    return Link(_b32(raw_id), expires, signed[ID_BYTES + EXPIRY_BYTES :])


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").lower()
