"""The metrics' label values, folded into small fixed sets (or truncated) before they reach a metric:
whatever a client sends, the number of time series stays bounded. Shared by ops/metrics.py and
ops/cache_metrics.py. Nothing here imports mitmproxy."""

from __future__ import annotations

from typing import Final

ROUTES: Final = ("ping", "token", "manifest", "blob", "tags", "other")
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
GRANTS: Final = ("anonymous", "password", "refresh_token")
REFUSAL_REASONS: Final = (
    "unauthorized",
    "denied",
    "unsupported",
    "size_invalid",
    "unavailable",
    "invalid_request",
    "invalid_token",
    "expired",
    "insufficient_scope",
    "link_expired",
    "link_revoked",
)
LINK_OUTCOMES: Final = ("ok", "expired", "revoked")
LIMITS: Final = (
    "client_requests",
    "manifest_gets",
    "mapping_bytes",
    "client_bytes",
    "client_transfers",
    "store_unavailable",
)
MAX_LABEL = 64
POLICY_REFUSALS = frozenset({"repository", "tag", "digest"})
NO_MAPPING = "-"


def fold_mapping(mapping: str) -> str:
    """A mapping label: `-` when there is none, at most 64 characters otherwise."""
    return mapping[:MAX_LABEL] if mapping else NO_MAPPING


def fold_method(method: str) -> str:
    upper = method.upper()
    return upper if upper in METHODS else "OTHER"


def fold_route(route: str) -> str:
    return route if route in ROUTES else "other"


def fold_status(status: int | str) -> str:
    """An HTTP status code as text (100-599), or `error` for anything else."""
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    return "error"


def fold_limit(limit: str) -> str:
    return limit if limit in LIMITS else "other"


def fold_grant(grant: str) -> str:
    return grant if grant in GRANTS else "other"


def fold_reason(reason: str) -> str:
    """A refusal reason: a registry error code (any case) or a token error, else `other`."""
    key = reason.strip().lower().replace("-", "_").replace(" ", "_")
    return key if key in REFUSAL_REASONS else "other"
