"""What the cache decided for one request (`Plan`), and the answers it gives from the store.

`steps/cache.py` makes a plan in `requestheaders` and carries it out in `request`: an answer made here
(`local`), a redirect to the S3 store (`redirect`), a blob sent through the local blob server (`blob`),
or a manifest GET that goes upstream and is stored when it comes back (`fill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..protocol.errors import RegistryError
from .jobs import BlobJob
from .service import CachedManifest

__all__ = ["BLOB_TYPE", "CachedManifest", "Plan", "blob_head", "error", "manifest", "manifest_head"]

BLOB_TYPE = "application/octet-stream"


@dataclass
class Plan:
    """What `request` does with a flow `requestheaders` looked up."""

    kind: Literal["local", "redirect", "blob", "fill"]
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # a HEAD answer's Content-Length, when there is no body to measure
    job: BlobJob | None = None
    link: str = ""
    hex: str | None = None  # the digest the stored manifest must have (a digest asked for, or the tag's HEAD)
    tag: str | None = None
    served: int = 0  # bytes answered from the store


def manifest(found: CachedManifest, hex_digest: str) -> Plan:
    """A manifest from the store, byte for byte, with its media type."""
    headers = {
        "Content-Type": found.media_type,
        "Docker-Content-Digest": f"sha256:{hex_digest}",
        "ETag": f'"sha256:{hex_digest}"',
    }
    return Plan("local", 200, found.body, headers, served=len(found.body))


def manifest_head(media_type: str, hex_digest: str, size: int) -> Plan:
    """A HEAD by tag answered from the upstream's own HEAD (the manifest itself is not stored yet)."""
    headers = {"Content-Type": media_type, "Docker-Content-Digest": f"sha256:{hex_digest}"}
    return Plan("local", 200, b"", headers, length=size)


def blob_head(hex_digest: str, size: int) -> Plan:
    headers = {"Content-Type": BLOB_TYPE, "Docker-Content-Digest": f"sha256:{hex_digest}", "Accept-Ranges": "bytes"}
    return Plan("local", 200, b"", headers, length=size)


def error(err: RegistryError, headers: dict[str, str] | None = None) -> Plan:
    """A registry error, in the JSON format (the answer's Content-Type is the error's by default)."""
    return Plan("local", err.status, err.body(), dict(headers or {}))
