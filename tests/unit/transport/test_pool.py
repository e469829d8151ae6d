"""Pooled upstream connections (transport/pool.py) against real local TLS servers and a CONNECT stub."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from regproxy.transport.pool import ConnectionPool, Origin, TunnelError, open_stream
from rig.tls import TestCA, make_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


def trusting(ca: TestCA) -> Callable[[Origin], ssl.SSLContext]:
    def context_for(origin: Origin) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca.ca_cert))

    return context_for


@dataclass
class Upstream:
    """A keep-alive HTTP/1.1 server (TLS or not) that counts the connections it accepted."""

    port: int = 0
    accepted: int = 0
    open_writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"close-me" in head:
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@contextlib.asynccontextmanager
async def serving(tls: ssl.SSLContext | None) -> AsyncIterator[Upstream]:
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0, ssl=tls)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        for w in up.open_writers:
            w.close()
        server.close()


def server_tls(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(ca.server_pem))
    return ctx


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, extra: bytes = b"") -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(2)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_a_released_tls_connection_is_reused_for_the_same_origin(ca: TestCA) -> None:
    async def go() -> None:
        async with serving(server_tls(ca)) as up:
            pool = ConnectionPool(context_for=trusting(ca))
            origin = Origin("https", "localhost", up.port, trust="test-ca")
            for _ in range(5):
                reader, writer = await pool.acquire(origin)
                assert (await get(reader, writer)).endswith(b"ok")
                assert pool.release(origin, reader, writer)
            assert up.accepted == 1
            assert (pool.stats.opened, pool.stats.reused) == (1, 4)
            pool.close_all()

    run(go())


def test_connections_are_never_shared_across_hosts_or_trust(ca: TestCA) -> None:
    async def go() -> None:
        async with serving(server_tls(ca)) as up:
            pool = ConnectionPool(context_for=trusting(ca))
            origins = [
                Origin("https", "localhost", up.port, trust="a"),
                Origin("https", "localhost", up.port, trust="b"),  # same host, other trust
                Origin("https", "127.0.0.1", up.port, trust="a"),  # same server, other name
            ]
            for origin in origins:
                reader, writer = await pool.acquire(origin)
                await get(reader, writer)
                pool.release(origin, reader, writer)
            assert up.accepted == 3
            assert all(pool.idle_count(o) == 1 for o in origins)
            pool.close_all()

    run(go())


def test_the_upstream_certificate_is_verified_with_the_origins_context(ca: TestCA, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other")

    async def go() -> None:
        async with serving(server_tls(ca)) as up:
            pool = ConnectionPool(context_for=trusting(other))
            with pytest.raises(ssl.SSLCertVerificationError):
                await pool.acquire(Origin("https", "localhost", up.port))
            assert pool.idle_count() == 0

    run(go())


def test_a_connection_the_upstream_closed_while_idle_is_not_lent(ca: TestCA) -> None:
    async def go() -> None:
        async with serving(server_tls(ca)) as up:
            pool = ConnectionPool(context_for=trusting(ca))
            origin = Origin("https", "localhost", up.port)
            reader, writer = await pool.acquire(origin)
            await get(reader, writer)
            pool.release(origin, reader, writer)
            for w in up.open_writers:
                w.close()
            await asyncio.sleep(0.2)  # the close_notify and FIN arrive
            reader, writer = await pool.acquire(origin)
            assert (await get(reader, writer)).endswith(b"ok")
            assert up.accepted == 2
            pool.close_all()

    run(go())


def test_idle_connections_expire_and_the_idle_set_is_bounded() -> None:
    now = [0.0]

    async def go() -> None:
        async with serving(None) as up:
            pool = ConnectionPool(max_idle_per_origin=2, idle_timeout=10, clock=lambda: now[0])
            origin = Origin("http", "127.0.0.1", up.port)
            lent = [await pool.acquire(origin) for _ in range(3)]
            for reader, writer in lent:
                pool.release(origin, reader, writer)
            assert pool.idle_count(origin) == 2  # the oldest was closed
            now[0] = 11
            assert pool.expire() == 2
            assert pool.idle_count() == 0
            reader, writer = await pool.acquire(origin)
            assert up.accepted == 4
            pool.discard(writer)

    run(go())


def test_a_connection_with_unread_bytes_is_closed_not_pooled() -> None:
    async def go() -> None:
        async with serving(None) as up:
            pool = ConnectionPool()
            origin = Origin("http", "127.0.0.1", up.port)
            reader, writer = await pool.acquire(origin)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the answer is never read
            await writer.drain()
            await asyncio.sleep(0.1)
            assert not pool.release(origin, reader, writer)
            assert pool.idle_count() == 0

    run(go())


def test_retain_drops_idle_connections_of_origins_no_longer_configured() -> None:
    async def go() -> None:
        async with serving(None) as up:
            pool = ConnectionPool()
            keep, drop = Origin("http", "127.0.0.1", up.port, trust=1), Origin("http", "127.0.0.1", up.port, trust=2)
            for origin in (keep, drop):
                reader, writer = await pool.acquire(origin)
                pool.release(origin, reader, writer)
            pool.retain(lambda o: o == keep)
            assert (pool.idle_count(keep), pool.idle_count(drop)) == (1, 0)
            pool.close_all()

    run(go())


@dataclass(frozen=True)
class Proxy:
    scheme: str
    address: tuple[str, int]
    authorization: str | None = None


@dataclass
class ConnectStub:
    """Just enough of a forward proxy to see what the pool sends it: CONNECT, then bytes both ways."""

    answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        writer.write(self.answer)
        await writer.drain()
        if not self.answer.startswith(b"HTTP/1.1 200"):
            writer.close()
            return
        host, port = head.split(b" ")[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_https_upstreams_are_tunnelled_through_the_forward_proxy_with_connect(ca: TestCA) -> None:
    async def go() -> None:
        stub = ConnectStub()
        proxy_server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        async with serving(server_tls(ca)) as up:
            pool = ConnectionPool(context_for=trusting(ca))
            proxy = Proxy("http", ("127.0.0.1", proxy_port), "Basic dTpw")
            origin = Origin("https", "localhost", up.port, proxy=proxy)
            for _ in range(3):
                reader, writer = await pool.acquire(origin)
                assert (await get(reader, writer)).endswith(b"ok")
                pool.release(origin, reader, writer)
            assert len(stub.heads) == 1
            assert stub.heads[0].startswith(f"CONNECT localhost:{up.port} HTTP/1.1\r\n".encode())
            assert b"Proxy-Authorization: Basic dTpw\r\n" in stub.heads[0]
            pool.close_all()
        proxy_server.close()

    run(go())


def test_a_refused_connect_is_an_oserror_naming_the_status() -> None:
    async def go() -> None:
        stub = ConnectStub(answer=b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        proxy_server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        origin = Origin("https", "registry.example", 443, proxy=Proxy("http", ("127.0.0.1", proxy_port)))
        with pytest.raises(TunnelError, match="407"):
            await open_stream(origin, ssl.create_default_context())
        assert issubclass(TunnelError, OSError)  # mitmproxy answers a failed connect 502
        proxy_server.close()

    run(go())


def test_a_cancelled_open_leaves_no_connection_behind() -> None:
    async def go() -> None:
        closed = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers the ClientHello; returns at EOF
            closed.set()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool()
        task = asyncio.create_task(pool.acquire(Origin("https", "localhost", port)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5)
        server.close()

    run(go())
