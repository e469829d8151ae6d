"""Prometheus metrics: what the proxy counts, with bounded labels, and their exposition.

The proxy counts what it does in a `Metrics` object with its own `CollectorRegistry` (not
prometheus_client's global one, so tests and configuration reloads never see each other's
numbers). Every label value is folded into a small fixed set, or truncated, before it reaches
a metric (ops/labels.py): whatever a client sends, the number of time series stays bounded. `Metrics.render`
writes the text format or OpenMetrics, as the scraper's Accept header asks (`wants_openmetrics`).

Several proxy processes (`./run.sh --workers N`) share their numbers through prometheus_client's
multiprocess mode: when `PROMETHEUS_MULTIPROC_DIR` names a directory, every process writes its
samples to files there and `render()` in any of them aggregates all the files. The supervisor
empties the directory before starting the workers (`reset_multiprocess_dir`) and, when a worker
exits, calls `mark_process_dead(pid)` so that the worker's live gauges leave the totals; its
counters and histograms stay counted, as Prometheus expects of counters.

Serving the exposition is ops/listener.py's concern (`/metrics` on the operations listener). Nothing here
imports mitmproxy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from .cache_metrics import CacheMetrics
from .labels import (
    LINK_OUTCOMES,
    MAX_LABEL,
    NO_MAPPING,
    POLICY_REFUSALS,
    fold_grant,
    fold_limit,
    fold_mapping,
    fold_method,
    fold_reason,
    fold_route,
    fold_status,
)

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# prometheus_client leaves these unannotated; their types as used here.
_mark_process_dead: Callable[[int, str | None], None] = prom_multiprocess.mark_process_dead
_multiprocess_collector: Callable[[CollectorRegistry, str], object] = prom_multiprocess.MultiProcessCollector
_multiprocess_value_class: Callable[[], type] = values.get_value_class
_openmetrics_latest: Callable[[CollectorRegistry], bytes] = openmetrics.generate_latest


# --- metrics ------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory from the environment, if set (empty counts as unset)."""
    return os.environ.get(MULTIPROC_ENV) or None


def reset_multiprocess_dir(path: str) -> None:
    """Create the multiprocess directory, or remove the sample files a previous run left in it.

    For the supervisor, before it starts the workers: stale files would add a previous run's
    counts to this one's.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for f in directory.glob("*.db"):
        f.unlink(missing_ok=True)


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Tell the multiprocess files that a worker exited (its live gauges leave the totals).

    For the supervisor, when it sees a worker exit; `path` defaults to `$PROMETHEUS_MULTIPROC_DIR`.
    """
    _mark_process_dead(pid, path)


class Metrics:
    """The proxy's counters, gauges and histogram, and their exposition.

    With `PROMETHEUS_MULTIPROC_DIR` set (and no explicit registry), samples go to files in that
    directory and `render()` aggregates every process writing there; the gauges then report the
    most recent value any live process set (all workers load the same configuration).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        path = multiprocess_dir() if registry is None else None
        self.multiprocess = path is not None
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            # prometheus_client picks how values are stored when it is first imported; when the
            # variable was set later (a supervisor that sets it in-process, tests), switch now.
            if values.ValueClass is values.MutexValue:
                values.ValueClass = _multiprocess_value_class()
            self.registry = CollectorRegistry(auto_describe=True)
            _multiprocess_collector(self.registry, path)
            target: CollectorRegistry | None = None  # samples live in the files, not in a registry
        else:
            self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
            if registry is None:
                ProcessCollector(registry=self.registry)
            target = self.registry
        self._requests = Counter(
            "registryproxy_requests",
            "Requests answered, by mapping, method, route kind and status (or error).",
            ["mapping", "method", "route", "status"],
            registry=target,
        )
        self._latency = Histogram(
            "registryproxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["mapping"],
            buckets=LATENCY_BUCKETS,
            registry=target,
        )
        self._streamed = Counter(
            "registryproxy_streamed_bytes",
            "Response body bytes sent from upstreams to clients (streamed, or kept whole for mitmweb).",
            ["mapping"],
            registry=target,
        )
        self._issued = Counter(
            "registryproxy_tokens_issued",
            "Client tokens issued by the proxy's token endpoint, by grant.",
            ["grant"],
            registry=target,
        )
        self._refused = Counter(
            "registryproxy_tokens_refused",
            "Token requests and client tokens refused, by reason.",
            ["reason"],
            registry=target,
        )
        self._links = Counter(
            "registryproxy_link_requests",
            "Registry requests through a share link, by the link's id (never the link) and its state.",
            ["link", "state"],
            registry=target,
        )
        self._upstream_tokens = Counter(
            "registryproxy_upstream_token_fetches",
            "Token requests sent to upstream token services (cache hits not counted).",
            ["upstream", "outcome"],
            registry=target,
        )
        self._redirects = Counter(
            "registryproxy_redirects",
            "Upstream redirects passed to clients (blob storage).",
            ["mapping"],
            registry=target,
        )
        self._reloads = Counter(
            "registryproxy_config_reloads",
            "Configuration loads, by outcome.",
            ["outcome"],
            registry=target,
        )
        self._mappings = Gauge(
            "registryproxy_mappings",
            "Mappings in the configuration in use.",
            registry=target,
            multiprocess_mode="livemostrecent",
        )
        self._keys = Gauge(
            "registryproxy_secret_keys",
            "Secret keys accepted for client tokens (the first one issues).",
            registry=target,
            multiprocess_mode="livemostrecent",
        )

        self._limited = Counter(
            "registryproxy_limit_refusals",
            "Requests refused by a limit (429; store_unavailable: 503 while the store fails, closed), by limit and mapping.",
            ["limit", "mapping"],
            registry=target,
        )
        self._limit_usage = Gauge(
            "registryproxy_limit_usage",
            "A mapping's budget used in its current window (manifest_gets: requests, mapping_bytes: bytes).",
            ["limit", "mapping"],
            registry=target,
            multiprocess_mode="livemostrecent",
        )
        self._limit_size = Gauge(
            "registryproxy_limit_budget",
            "A mapping's budget per window, as configured (with registryproxy_limit_usage).",
            ["limit", "mapping"],
            registry=target,
            multiprocess_mode="livemostrecent",
        )
        self._policy_refused = Counter(
            "registryproxy_policy_refusals",
            "Requests a mapping's policy refused (403 DENIED), by mapping and what it refused.",
            ["mapping", "refused"],
            registry=target,
        )
        self._store_failures = Counter(
            "registryproxy_limit_store_failures",
            "Operations of the limits' store (Redis) that failed or timed out.",
            registry=target,
        )
        # The pull-through cache's metrics, in the same registry.
        self.cache = CacheMetrics(target)

    def request(self, *, mapping: str, method: str, route: str, status: int | str) -> None:
        """Count one answered request; `status` is the HTTP status, or "error" when none was sent."""
        self._requests.labels(fold_mapping(mapping), fold_method(method), fold_route(route), fold_status(status)).inc()

    def upstream_latency(self, mapping: str, seconds: float) -> None:
        self._latency.labels(fold_mapping(mapping)).observe(max(0.0, seconds))

    def bytes_streamed(self, mapping: str, n: int) -> None:
        if n > 0:
            self._streamed.labels(fold_mapping(mapping)).inc(n)

    def token_issued(self, grant: str) -> None:
        self._issued.labels(fold_grant(grant)).inc()

    def link_request(self, link_id: str, state: str) -> None:
        """Count one registry request through the share link `link_id` (an id, not the link)."""
        self._links.labels(link_id[:MAX_LABEL], state if state in LINK_OUTCOMES else "other").inc()

    def token_refused(self, reason: str) -> None:
        self._refused.labels(fold_reason(reason)).inc()

    def upstream_token_fetch(self, upstream: str, ok: bool) -> None:
        """Count one upstream token request; fits `RegistryClient.on_token_fetch`."""
        self._upstream_tokens.labels(upstream[:MAX_LABEL] or NO_MAPPING, "ok" if ok else "failed").inc()

    def redirect(self, mapping: str) -> None:
        self._redirects.labels(fold_mapping(mapping)).inc()

    def limit_refused(self, limit: str, mapping: str) -> None:
        self._limited.labels(fold_limit(limit), fold_mapping(mapping)).inc()

    def policy_refused(self, mapping: str, refused: str) -> None:
        """`refused`: repository, tag or digest (policy/decide.py's `Refusal`)."""
        self._policy_refused.labels(fold_mapping(mapping), refused if refused in POLICY_REFUSALS else "other").inc()

    def limit_usage(self, limit: str, mapping: str, used: float, budget: float) -> None:
        self._limit_usage.labels(fold_limit(limit), fold_mapping(mapping)).set(used)
        self._limit_size.labels(fold_limit(limit), fold_mapping(mapping)).set(budget)

    def limit_store_failed(self) -> None:
        self._store_failures.inc()

    def config_reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "failed").inc()

    def set_config_info(self, mappings: int, keys: int) -> None:
        self._mappings.set(mappings)
        self._keys.set(keys)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its Content-Type: OpenMetrics 1.0 when `accept` asks for it, else text 0.0.4."""
        if wants_openmetrics(accept):
            return _openmetrics_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def wants_openmetrics(accept: str | None) -> bool:
    """Whether an Accept header lists `application/openmetrics-text` (parameters and q ignored)."""
    if not accept:
        return False
    return any(part.split(";", 1)[0].strip().lower() == "application/openmetrics-text" for part in accept.split(","))
