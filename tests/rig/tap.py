"""A transparent TCP forwarder in front of a registry that records each HTTP request's head.

distribution 2.8 logs method and URI of every request, but not whether the request carried an
`Authorization` header (and it logs no "response completed" line at all for a 401). Tests need
exactly that, so each rig registry listens on an internal port and this tap listens on the public
one: bytes go through unchanged in both directions (keep-alive, chunked uploads and all), and
request heads are parsed on the way to record (method, path, had_authorization).
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from .httpserver import TcpServer, shut
from .procs import LOOPBACK

_MAX_HEAD = 1 << 20


class AccessLogEntry(NamedTuple):
    method: str
    path: str  # the request target as sent (path and query)
    had_authorization: bool


class AccessRecord(NamedTuple):
    """A request head as the registry received it (header names lower-cased, in order)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        key = name.lower()
        return next((v for k, v in self.headers if k == key), None)

    @property
    def authorization(self) -> str | None:
        return self.header("authorization")

    def entry(self) -> AccessLogEntry:
        return AccessLogEntry(self.method, self.path, self.authorization is not None)


class _Closed(Exception):
    pass


class RequestTap(TcpServer):
    """Listens (started when made) on `host`, forwards every connection to (target_host, target_port)."""

    def __init__(self, target_port: int, host: str = LOOPBACK, target_host: str = LOOPBACK) -> None:
        super().__init__("tap", host)
        self.target = (target_host, target_port)
        self._records: list[AccessRecord] = []
        self.start()

    def entries(self) -> list[AccessLogEntry]:
        with self._lock:
            return [r.entry() for r in self._records]

    def records(self) -> list[AccessRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    # -- plumbing -----------------------------------------------------------------------------
    def handle(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            self.forget(client)
            shut(client)
            return
        self.track(upstream)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.spawn(self._responses, client, upstream)
        self._requests(client, upstream)

    def _finish(self, a: socket.socket, b: socket.socket) -> None:
        self.forget(a)
        self.forget(b)
        shut(a)
        shut(b)

    def _responses(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        self._finish(client, upstream)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        reader = _Reader(client)
        try:
            while True:
                if not reader.looks_like_http():
                    # Not HTTP (e.g. a TLS ClientHello from a client probing https first): pass it
                    # through untouched so the registry answers it as it would directly.
                    reader.pipe(upstream)
                    break
                head = reader.read_head()
                if head is None:
                    break
                try:
                    method, target, header_list = _parse_head(head)
                except ValueError:
                    upstream.sendall(head)
                    reader.pipe(upstream)
                    break
                headers: dict[str, str] = {}
                for k, v in header_list:
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                with self._lock:
                    self._records.append(AccessRecord(method, target, header_list))
                upstream.sendall(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self._forward_chunked(reader, upstream)
                else:
                    length = int(headers.get("content-length", "0") or "0")
                    reader.forward(length, upstream)
            upstream.shutdown(socket.SHUT_WR)
        except (_Closed, OSError, ValueError):
            self._finish(client, upstream)

    @staticmethod
    def _forward_chunked(reader: _Reader, upstream: socket.socket) -> None:
        while True:
            line = reader.read_line()
            upstream.sendall(line)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = reader.read_line()
                    upstream.sendall(trailer)
                    if trailer in (b"\r\n", b"\n"):
                        return
            reader.forward(size + 2, upstream)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The next request head including its final blank line; None at a clean EOF."""
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buf = self.buf[: end + 4], self.buf[end + 4 :]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _Closed("request head too large")
            if not self._fill():
                if self.buf:
                    raise _Closed("EOF inside a request head")
                return None

    def looks_like_http(self) -> bool:
        """False when the next bytes cannot start a request line; True at EOF too."""
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            if self.buf:
                return self.buf[:1].isupper()
            if not self._fill():
                return True

    def pipe(self, dest: socket.socket) -> None:
        """Forward what is buffered, then everything until EOF."""
        if self.buf:
            dest.sendall(self.buf)
            self.buf = b""
        while self._fill():
            dest.sendall(self.buf)
            self.buf = b""

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                return line
            if not self._fill():
                raise _Closed("EOF inside a chunked body")

    def forward(self, n: int, dest: socket.socket) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise _Closed("EOF inside a request body")
            part, self.buf = self.buf[:n], self.buf[n:]
            dest.sendall(part)
            n -= len(part)


def _parse_head(head: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return parts[0], parts[1], tuple(headers)
