"""Streams lent to upstream connections (transport/lending.py) from a real pool, against a local server: a clean
close gives the stream back, anything else closes it; a broken resolver means no pooling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from regproxy.transport.lending import Lending
from regproxy.transport.pool import ConnectionPool, Origin


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in writers:
            w.close()
        server.close()


def lending_for(origin: Origin) -> Lending:
    lending = Lending()
    lending.use(ConnectionPool())
    lending.set_resolver(lambda scheme, host, port: origin if (host, port) == (origin.host, origin.port) else None)
    return lending


@pytest.mark.parametrize(("clean", "pooled"), [(True, 1), (False, 0)])
def test_a_closed_stream_goes_back_to_the_pool_only_when_clean(clean: bool, pooled: int) -> None:
    async def go() -> None:
        async with upstream() as port:
            origin = Origin("http", "127.0.0.1", port)
            lending = lending_for(origin)
            _, writer = await lending.lend(origin, "conn-1")
            lent = lending.lent("conn-1")
            assert lent is not None and lent.origin == origin
            lent.clean = clean
            writer.close()
            assert lending.lent("conn-1") is None and lent.done
            assert lending.pool is not None and lending.pool.idle_count(origin) == pooled
            lending.pool.close_all()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_a_clean_stream_to_an_origin_no_longer_resolved_is_closed() -> None:
    async def go() -> None:
        async with upstream() as port:
            origin = Origin("http", "127.0.0.1", port)
            lending = lending_for(origin)
            _, writer = await lending.lend(origin, "conn-1")
            lent = lending.lent("conn-1")
            assert lent is not None
            lent.clean = True
            lending.set_resolver(None)  # a reload that dropped the mapping
            writer.close()
            assert lending.pool is not None and lending.pool.idle_count() == 0

    asyncio.run(asyncio.wait_for(go(), 20))


def test_give_back_closes_what_is_still_lent_once() -> None:
    async def go() -> None:
        async with upstream() as port:
            origin = Origin("http", "127.0.0.1", port)
            lending = lending_for(origin)
            _, writer = await lending.lend(origin, "conn-1")
            lending.give_back("conn-1")
            assert lending.lent("conn-1") is None
            writer.close()  # mitmproxy closing it afterwards changes nothing
            lending.give_back("conn-1")
            assert lending.pool is not None and lending.pool.idle_count() == 0

    asyncio.run(asyncio.wait_for(go(), 20))


def test_a_failed_connect_is_one_line_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    ports: list[int] = []

    async def go() -> None:
        async with upstream() as port:
            ports.append(port)  # closed on leaving: nothing listens there any more
        origin = Origin("http", "127.0.0.1", port, label="team/")
        lending = lending_for(origin)
        with pytest.raises(OSError):
            await lending.lend(origin, "conn-1")
        assert lending.lent("conn-1") is None

    asyncio.run(asyncio.wait_for(go(), 20))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        f"registryproxy: upstream connection to http://127.0.0.1:{ports[0]} for mapping team/ failed: ConnectionRefusedError"
    ]


def test_a_broken_resolver_means_not_pooled(caplog: pytest.LogCaptureFixture) -> None:
    lending = Lending()

    def broken(scheme: str, host: str, port: int) -> Origin | None:
        raise RuntimeError("boom")

    lending.set_resolver(broken)
    assert lending.resolve("https", "registry.example", 443) is None
    assert [r.getMessage() for r in caplog.records] == ["upstream pool: resolver failed"]
