"""Hostile servers for the attack tests: a scripted malicious upstream and a trap, on loopback.

- `ScriptedServer`: an HTTP/1.1 server (stdlib `http.server`) whose answer to each request is
  decided by a function of the request (`Request -> Reply`). It plays a malicious registry or
  token server: challenges whose realm points elsewhere, oversized, malformed or dribbled token
  answers, redirects. Every request is recorded with all of its headers.
- `Trap`: a raw TCP listener that records every connection and the bytes it received (TLS
  ClientHellos included), and answers anything HTTP-looking with a plausible token so that a
  proxy that did follow a hostile realm would go on and use it. A test asserts it saw nothing.

Both listen on 127.0.0.1 on a port the kernel picks (they are rig.httpserver servers, started when
made), run on daemon threads, and are stopped (listener closed, open connections closed, bodies in
progress abandoned) by `stop()`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from .httpserver import HttpServer, TcpServer, shut


class Request(NamedTuple):
    """A request a hostile server received (header names lower-cased, in order)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        key = name.lower()
        return next((v for k, v in self.headers if k == key), None)

    @property
    def authorization(self) -> str | None:
        return self.header("authorization")


@dataclass
class Reply:
    """An answer: status, headers (in order) and a body given whole or as chunks.

    With `chunks`, the body is sent as it is produced (`length` as Content-Length when given,
    else chunked); the generator may sleep between chunks to dribble.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: Iterable[bytes] | None = None
    length: int | None = None


Script = Callable[[Request, "ScriptedServer"], Reply]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.owner._track(self.connection, False)

    def _serve(self) -> None:
        owner = self.server.owner
        req = Request(self.command, self.path, tuple((k.lower(), v) for k, v in self.headers.items()))
        owner._record(req)
        length = int(self.headers.get("content-length") or 0)
        if 0 < length <= 1 << 20:
            self.rfile.read(length)
        reply = owner.script(req, owner)
        self.send_response(reply.status)
        names = {k.lower() for k, _ in reply.headers}
        for k, v in reply.headers:
            self.send_header(k, v)
        if reply.chunks is None:
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            return
        chunked = reply.length is None
        if "content-length" not in names:
            self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(reply.length))))
        self.end_headers()
        for part in reply.chunks:
            if owner.stopping.is_set():
                break
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            self.wfile.flush()
        else:
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    owner: ScriptedServer

    def handle_error(self, request: object, client_address: object) -> None:
        """A peer that hangs up mid-answer is expected here: no traceback on stderr."""


class ScriptedServer(HttpServer):
    """A malicious HTTP server on 127.0.0.1: `script(request, self)` decides every answer."""

    def __init__(self, script: Script, name: str = "hostile") -> None:
        super().__init__(name)
        self.script = script
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._open_conns: set[socket.socket] = set()
        self.start()

    def make_server(self) -> ThreadingHTTPServer:
        server = _Server((self.host, 0), _Handler)
        server.owner = self
        return server

    def _record(self, req: Request) -> None:
        with self._lock:
            self._requests.append(req)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._open_conns.add(conn)
            else:
                self._open_conns.discard(conn)

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _close(self) -> None:
        super()._close()
        with self._lock:
            still_open = list(self._open_conns)
        for c in still_open:
            shut(c)


def dribble(data: bytes, every: float, stopping: threading.Event, step: int = 1) -> Iterator[bytes]:
    """`data` a few bytes at a time, one piece per `every` seconds, until done or stopped."""
    for i in range(0, len(data), step):
        if stopping.wait(every):
            return
        yield data[i : i + step]


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    """`total` bytes made of `piece` (the last one cut), produced lazily."""
    sent = 0
    while sent < total:
        part = piece[: total - sent]
        sent += len(part)
        yield part


class TrapConnection(NamedTuple):
    peer: tuple[str, int]
    data: bytes  # what the connection sent before it closed or went quiet (at most 64 KiB)

    @property
    def had_authorization(self) -> bool:
        return b"\nauthorization:" in self.data.lower()


class Trap(TcpServer):
    """A TCP listener that records every connection: a place credentials must never reach."""

    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 43\r\nConnection: close\r\n\r\n"
        b'{"token":"trap-token-xyz","expires_in":300}'
    )

    def __init__(self) -> None:
        super().__init__("trap")
        self._conns: list[TrapConnection] = []
        self.accepted = 0  # connections accepted so far (recorded in `connections()` once they end)
        self.start()

    def connections(self) -> list[TrapConnection]:
        with self._lock:
            return list(self._conns)

    def on_accept(self) -> None:
        with self._lock:
            self.accepted += 1

    def handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        data = b""
        conn.settimeout(1.0)
        deadline = time.monotonic() + 3
        try:
            while len(data) < 65536 and b"\r\n\r\n" not in data and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                data += chunk
            if data[:1].isupper():
                conn.sendall(self.ANSWER)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.append(TrapConnection(peer, data))
            self.forget(conn)
            conn.close()
