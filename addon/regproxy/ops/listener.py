"""The operations listener: `/healthz`, `/readyz` and `/metrics` on an address of their own.

`OpsServer` is a small stdlib HTTP server in a daemon thread, so monitoring never competes with
registry traffic for the proxy's port and never needs TLS or the proxy's host names. It serves
only what it is given: a readiness callable and a metrics source (for the proxy, `Metrics.render`
from metrics.py). `health_answer` is the answer logic it shares with the addon, which can serve
the same paths on the proxy port; `parse_listen` reads the `registryproxy_ops_listen` option.
Nothing here imports mitmproxy or prometheus_client.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

logger = logging.getLogger(__name__)

LISTEN_OPTION = "registryproxy_ops_listen"

# What /metrics serves: the exposition and its Content-Type, for a request's Accept header.
Source = Callable[[str | None], tuple[bytes, str]]


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
