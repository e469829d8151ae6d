"""The one base of the rig's in-process servers: where they listen, how they start and stop.

`Server` holds what every one of them has: the address it binds (`host`, 127.0.0.1 unless told), the
port the kernel picked (`port`, known once started), `netloc` ("HOST:PORT"), `url` (http or https as
`tls` says, or `public_url` when set: e.g. the address of a relay in front of it), `start()` and an
idempotent `stop()`, and use as a context manager. A subclass says how it listens (`_open`, which
binds and returns the port) and how it stops (`_close`).

Two kinds:
- `HttpServer`: a stdlib ThreadingHTTPServer on a daemon thread (TLS with `tls`); the subclass gives its
  request handler class (`handler()`), or the whole server (`make_server()`). BlobServer, TokenIssuer,
  the hostile ScriptedServer, badcerts' TlsHttpServer; `HandlerServer` takes a handler class as it is
  (the tests' own small servers).
- `TcpServer`: a raw listener whose accept loop hands each connection to `handle(conn, peer)` on a
  thread of its own, and remembers open connections so `stop()` can close them. RequestTap, the
  hostile Trap, faults' FaultServer.

Ports are chosen by the kernel at bind time (port 0), so none can be taken between pick and bind.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from .procs import LOOPBACK, RigError

JOIN_TIMEOUT = 5.0


# --- the engine of HttpServer: a stdlib server on a thread, TLS per connection ------------------

TLS_HANDSHAKE_TIMEOUT = 30.0


class TLSThreadingHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that speaks TLS: each connection's handshake runs on its own handler
    thread (never on the accepting one), bounded by TLS_HANDSHAKE_TIMEOUT."""

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        self.tls_context = context
        super().__init__(server_address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            # wrap_socket detaches `request` (shutdown_request then finds it closed) and closes
            # the connection itself when the handshake fails.
            conn = self.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return
        try:
            conn.settimeout(None)
            super().finish_request(conn, client_address)
        except OSError:
            pass
        finally:
            conn.close()


def http_server(
    host: str, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer on (host, a kernel-chosen port), speaking TLS with `tls` when given."""
    if tls is not None:
        return TLSThreadingHTTPServer((host, 0), handler, tls)
    return ThreadingHTTPServer((host, 0), handler)


class ServerThread:
    """Runs a ThreadingHTTPServer on a daemon thread; `stop()` shuts it down and closes it."""

    def __init__(self, server: ThreadingHTTPServer, name: str) -> None:
        self.server = server
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name)
        self._thread.daemon = True
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# --- the base ---------------------------------------------------------------------------------


class Server:
    """See the module docstring."""

    def __init__(
        self,
        name: str,
        host: str = LOOPBACK,
        *,
        tls: ssl.SSLContext | None = None,
        public_url: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.tls = tls
        self.public_url = public_url
        self.stopping = threading.Event()  # set when stop() begins: for answers in progress to give up
        self._port: int | None = None
        self._stopped = False

    # -- what a subclass provides -------------------------------------------------------------
    def _open(self) -> int:
        """Bind, start serving; the port bound."""
        raise NotImplementedError

    def _close(self) -> None:
        """Stop serving: the listener and every connection closed, threads joined (bounded)."""
        raise NotImplementedError

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> Self:
        if self._port is not None or self._stopped:
            raise RigError(f"{self.name}: already started")
        self._port = self._open()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent; nothing to do when never started)."""
        if self._port is None or self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        self._close()

    @property
    def running(self) -> bool:
        return self._port is not None and not self._stopped

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RigError(f"{self.name}: not started")
        return self._port

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        """`public_url` when set, else SCHEME://HOST:PORT; no trailing slash."""
        if self.public_url is not None:
            return self.public_url.rstrip("/")
        return f"{self.scheme}://{self.netloc}"


class HttpServer(Server):
    """An http.server (threads, daemon) for `handler()`; see the module docstring."""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def make_server(self) -> ThreadingHTTPServer:
        """The server on (host, a kernel-chosen port), speaking TLS with `tls` when given."""
        return http_server(self.host, self.handler(), self.tls)

    def _open(self) -> int:
        self._thread = ServerThread(self.make_server(), self.name)
        return self._thread.port

    def _close(self) -> None:
        self._thread.stop()


class HandlerServer(HttpServer):
    """An HttpServer for a request handler class given as it is (a test's own little server)."""

    def __init__(self, name: str, handler: type[BaseHTTPRequestHandler], host: str = LOOPBACK) -> None:
        super().__init__(name, host)
        self._handler = handler

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return self._handler


class TcpServer(Server):
    """A listener that runs `handle(conn, peer)` on a thread per connection; see the module docstring.

    `handle` owns its connection (it closes it, or `forget`s it when it hands it on); what is still
    open when the server stops is shut down and closed by `stop()`.
    """

    backlog = 128

    def __init__(self, name: str, host: str = LOOPBACK) -> None:
        super().__init__(name, host)
        self._lock = threading.Lock()
        self._open_socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    def _open(self) -> int:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((self.host, 0))
            self._listener.listen(self.backlog)
        except BaseException:
            self._listener.close()
            raise
        port: int = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name=f"{self.name}-{port}", daemon=True)
        self._accepter.start()
        return port

    def track(self, sock: socket.socket) -> None:
        """Close `sock` at stop() unless it was `forget`-ten by then."""
        with self._lock:
            self._open_socks.add(sock)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open_socks.discard(sock)

    def spawn(self, target: Callable[..., None], *args: object) -> None:
        """Run `target(*args)` on a daemon thread that stop() joins (bounded)."""
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if self.stopping.is_set():
                conn.close()
                return
            self.track(conn)
            self.on_accept()
            self.spawn(self._run, conn, peer)

    def on_accept(self) -> None:
        """Called on the accepting thread for every connection, before `handle` (e.g. to count it)."""

    def _run(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self.handle(conn, peer)
        except OSError:
            pass

    def _close(self) -> None:
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepter.join(JOIN_TIMEOUT)
        with self._lock:
            socks, threads = list(self._open_socks), list(self._threads)
            self._open_socks.clear()
        for s in socks:
            shut(s)
        for t in threads:
            t.join(JOIN_TIMEOUT)


def shut(sock: socket.socket) -> None:
    """Shut down both ways and close, whatever state the socket is in."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()


__all__ = ["HandlerServer", "HttpServer", "Server", "TcpServer", "shut"]
