"""The pull-through cache's metrics, and the cache's events (cache/) said as metrics and log lines.

`Metrics` makes one `CacheMetrics` in its own registry (`metrics.cache`); the cache step reports through
it, and hands it to the cache as the observer of fills, store failures and evictions.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from .labels import fold_mapping

logger = logging.getLogger("registryproxy")

FILL_REASONS = frozenset(
    {"digest_mismatch", "size_mismatch", "upstream_error", "upstream_status", "store_error", "cancelled", "too_large"}
)
# Fill failures that are the cache's own to report; the upstream's refusals and failures are the access log's.
LOGGED_FILL_FAILURES = frozenset({"digest_mismatch", "size_mismatch", "store_error"})


def fold_fill_reason(reason: str) -> str:
    return reason if reason in FILL_REASONS else "other"


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._requests = Counter(
            "registryproxy_cache_requests",
            "Requests of cached mappings by kind (manifest, blob) and outcome (hit, miss, fill, stale).",
            ["kind", "outcome"],
            registry=registry,
        )
        self._saved = Counter(
            "registryproxy_cache_manifest_gets_saved",
            "Manifest GETs by tag answered from the cache after an upstream HEAD (or within tag_ttl): upstream GETs spared.",
            registry=registry,
        )
        self._served = Counter(
            "registryproxy_cache_bytes_served",
            "Bytes of blobs and manifests served from the cache.",
            registry=registry,
        )
        self._filled = Counter(
            "registryproxy_cache_bytes_filled",
            "Bytes fetched from upstreams and committed to the cache.",
            registry=registry,
        )
        self._size = Gauge(
            "registryproxy_cache_store_bytes",
            "Bytes of content in the cache's store, as this process's index counts them.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._evictions = Counter(
            "registryproxy_cache_evictions",
            "Content evicted from the cache (least recently used beyond max_size).",
            registry=registry,
        )
        self._stale = Counter(
            "registryproxy_cache_stale",
            "Tags answered from the cache because the upstream failed (stale_if_error), by mapping.",
            ["mapping"],
            registry=registry,
        )
        self._fill_failures = Counter(
            "registryproxy_cache_fill_failures",
            "Fills that stored nothing, by reason (digest_mismatch, size_mismatch, upstream_error, store_error, ...).",
            ["reason"],
            registry=registry,
        )
        self._store_failures = Counter(
            "registryproxy_cache_store_failures",
            "Operations of the cache's store that failed (the request was served as if uncached).",
            registry=registry,
        )

    # -- what the step reports ---------------------------------------------------------------------

    def request(self, kind: str, outcome: str) -> None:
        self._requests.labels(kind, outcome).inc()

    def manifest_get_saved(self) -> None:
        self._saved.inc()

    def served(self, n: int) -> None:
        if n > 0:
            self._served.inc(n)

    def filled(self, n: int) -> None:
        if n > 0:
            self._filled.inc(n)

    def store_size(self, n: int) -> None:
        self._size.set(n)

    def stale(self, mapping: str) -> None:
        self._stale.labels(fold_mapping(mapping)).inc()

    # -- the cache's observer (cache/service.py's CacheObserver) ----------------------------------

    def fill_started(self, hex_digest: str) -> None:
        pass

    def fill_done(self, hex_digest: str, size: int) -> None:
        self.filled(size)

    def fill_failure(self, reason: str) -> None:
        """A fill that stored nothing, counted (a manifest's: the step logs it)."""
        self._fill_failures.labels(fold_fill_reason(reason)).inc()

    def fill_failed(self, hex_digest: str, reason: str) -> None:
        self.fill_failure(reason)
        if reason in LOGGED_FILL_FAILURES:
            logger.warning(
                "registryproxy: cache fill of sha256:%s failed (%s); nothing stored", hex_digest[:12], reason
            )

    def store_failed(self) -> None:
        self._store_failures.inc()

    def evicted(self, key: str, size: int) -> None:
        self._evictions.inc()
