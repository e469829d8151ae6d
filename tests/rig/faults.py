"""Misbehaving peers on loopback for the fault suite (tests/e2e/test_faults.py).

- `FaultServer`: a TCP listener that hands every connection, on a thread of its own, to a
  behaviour (a function of a `Conn`). It counts connections, keeps the request lines it read, and
  notes when the peer (the proxy) went away while the behaviour was still sending or holding on.
- Behaviours for upstream registries: reset (RST, via SO_LINGER 0) or close at chosen points of the
  answer, stall at chosen points, stream a long body at a steady pace.
- `ClosedPort`: a port bound but not listening, so every connect is refused (and nobody else can
  take the port while the test runs).
- `ImageServer`: an upstream registry serving one image from an OCI layout (ping, manifest by any
  tag, blobs), whose blob answers are cut mid-body in the way the repository name says.
- `TokenFaults`: a distribution token server whose answer is chosen by the repository asked for
  (a fault, or a real signed token from a `TokenIssuer`); `start_token_registry` runs a real
  docker-registry whose token realm is that server.
- `Slowloris`: client sockets that send a request head one byte at a time.

Every server binds 127.0.0.1 on a kernel-chosen port and is stopped (listener and connections
closed, threads joined with a bound) by `stop()`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import selectors
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .httpserver import TcpServer
from .procs import LOOPBACK, Proc, RigError, wait_until
from .registry import launch_registry, registry_config
from .token_issuer import TokenIssuer

_MAX_HEAD = 64 * 1024


class PeerGone(Exception):
    """The peer closed or reset the connection."""


class Conn:
    """One accepted connection, with the few operations the behaviours need."""

    def __init__(self, sock: socket.socket, server: FaultServer) -> None:
        self.sock = sock
        self.server = server
        self._buf = b""

    def read_head(self, timeout: float = 10.0) -> bytes | None:
        """The next request head (up to the blank line), or None if the peer closed first."""
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._buf += data
            if len(self._buf) > _MAX_HEAD:
                return None
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        self.server.note_request(head.split(b"\r\n", 1)[0].decode("latin-1"))
        return head

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise PeerGone from e

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        with suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def finish(self) -> None:
        """An orderly close (FIN)."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()

    def hold(self) -> None:
        """Say nothing until the peer closes or the server stops; the peer closing is noted."""
        self.sock.settimeout(0.1)
        while not self.server.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                raise PeerGone
        self.sock.close()


Behaviour = Callable[[Conn], None]


class FaultServer(TcpServer):
    """A listener on 127.0.0.1 that runs `behaviour` on every connection (one thread each); started when made."""

    backlog = 256

    def __init__(self, behaviour: Behaviour, name: str = "fault") -> None:
        super().__init__(name)
        self.behaviour = behaviour
        self.accepted = 0
        self.peer_gone = 0  # connections the peer closed while the behaviour still sent or held on
        self.request_lines: list[str] = []
        self.start()

    def note_request(self, line: str) -> None:
        with self._lock:
            self.request_lines.append(line)

    def requests(self) -> list[str]:
        with self._lock:
            return list(self.request_lines)

    def counts(self) -> tuple[int, int]:
        """(connections accepted, connections the peer abandoned)."""
        with self._lock:
            return self.accepted, self.peer_gone

    def wait_accepted(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: self.counts()[0] >= n, timeout, f"{n} connections to {self.name}")

    def on_accept(self) -> None:
        with self._lock:
            self.accepted += 1

    def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self.behaviour(Conn(sock, self))
        except PeerGone:
            with self._lock:
                self.peer_gone += 1
        except OSError:
            pass
        finally:
            self.forget(sock)
            with suppress(OSError):
                sock.close()


class ClosedPort:
    """A port bound on 127.0.0.1 but never listening: connects to it are refused."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind((LOOPBACK, 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self._sock.close()


# --- behaviours of an upstream registry --------------------------------------------------------


def reset_after(prefix: bytes, read_request: bool = True) -> Behaviour:
    """Read the request head (unless `read_request` is false), send `prefix`, then RST."""

    def run(c: Conn) -> None:
        if read_request and c.read_head() is None:
            return
        if prefix:
            c.send(prefix)
            time.sleep(0.05)  # let the bytes leave before the RST overtakes them
        c.reset()

    return run


def close_after(prefix: bytes) -> Behaviour:
    """Read the request head, send `prefix`, then close normally (FIN)."""

    def run(c: Conn) -> None:
        if c.read_head() is None:
            return
        c.send(prefix)
        c.finish()

    return run


def stall_after(prefix: bytes) -> Behaviour:
    """Read the request head, send `prefix`, then hold the connection open saying nothing."""

    def run(c: Conn) -> None:
        if c.read_head() is None:
            return
        if prefix:
            c.send(prefix)
        c.hold()

    return run


def paced_body(total: int, chunk: int = 64 * 1024, interval: float = 0.02) -> Behaviour:
    """Answer 200 with Content-Length `total`, sending `chunk` bytes every `interval` seconds.

    The proxy abandoning the connection mid-body shows in `FaultServer.peer_gone`."""

    def run(c: Conn) -> None:
        if c.read_head() is None:
            return
        c.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {total}\r\n\r\n".encode()
        )
        sent = 0
        c.sock.settimeout(5)
        while sent < total and not c.server.stopping.is_set():
            n = min(chunk, total - sent)
            c.send(b"\xab" * n)
            sent += n
            time.sleep(interval)
        c.finish()

    return run


# --- an upstream that serves one image and cuts blob bodies ------------------------------------

CUT_MODES = ("cl-fin", "cl-rst", "chunked-fin", "chunked-rst", "whole")
_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)$")


@dataclass
class ImageServer:
    """An upstream registry serving one image (`manifest`, `blobs` by digest) for any name and tag.

    The last component of the repository name picks what happens to blob bodies other than
    `keep_whole` (the config): `cl-fin`/`cl-rst` announce Content-Length and stop after half the
    bytes with a FIN/an RST; `chunked-fin`/`chunked-rst` send chunked framing and stop after half the
    bytes without the last chunk; `whole` sends them complete. Other digests get `synthetic` bytes.
    """

    manifest: bytes
    manifest_type: str
    blobs: dict[str, bytes]
    keep_whole: frozenset[str] = frozenset()
    synthetic: bytes = field(default=b"", repr=False)
    server: FaultServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = FaultServer(self._handle, "image-server")

    @classmethod
    def from_layout(cls, layout: Path, manifest: bytes, manifest_type: str, synthetic_size: int) -> ImageServer:
        data = json.loads(manifest)
        digests = [data["config"]["digest"], *(x["digest"] for x in data["layers"])]
        blobs = {d: (layout / "blobs" / "sha256" / d.split(":", 1)[1]).read_bytes() for d in digests}
        return cls(
            manifest,
            manifest_type,
            blobs,
            frozenset({data["config"]["digest"]}),
            os.urandom(synthetic_size),
        )

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def _handle(self, c: Conn) -> None:
        head = c.read_head()
        if head is None:
            return
        method, target = (head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""])[:2]
        path = urllib.parse.urlsplit(target).path
        m = _ROUTE.match(path)
        if path == "/v2/" or m is None:
            status = "200 OK" if path == "/v2/" else "404 Not Found"
            c.send(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            c.finish()
            return
        if m["kind"] == "manifests":
            body, ctype, digest = self.manifest, self.manifest_type, _sha256(self.manifest)
        else:
            digest = m["ref"]
            body, ctype = self.blobs.get(digest, self.synthetic), "application/octet-stream"
        head_out = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nDocker-Content-Digest: {digest}\r\n"
        mode = m["name"].rsplit("/", 1)[-1]
        if method == "HEAD" or m["kind"] == "manifests" or digest in self.keep_whole or mode not in CUT_MODES[:4]:
            c.send(f"{head_out}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                c.send(body)
            c.finish()
            return
        half = body[: len(body) // 2]
        if mode.startswith("cl-"):
            c.send(f"{head_out}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            for i in range(0, len(half), 16384):
                c.send(half[i : i + 16384])
        else:
            c.send(f"{head_out}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
            for i in range(0, len(half), 16384):
                part = half[i : i + 16384]
                c.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        time.sleep(0.05)
        if mode.endswith("-rst"):
            c.reset()
        else:
            c.finish()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- a token server that fails on demand --------------------------------------------------------

TOKEN_FAULTS = ("s500", "garbage", "nonjson", "empty", "hang", "headhang", "trickle")


class TokenFaults:
    """A token server for distribution's `auth: token`, answering by the repository asked for.

    A scope `repository:NS/fault-MODE:pull` gets MODE: `s500` (a 500 with a JSON error), `garbage`
    (bytes that are not HTTP, then a close), `nonjson` (a 200 with an HTML page), `empty` (a close
    without a byte), `hang` (no answer at all), `headhang` (a 200 head promising a body that never
    comes), `trickle` (a 200 head, then one body byte every `trickle_interval` seconds). Any other
    scope gets a real token signed by `issuer`, for a caller with valid Basic credentials.
    """

    def __init__(self, issuer: TokenIssuer, trickle_interval: float = 0.5) -> None:
        self.issuer = issuer
        self.trickle_interval = trickle_interval
        self.server = FaultServer(self._handle, "token-faults")
        self.issued = 0

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def stop(self) -> None:
        self.server.stop()

    def _handle(self, c: Conn) -> None:
        head = c.read_head()
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        target = (lines[0].split(" ") + ["", ""])[1]
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        scopes = params.get("scope", [])
        modes = {s.split(":")[1].rsplit("/fault-", 1)[-1] for s in scopes if "/fault-" in s and s.count(":") == 2}
        mode = next(iter(modes), "ok")
        if mode == "s500":
            body = b'{"errors":[{"code":"UNKNOWN","message":"token service broke"}]}'
            c.send(_response("500 Internal Server Error", "application/json", body))
        elif mode == "garbage":
            c.send(b"\x16\x03\x01\x00\xffnot http at all\r\n\r\n\x00\x01\x02")
        elif mode == "nonjson":
            c.send(_response("200 OK", "text/html", b"<html><body>Welcome to the login page</body></html>"))
        elif mode == "empty":
            pass
        elif mode == "hang":
            c.hold()
            return
        elif mode == "headhang":
            c.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")
            c.hold()
            return
        elif mode == "trickle":
            c.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not c.server.stopping.is_set():
                c.send(b" ")
                time.sleep(self.trickle_interval)
        else:
            c.send(self._real_token(lines[1:], scopes))
        c.finish()

    def _real_token(self, header_lines: list[str], scopes: list[str]) -> bytes:
        user: str | None = None
        for line in header_lines:
            name, _, value = line.partition(":")
            scheme, _, b64 = value.strip().partition(" ")
            if name.strip().lower() == "authorization" and scheme.lower() == "basic":
                with suppress(binascii.Error, UnicodeDecodeError):
                    u, _, pw = base64.b64decode(b64, validate=True).decode().partition(":")
                    user = u if self.issuer.check_password(u, pw) else None
        if user is None:
            return _response("401 Unauthorized", "application/json", b'{"details":"credentials required"}')
        token = self.issuer.issue_token(user, self.issuer.grant(user, scopes))
        self.issued += 1
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        return _response("200 OK", "application/json", body)


def _response(status: str, ctype: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


@dataclass
class TokenRegistry:
    """A real docker-registry with token auth whose realm is a `TokenFaults` server."""

    url: str
    proc: Proc
    tokens: TokenFaults

    def stop(self) -> None:
        self.proc.stop()
        self.tokens.stop()


def start_token_registry(workdir: Path, users: dict[str, str], timeout: float = 20.0) -> TokenRegistry:
    """A docker-registry (empty storage) that sends clients to a `TokenFaults` realm."""
    issuer = TokenIssuer(workdir, users, service="fault-registry", issuer="fault-issuer")  # signs; never started
    tokens = TokenFaults(issuer)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)

    def make_config(port: int) -> dict[str, Any]:
        cfg = registry_config("anonymous", port, storage)
        cfg["auth"] = {
            "token": {
                "realm": tokens.realm,
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": str(issuer.cert_path),
            }
        }
        return cfg

    try:
        proc, port = launch_registry("registry-token-faults", workdir, workdir / "config.yml", make_config, timeout)
    except BaseException:
        tokens.stop()
        raise
    return TokenRegistry(f"http://{LOOPBACK}:{port}", proc, tokens)


# --- clients ------------------------------------------------------------------------------------


class Slowloris:
    """`count` client sockets, each sending `head` one byte every `interval` seconds.

    `closed_after()` gives, per socket, the seconds from its first byte until the server closed
    it (None while it is open). Runs on one thread; `stop()` closes every socket."""

    def __init__(self, host: str, port: int, count: int, head: bytes, interval: float = 1.0) -> None:
        self.head = head
        self.interval = interval
        self.socks = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
        self.started: list[float] = [0.0] * count
        self.closed: list[float | None] = [None] * count
        self.sent = [0] * count
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        next_send = time.monotonic()
        while not self._stop.is_set() and any(c is None for c in self.closed):
            now = time.monotonic()
            if now >= next_send:
                for i, s in enumerate(self.socks):
                    if self.closed[i] is None and self.sent[i] < len(self.head):
                        try:
                            s.send(self.head[self.sent[i] : self.sent[i] + 1])
                        except OSError:
                            self._mark(i, sel)
                            continue
                        if self.sent[i] == 0:
                            self.started[i] = time.monotonic()
                        self.sent[i] += 1
                next_send += self.interval
            for key, _ in sel.select(timeout=max(0.0, min(0.05, next_send - time.monotonic()))):
                i = int(key.data)
                try:
                    data = self.socks[i].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._mark(i, sel)
        sel.close()

    def _mark(self, i: int, sel: selectors.BaseSelector) -> None:
        with self._lock:
            self.closed[i] = time.monotonic() - self.started[i]
        with suppress(KeyError, ValueError):
            sel.unregister(self.socks[i])

    def closed_after(self) -> list[float | None]:
        with self._lock:
            return list(self.closed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.socks:
            with suppress(OSError):
                s.close()


def open_fds(pid: int) -> int:
    """How many file descriptors process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def push_blob(registry_url: str, name: str, chunks: Callable[[], Iterator[bytes]]) -> str:
    """Upload a blob (monolithic PUT, streamed) to an anonymous registry; returns its digest."""
    digest = hashlib.sha256()
    for part in chunks():
        digest.update(part)
    dgst = f"sha256:{digest.hexdigest()}"
    with httpx.Client(timeout=120, trust_env=False) as c:
        start = c.post(f"{registry_url}/v2/{name}/blobs/uploads/")
        if start.status_code != 202:
            raise RigError(f"blob upload refused: {start.status_code} {start.text}")
        loc = urllib.parse.urljoin(registry_url, start.headers["location"])
        sep = "&" if "?" in loc else "?"
        put = c.put(f"{loc}{sep}digest={dgst}", content=chunks(), headers={"Content-Type": "application/octet-stream"})
        if put.status_code != 201:
            raise RigError(f"blob upload failed: {put.status_code} {put.text}")
    return dgst
