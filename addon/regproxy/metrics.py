"""Prometheus metrics and the operations listener (`/metrics`, `/healthz`, `/readyz`).

The proxy counts what it does in a `Metrics` object with its own `CollectorRegistry` (not
prometheus_client's global one, so tests and configuration reloads never see each other's
numbers). Every label value is folded into a small fixed set, or truncated, before it reaches
a metric: whatever a client sends, the number of time series stays bounded.

Several proxy processes (`./run.sh --workers N`) share their numbers through prometheus_client's
multiprocess mode: when `PROMETHEUS_MULTIPROC_DIR` names a directory, every process writes its
samples to files there and `render()` in any of them aggregates all the files. The supervisor
empties the directory before starting the workers (`reset_multiprocess_dir`) and, when a worker
exits, calls `mark_process_dead(pid)` so that the worker's live gauges leave the totals; its
counters and histograms stay counted, as Prometheus expects of counters.

The operations listener (`OpsServer`) is a small stdlib HTTP server on its own address, so
monitoring never competes with registry traffic for the proxy's port and never needs TLS or
the proxy's host names. `health_answer` is the answer logic it shares with the addon, which
can serve the same paths on the proxy port. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

logger = logging.getLogger(__name__)

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
)
MAX_LABEL = 64
NO_MAPPING = "-"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LISTEN_OPTION = "registryproxy_ops_listen"

Source = Callable[[str | None], tuple[bytes, str]]

# prometheus_client leaves these unannotated; their types as used here.
_mark_process_dead: Callable[[int, str | None], None] = prom_multiprocess.mark_process_dead
_multiprocess_collector: Callable[[CollectorRegistry, str], object] = prom_multiprocess.MultiProcessCollector
_multiprocess_value_class: Callable[[], type] = values.get_value_class
_openmetrics_latest: Callable[[CollectorRegistry], bytes] = openmetrics.generate_latest


# --- label folding ------------------------------------------------------------------


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


def fold_grant(grant: str) -> str:
    return grant if grant in GRANTS else "other"


def fold_reason(reason: str) -> str:
    """A refusal reason: a registry error code (any case) or a token error, else `other`."""
    key = reason.strip().lower().replace("-", "_").replace(" ", "_")
    return key if key in REFUSAL_REASONS else "other"


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
            "Response body bytes streamed from upstreams to clients.",
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

    def token_refused(self, reason: str) -> None:
        self._refused.labels(fold_reason(reason)).inc()

    def upstream_token_fetch(self, upstream: str, ok: bool) -> None:
        """Count one upstream token request; fits `RegistryClient.on_token_fetch`."""
        self._upstream_tokens.labels(upstream[:MAX_LABEL] or NO_MAPPING, "ok" if ok else "failed").inc()

    def redirect(self, mapping: str) -> None:
        self._redirects.labels(fold_mapping(mapping)).inc()

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


# --- health and readiness -----------------------------------------------------------

JSON = "application/json"


def _json(data: dict[str, str]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def health_answer(
    path: str, ready: tuple[bool, str], metrics: Source | None, accept: str | None
) -> tuple[int, bytes, str] | None:
    """The answer (status, body, Content-Type) for an operations path, or None for other paths.

    `/healthz` says the process is alive; `/readyz` answers 200 or 503 from `ready`
    (whether the proxy can serve, and a short detail); `/metrics` is `metrics(accept)`, when
    given. A query string is ignored. The caller decides which methods it answers (GET and HEAD).
    """
    match path.split("?", 1)[0]:
        case "/healthz":
            return 200, _json({"status": "alive"}), JSON
        case "/readyz":
            ok, detail = ready
            if ok:
                return 200, _json({"status": "ready", "detail": detail}), JSON
            return 503, _json({"status": "not ready", "detail": detail}), JSON
        case "/metrics" if metrics is not None:
            body, content_type = metrics(accept)
            return 200, body, content_type
        case _:
            return None


# --- the operations listener --------------------------------------------------------

OPS_PATHS: Final = ("/healthz", "/readyz", "/metrics")
HANDLER_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
MAX_CONNECTIONS = 32  # connections served at once; more are closed unanswered


class _OpsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = MAX_CONNECTIONS  # the listen backlog (the stdlib's 5 drops bursts of SYNs)
    metrics_source: Source
    ready: Callable[[], tuple[bool, str]]

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:
        # One thread a connection, but a bounded number of them: a flood cannot exhaust threads.
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints a traceback to stderr; a broken scrape connection is not worth that.
        logger.debug("ops listener: a request from %s failed", client_address)


class _OpsHTTPServer6(_OpsHTTPServer):
    address_family = socket.AF_INET6


class _OpsHandler(BaseHTTPRequestHandler):
    server: _OpsHTTPServer
    server_version = "registryproxy-ops"
    sys_version = ""
    timeout = HANDLER_TIMEOUT  # a client that stalls does not hold a thread for long
    error_content_type = JSON
    error_message_format = '{"status":"error","code":%(code)d}'

    def log_message(self, format: str, *args: object) -> None:
        pass  # never to stderr; the addon's own logging covers the proxy

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self._not_allowed()

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = do_POST

    def _not_allowed(self) -> None:
        self._send(405, _json({"status": "method not allowed"}), JSON, head=False, extra={"Allow": "GET, HEAD"})

    def _answer(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            ready = self.server.ready() if path == "/readyz" else (True, "")
            answer = health_answer(path, ready, self.server.metrics_source, self.headers.get("Accept"))
            if answer is None:
                answer = 404, _json({"status": "not found"}), JSON
        except Exception as e:  # noqa: BLE001 - a failing source answers 500, never kills the listener
            logger.warning("ops listener: %s failed (%s)", path if path in OPS_PATHS else "request", type(e).__name__)
            answer = 500, _json({"status": "error"}), JSON
        status, body, content_type = answer
        self._send(status, body, content_type, head=head)

    def _send(
        self, status: int, body: bytes, content_type: str, *, head: bool, extra: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client went away


class OpsServer:
    """A plain-HTTP listener for /metrics, /healthz, /readyz on a separate address (stdlib
    ThreadingHTTPServer in a daemon thread).

    It serves only what it is given: `metrics_source(accept)` for /metrics and `ready()` for
    /readyz. Requests are not logged; request lines and headers are bounded by the stdlib
    (64 KiB a line, 100 headers); an exception in either callable answers 500.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics_source: Source,
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self.host = host
        self.port = port
        self._metrics_source = metrics_source
        self._ready = ready
        self._server: _OpsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; the bound address (port 0 -> kernel-chosen).

        Raises OSError when the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("ops listener already started")
        cls = _OpsHTTPServer6 if ":" in self.host else _OpsHTTPServer
        server = cls((self.host, self.port), _OpsHandler)
        server.metrics_source = self._metrics_source
        server.ready = self._ready
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="registryproxy-ops", daemon=True
        )
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("ops listener not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (bounded); safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()  # returns once serve_forever sees the request (within its poll interval)
        server.server_close()
        if thread is not None:
            thread.join(STOP_TIMEOUT)


def parse_listen(value: str) -> tuple[str, int]:
    """Read `HOST:PORT`, `[IPV6]:PORT` or `:PORT` (all IPv4 interfaces) into (host, port).

    Raises ValueError with a one-line message naming the option `registryproxy_ops_listen`.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"{LISTEN_OPTION}: {why} in {value[:100]!r} (expected HOST:PORT, [IPV6]:PORT or :PORT)")

    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or not host or ":" not in host:
            raise bad("malformed bracketed IPv6 address")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("IPv6 address without brackets")
        host = host or "0.0.0.0"
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
        raise bad("port must be a number from 0 to 65535")
    if any(c.isspace() or c in "/@[]?#" for c in host) or not host.isascii() or not host.isprintable():
        raise bad("bad host")
    return host, int(port_text)
