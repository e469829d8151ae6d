"""A front for a rig registry that can be made to fail: 5xx, 429, or no answer at all.

`FailingFront(upstream)` listens on 127.0.0.1 (a port the kernel picks) and, while `mode` is "pass",
forwards every connection to the upstream's public (tapped) port unchanged, as the request tap does. Set
`mode` to an HTTP status ("503", "429", "500"...) and every request on a new connection, or the next one on
a kept-alive connection, is answered with that status and a registry JSON errors body (429 with
`Retry-After: 7`); "stall" reads the request and never answers (the proxy's `upstream_timeout` ends it).
Requests seen while failing are kept in `failed_requests()`. `set_mode` closes every open connection (the
proxy's kept-alive ones to the registry too), so the next request meets the new mode.
`stop()` closes the listener and every connection, stalled ones included.
"""

from __future__ import annotations

import json
import socket
import threading

from .httpserver import shut
from .procs import LOOPBACK
from .registry import Upstream
from .tap import RequestTap, _Closed, _parse_head, _Reader

_REASONS = {
    "429": "Too Many Requests",
    "500": "Internal Server Error",
    "502": "Bad Gateway",
    "503": "Service Unavailable",
}


class FailingFront(RequestTap):
    def __init__(self, upstream: Upstream) -> None:
        self.mode = "pass"
        self._failed: list[tuple[str, str]] = []
        self._stop_stalls = threading.Event()
        super().__init__(upstream.tap.port, LOOPBACK)

    def failed_requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the front failed."""
        with self._lock:
            return list(self._failed)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        with self._lock:
            socks = list(self._open_socks)
        for s in socks:
            shut(s)

    def stop(self) -> None:
        self._stop_stalls.set()
        super().stop()

    def handle(self, client: socket.socket, peer: tuple[str, int]) -> None:
        if self.mode == "pass":
            super().handle(client, peer)
            return
        reader = _Reader(client)
        try:
            while (head := reader.read_head()) is not None:
                method, target, headers = _parse_head(head)
                _skip(reader, int(dict(headers).get("content-length", "0") or "0"))
                with self._lock:
                    self._failed.append((method, target))
                mode = self.mode
                if mode == "stall":
                    self._stop_stalls.wait(120)
                    break
                if mode == "pass":  # switched back while this connection was open: let the next one pass
                    break
                client.sendall(_error(mode, method))
        except (_Closed, OSError, ValueError):
            pass
        self.forget(client)
        shut(client)


def _skip(reader: _Reader, n: int) -> None:
    """Read and drop a request body of `n` bytes (the front answers it without forwarding it)."""
    while n > 0:
        if not reader.buf and not reader._fill():
            raise _Closed("EOF inside a request body")
        part, reader.buf = reader.buf[:n], reader.buf[n:]
        n -= len(part)


def _error(status: str, method: str) -> bytes:
    code = "TOOMANYREQUESTS" if status == "429" else "UNAVAILABLE"
    body = json.dumps({"errors": [{"code": code, "message": f"front says {status}", "detail": None}]}).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if status == "429":
        head.append("Retry-After: 7")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if method == "HEAD" else body)
