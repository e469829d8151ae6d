"""upstream_pool.py under mitmproxy's real proxy server, in-process, against a local TLS upstream.

A client that opens a new connection per request (as skopeo and podman do) must cost one upstream
TLS connection in all, not one per request; what is not cleanly finished is never reused; a
failed verification is still a registry 502; with no resolver mitmproxy is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.addons import next_layer, proxyserver, tlsconfig
from mitmproxy.test import taddons
from regproxy.mitm import pool_layers as upstream_pool
from regproxy.transport.pool import ConnectionPool, Origin
from rig.tls import TestCA, make_ca

BIG = 8 * 1024 * 1024


@dataclass
class Upstream:
    """Keep-alive HTTP/1.1 over TLS: `/small` answers `ok`, `/big` answers BIG bytes slowly."""

    port: int = 0
    accepted: int = 0
    closed: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /big "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                    for _ in range(BIG // 65536):
                        writer.write(b"x" * 65536)
                        await writer.drain()
                        await asyncio.sleep(0.005)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed += 1
            writer.close()


class Router:
    """Routes every request to the upstream, as the registry addon does in requestheaders."""

    def __init__(self, port: int) -> None:
        self.port = port

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.request.scheme = "https"
        flow.request.host = "localhost"
        flow.request.port = self.port

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        flow.response.stream = True


def trust_file(origin: Origin) -> ssl.SSLContext:
    """In these tests an origin's trust is the path of the CA file that verifies it."""
    return ssl.create_default_context(cafile=str(origin.trust))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@contextlib.asynccontextmanager
async def proxy_and_upstream(
    ca: TestCA, tmp: Path, resolver: Callable[[int], upstream_pool.Resolver | None]
) -> AsyncIterator[tuple[int, Upstream]]:
    up = Upstream()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(ca.server_pem))
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0, ssl=tls)
    up.port = server.sockets[0].getsockname()[1]
    upstream_pool.install(lambda *_: None, ConnectionPool(context_for=trust_file))
    upstream_pool.set_resolver(resolver(up.port))
    ps = proxyserver.Proxyserver()
    with taddons.context(ps, next_layer.NextLayer(), tlsconfig.TlsConfig(), Router(up.port)) as tctx:
        tctx.configure(
            ps,
            mode=["reverse:http://127.0.0.1:9@127.0.0.1:0"],
            connection_strategy="lazy",
            confdir=str(tmp / "conf"),
            ssl_verify_upstream_trusted_ca=str(ca.ca_cert),
        )
        assert await ps.setup_servers()
        try:
            yield ps.listen_addrs()[0][1], up
        finally:
            upstream_pool.set_resolver(None)
            await ps.servers.update([])
            for w in up.writers:
                w.close()
            server.close()


async def fetch(port: int, path: str = "/small", *, read: int | None = None) -> bytes:
    """One request on a new client connection; `read` bytes of the body, then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: registry.test\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(v for k, v in (h.split(b": ", 1) for h in head.split(b"\r\n")[1:-2]) if k.lower() == b"content-length")
    )
    body = await reader.readexactly(length if read is None else read)
    writer.close()
    return head + body


def pooled(ca: TestCA) -> Callable[[int], upstream_pool.Resolver]:
    def make(port: int) -> upstream_pool.Resolver:
        def resolve(scheme: str, host: str, p: int) -> Origin | None:
            return Origin(scheme, host, p, trust=str(ca.ca_cert)) if (host, p) == ("localhost", port) else None

        return resolve

    return make


def test_new_client_connections_share_one_upstream_tls_connection(ca: TestCA, tmp_path: Path) -> None:
    async def go() -> None:
        async with proxy_and_upstream(ca, tmp_path, pooled(ca)) as (port, up):
            for _ in range(6):
                assert (await fetch(port)).endswith(b"\r\n\r\nok")
                await asyncio.sleep(0.05)  # the client's close reaches the proxy
            assert up.accepted == 1

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_connection_left_mid_body_is_closed_not_reused(ca: TestCA, tmp_path: Path) -> None:
    async def go() -> None:
        async with proxy_and_upstream(ca, tmp_path, pooled(ca)) as (port, up):
            await fetch(port, "/big", read=100_000)  # the client hangs up mid-blob
            for _ in range(20):
                if up.closed:
                    break
                await asyncio.sleep(0.1)
            assert up.closed == 1  # the upstream connection was closed, not pooled half-read
            assert (await fetch(port)).endswith(b"ok")
            assert up.accepted == 2

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_failed_verification_answers_a_registry_502(ca: TestCA, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other")

    def distrusting(port: int) -> upstream_pool.Resolver:
        return lambda scheme, host, p: Origin(scheme, host, p, trust=str(other.ca_cert))

    async def go() -> None:
        async with proxy_and_upstream(ca, tmp_path, distrusting) as (port, _up):
            answer = await fetch(port)
            assert answer.startswith(b"HTTP/1.1 502 ")
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["errors"][0]["code"] == "UNAVAILABLE"

    asyncio.run(asyncio.wait_for(go(), 30))


def test_without_a_resolver_mitmproxy_connects_per_client_connection_as_before(ca: TestCA, tmp_path: Path) -> None:
    async def go() -> None:
        async with proxy_and_upstream(ca, tmp_path, lambda port: None) as (port, up):
            for _ in range(3):
                assert (await fetch(port)).endswith(b"ok")
            assert up.accepted == 3
            assert upstream_pool.pool() is not None and upstream_pool.pool().idle_count() == 0  # type: ignore[union-attr]

    asyncio.run(asyncio.wait_for(go(), 30))


@dataclass(frozen=True)
class Refusing:
    """A forward proxy (as connpool.ForwardProxy) that answers every CONNECT 407."""

    port: int
    scheme: str = "http"
    authorization: str | None = "Basic dXNlcjpzM2NyZXQ="  # user:s3cret

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_refused_tunnel_answers_502_and_logs_why_without_credentials(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def go() -> None:
        fwd = await asyncio.start_server(refuse, "127.0.0.1", 0)
        proxy = Refusing(fwd.sockets[0].getsockname()[1])

        def via_proxy(port: int) -> upstream_pool.Resolver:
            return lambda scheme, host, p: Origin(scheme, host, p, trust=str(ca.ca_cert), proxy=proxy, label="far/")

        try:
            async with proxy_and_upstream(ca, tmp_path, via_proxy) as (port, up):
                answer = await fetch(port)
                assert answer.startswith(b"HTTP/1.1 502 ")
                assert up.accepted == 0
        finally:
            fwd.close()

    with caplog.at_level(logging.WARNING, logger="registryproxy"):
        asyncio.run(asyncio.wait_for(go(), 30))
    lines = [r.getMessage() for r in caplog.records if "upstream connection to" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "for mapping far/ failed: forward proxy refused CONNECT: 'HTTP/1.1 407 Proxy Authentication" in lines[0]
    assert " via 127.0.0.1:" in lines[0]  # the forward proxy, by address
    assert "dXNlcjpzM2NyZXQ=" not in caplog.text and "s3cret" not in caplog.text
