"""A static file server standing in for a CDN / S3 behind a registry's blob redirects.

It serves a directory (the registry's storage root) for GET and HEAD, with Content-Length and
Range (`bytes=a-b`, `bytes=a-`, `bytes=-n`) answered by 206 + Content-Range. Like S3 with a signed
URL, it refuses (403) any request that carries an `Authorization` header. Every request is
recorded as (method, path, had_authorization).

With `tls` (a server SSLContext) it speaks HTTPS; `public_url` (settable before the registry's
configuration is written) replaces the base URL built from the bound address, e.g. the address of a
relay in front of it.
"""

from __future__ import annotations

import re
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NamedTuple

from .httpserver import HttpServer
from .procs import LOOPBACK

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024


class BlobRequest(NamedTuple):
    method: str
    path: str
    had_authorization: bool


class BlobServer(HttpServer):
    def __init__(
        self,
        root: Path,
        host: str = LOOPBACK,
        *,
        tls: ssl.SSLContext | None = None,
        public_url: str | None = None,
    ) -> None:
        super().__init__("blob-server", host, tls=tls, public_url=public_url)
        self.root = root.resolve()
        self._lock = threading.Lock()
        self._requests: list[BlobRequest] = []
        self._statuses: list[int] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        self.root.mkdir(parents=True, exist_ok=True)
        return _make_handler(self)

    @property
    def url(self) -> str:
        """Base URL with a trailing slash (what the registry's redirect middleware wants)."""
        return super().url + "/"

    def requests(self) -> list[BlobRequest]:
        with self._lock:
            return list(self._requests)

    def statuses(self) -> list[int]:
        """The status answered to each recorded request, in the same order."""
        with self._lock:
            return list(self._statuses)

    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._statuses.clear()

    def _record(self, req: BlobRequest, status: int) -> None:
        with self._lock:
            self._requests.append(req)
            self._statuses.append(status)

    def resolve(self, url_path: str) -> Path | None:
        """The file for a URL path, or None when it would leave the root or does not exist."""
        rel = urllib.parse.unquote(url_path).lstrip("/")
        candidate = (self.root / rel).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            return None
        return candidate if candidate.is_file() else None


def _make_handler(bs: BlobServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rig-blob-server"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>\n"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            method = "HEAD" if head else "GET"
            path = urllib.parse.urlsplit(self.path).path
            had_auth = "Authorization" in self.headers
            req = BlobRequest(method, path, had_auth)
            if had_auth:
                bs._record(req, 403)
                self._error(
                    403,
                    "InvalidArgument",
                    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                    "Signature query string parameter or the Authorization header should be specified",
                    head,
                )
                return
            file = bs.resolve(path)
            if file is None:
                bs._record(req, 404)
                self._error(404, "NoSuchKey", "The specified key does not exist.", head)
                return
            size = file.stat().st_size
            start, end = 0, size - 1
            status = 200
            range_header = self.headers.get("Range")
            if range_header is not None:
                m = _RANGE.match(range_header.strip())
                if m is None or (m.group(1) == "" and m.group(2) == ""):
                    bs._record(req, 416)
                    self._unsatisfiable(size, head)
                    return
                if m.group(1) == "":  # suffix: the last n bytes
                    n = int(m.group(2))
                    start, end = max(0, size - n), size - 1
                else:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size or start > end:
                    bs._record(req, 416)
                    self._unsatisfiable(size, head)
                    return
                status = 206
            bs._record(req, status)
            length = end - start + 1 if size else 0
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head or length == 0:
                return
            with open(file, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def _unsatisfiable(self, size: int, head: bool) -> None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

    return Handler


__all__ = ["BlobRequest", "BlobServer"]
