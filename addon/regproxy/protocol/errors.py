"""The registry's JSON error format (OCI distribution spec, "Error Codes").

Every error the proxy answers, whether it decided it itself or rebuilt it from an
upstream answer, goes through `RegistryError`, so error bodies have one shape and
never carry upstream text (which can name the upstream repository).

The spec (v1.1, "Error Codes") says the code of a JSON 4xx body MUST be one of its own
(`SPEC_CODES`): the 4xx answers made here from a status alone use only those. The codes
distribution adds stay usable for 5xx answers (`UNAVAILABLE`, `UNKNOWN`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# The spec's codes with their standard messages, plus the codes distribution adds.
MESSAGES: dict[str, str] = {
    "BLOB_UNKNOWN": "blob unknown to registry",
    "BLOB_UPLOAD_INVALID": "blob upload invalid",
    "BLOB_UPLOAD_UNKNOWN": "blob upload unknown to registry",
    "DIGEST_INVALID": "provided digest did not match uploaded content",
    "MANIFEST_BLOB_UNKNOWN": "manifest references a manifest or blob unknown to registry",
    "MANIFEST_INVALID": "manifest invalid",
    "MANIFEST_UNKNOWN": "manifest unknown to registry",
    "NAME_INVALID": "invalid repository name",
    "NAME_UNKNOWN": "repository name not known to registry",
    "SIZE_INVALID": "provided length did not match content length",
    "TAG_INVALID": "manifest tag did not match URI",
    "UNAUTHORIZED": "authentication required",
    "DENIED": "requested access to the resource is denied",
    "UNSUPPORTED": "the operation is unsupported",
    "TOOMANYREQUESTS": "too many requests",
    "RANGE_INVALID": "requested range not satisfiable",
    "UNAVAILABLE": "upstream registry unavailable",
    "UNKNOWN": "unknown error",
}
# The codes the OCI distribution spec lists; a JSON 4xx body's code MUST be one of these.
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


@dataclass(eq=False)
class RegistryError(Exception):
    """An error answer: HTTP status, spec code and a message safe to show any client."""

    status: int
    code: str
    message: str = ""
    detail: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in MESSAGES:
            raise ValueError(f"unknown registry error code {self.code!r}")

    def body(self) -> bytes:
        entry: dict[str, object] = {"code": self.code, "message": self.message or MESSAGES[self.code]}
        if self.detail:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()


def for_upstream_status(status: int, route_kind: str) -> RegistryError:
    """The error to answer in place of an upstream error answer with this status.

    Decided from the status and the kind of route alone: the upstream body is never
    read or echoed, so nothing the upstream says about its own names reaches a client.
    """
    if status == 401:
        return RegistryError(401, "UNAUTHORIZED")
    if status == 403:
        return RegistryError(403, "DENIED")
    if status == 404:
        code = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}.get(route_kind, "NAME_UNKNOWN")
        return RegistryError(404, code)
    if status == 405:
        return RegistryError(405, "UNSUPPORTED")
    if status == 416:
        # A Range past the blob's end: the spec has no range code; its length code is the closest.
        return RegistryError(416, "SIZE_INVALID", "requested range not satisfiable")
    if status == 429:
        return RegistryError(429, "TOOMANYREQUESTS")
    if status == 400:
        code = {"manifest": "MANIFEST_INVALID", "blob": "DIGEST_INVALID"}.get(route_kind, "NAME_INVALID")
        return RegistryError(400, code)
    if status == 504:
        return RegistryError(504, "UNAVAILABLE", "upstream registry timed out")
    if status >= 500:
        return RegistryError(502, "UNAVAILABLE", f"upstream registry answered {status}")
    if status >= 400:
        return RegistryError(status, "UNSUPPORTED", f"upstream registry answered {status}")
    return RegistryError(status, "UNKNOWN")


def for_proxy_failure(status: int) -> RegistryError:
    """The error for a failure mitmproxy itself reports (connect failure, protocol error)."""
    if status == 400:
        return RegistryError(400, "UNSUPPORTED", "malformed request")
    if status == 413:
        return RegistryError(413, "SIZE_INVALID", "request too large")
    if status == 504:
        return RegistryError(504, "UNAVAILABLE", "upstream registry timed out")
    if status >= 500:
        return RegistryError(502, "UNAVAILABLE", "upstream registry unreachable or failed to answer")
    if status >= 400:
        return RegistryError(status, "UNSUPPORTED", "malformed request")
    return RegistryError(status, "UNKNOWN")
