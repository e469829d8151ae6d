"""Slow clients: a connection must send each request within `registryproxy_client_timeout`.

A connection counts as idle from its start and from the end of each request; a request counts
from its `request` hook (headers and the small bodies the proxy reads are in) until it is answered.
A connection idle for longer than the timeout is closed. mitmproxy's own `tcp_timeout` resets on
every byte, so it does not stop a client that dribbles a request head (slowloris).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..mitm.connections import close_client

OPTION = "registryproxy_client_timeout"


@dataclass
class _Client:
    """One client connection: since when it has had nothing in progress, and how much it has."""

    idle_since: float = field(default_factory=time.monotonic)
    busy: int = 0


class ClientTimeout:
    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self._busy: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._check: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            OPTION,
            int,
            60,
            "Seconds a client connection may take to send a complete request (headers and the small "
            "bodies the proxy reads), or may sit idle between requests, before it is closed.",
        )

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated and ctx.options.registryproxy_client_timeout <= 0:
            raise exceptions.OptionsError(f"{OPTION}: must be a positive number of seconds")

    def done(self) -> None:
        if self._check is not None:
            self._check.cancel()

    def client_connected(self, client: connection.Client) -> None:
        self._clients[client.id] = _Client()
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().create_task(self._check_clients())

    def client_disconnected(self, client: connection.Client) -> None:
        self._clients.pop(client.id, None)

    def request(self, flow: http.HTTPFlow) -> None:
        """The whole request is in: from here the proxy (or the upstream) is working on it."""
        watch = self._clients.get(flow.client_conn.id)
        if watch is not None and flow not in self._busy:
            self._busy.add(flow)
            watch.busy += 1

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        if flow not in self._busy:
            return
        self._busy.discard(flow)
        watch = self._clients.get(flow.client_conn.id)
        if watch is not None:
            watch.busy = max(0, watch.busy - 1)
            watch.idle_since = time.monotonic()

    async def _check_clients(self) -> None:
        """Close the client connections idle for longer than the timeout, while there are any."""
        while self._clients:
            timeout = float(ctx.options.registryproxy_client_timeout)
            await asyncio.sleep(max(0.2, min(1.0, timeout / 4)))
            now = time.monotonic()
            for client_id, watch in list(self._clients.items()):
                if watch.busy == 0 and now - watch.idle_since > timeout:
                    self._clients.pop(client_id, None)
                    close_client(client_id)
