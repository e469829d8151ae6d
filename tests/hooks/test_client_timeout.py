"""steps/client_timeout.py: a client connection idle (or slow to send a request) past the timeout is closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hooks.conftest import request_flow
from mitmproxy import connection, exceptions, http
from mitmproxy.test import taddons, tflow
from regproxy.mitm import connections
from regproxy.steps import client_timeout
from regproxy.steps.client_timeout import ClientTimeout


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the client connections the addon closes."""
    ids: list[str] = []
    monkeypatch.setattr(client_timeout, "close_client", ids.append)
    return ids


@pytest.fixture
def tctx() -> Iterator[Any]:
    with taddons.context(ClientTimeout()) as tctx:
        yield tctx


@pytest.fixture
def addon(tctx: Any) -> ClientTimeout:
    found = tctx.master.addons.get("clienttimeout")
    assert isinstance(found, ClientTimeout)
    return found


def on(client: connection.Client, path: str = "/v2/") -> http.HTTPFlow:
    f = request_flow(path)
    f.client_conn = client
    return f


def new_client() -> connection.Client:
    client: connection.Client = tflow.tclient_conn()
    return client


def test_the_option_is_registered_with_60_seconds(tctx: Any) -> None:
    assert tctx.options.registryproxy_client_timeout == 60


@pytest.mark.parametrize("value", [0, -5])
def test_a_timeout_that_is_not_positive_is_refused(tctx: Any, addon: ClientTimeout, value: int) -> None:
    with pytest.raises(exceptions.OptionsError, match="registryproxy_client_timeout"):
        tctx.configure(addon, registryproxy_client_timeout=value)


def test_a_positive_timeout_is_accepted(tctx: Any, addon: ClientTimeout) -> None:
    tctx.configure(addon, registryproxy_client_timeout=5)
    assert tctx.options.registryproxy_client_timeout == 5


def test_a_request_counts_once_until_it_is_answered(addon: ClientTimeout) -> None:
    async def go() -> None:
        client = new_client()
        addon.client_connected(client)
        f = on(client)
        addon.request(f)
        addon.request(f)  # the same flow again (e.g. a replay of the hook)
        assert addon._clients[client.id].busy == 1
        addon.response(f)
        assert addon._clients[client.id].busy == 0
        addon.done()

    asyncio.run(go())


def test_a_failed_request_is_no_longer_busy(addon: ClientTimeout) -> None:
    async def go() -> None:
        client = new_client()
        addon.client_connected(client)
        f = on(client)
        addon.request(f)
        addon.error(f)
        assert addon._clients[client.id].busy == 0
        addon.done()

    asyncio.run(go())


def test_an_answer_for_a_request_never_counted_changes_nothing(addon: ClientTimeout) -> None:
    async def go() -> None:
        client = new_client()
        addon.client_connected(client)
        busy = on(client)
        addon.request(busy)
        addon.response(on(client))  # e.g. answered locally in `requestheaders`
        assert addon._clients[client.id].busy == 1
        addon.done()

    asyncio.run(go())


def test_a_request_of_an_unknown_client_is_ignored(addon: ClientTimeout) -> None:
    f = request_flow("/v2/")
    addon.request(f)
    addon.response(f)
    assert addon._clients == {}


def test_only_idle_clients_are_closed(tctx: Any, addon: ClientTimeout, closed: list[str]) -> None:
    tctx.configure(addon, registryproxy_client_timeout=1)

    async def go() -> None:
        idle, busy, gone = new_client(), new_client(), new_client()
        for client in (idle, busy, gone):
            addon.client_connected(client)
        working = on(busy)  # a request in progress on `busy`
        addon.request(working)
        addon.client_disconnected(gone)
        for _ in range(40):
            await asyncio.sleep(0.05)
            if closed:
                break
        await asyncio.sleep(0.3)  # one more check: the busy client stays open
        assert closed == [idle.id]
        assert idle.id not in addon._clients and busy.id in addon._clients
        assert working.live
        addon.done()

    asyncio.run(go())


def test_done_stops_the_check(addon: ClientTimeout) -> None:
    async def go() -> None:
        addon.client_connected(new_client())
        check = addon._check
        assert check is not None
        addon.done()
        await asyncio.sleep(0)
        assert check.cancelled()

    asyncio.run(go())


def test_closing_a_client_the_master_does_not_serve_is_a_no_op(tctx: Any) -> None:
    connections.close_client("no-such-client")  # no proxy server addon here: nothing to close, no error
