"""The record of digests a mapping's policy admits under `digests: resolved` (policy/), in the store.

A digest is admitted when the cache resolved it from an admitted tag (a tag's HEAD or GET), or when an
admitted manifest lists it: an index its manifests, an image manifest its config and layers (so the blobs
of an admitted image are admitted, and no others). A referrer's `subject` is never admitted by the
referrer: a signature does not admit what it signs. Records live beside the tag records
(`admitted/<link id>/sha256/<hex>`, cache/keys.py), so they survive a restart and replicas sharing a store
share them. `listed` reads what a manifest lists; `CacheService.admit` writes the records.
"""

from __future__ import annotations

import json

from .keys import parse_digest

MAX_LISTED = 10_000


def listed(body: bytes | None) -> list[str]:
    """The sha256 digests (hex) a manifest or index lists: `manifests`, `config`, `layers` and `blobs`."""
    if not body:
        return []
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    entries: list[object] = [data.get("config")]
    for key in ("manifests", "layers", "blobs"):
        value = data.get(key)
        if isinstance(value, list):
            entries.extend(value[:MAX_LISTED])
    found: dict[str, None] = {}
    for entry in entries:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        hex_digest = parse_digest(digest) if isinstance(digest, str) else None
        if hex_digest is not None:
            found[hex_digest] = None
    return list(found)[:MAX_LISTED]
