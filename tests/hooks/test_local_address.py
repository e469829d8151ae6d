"""steps/local_address.py: a flow the proxy answered itself shows the proxy's address, as the client used it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hooks.conftest import Chain, config_text, request_flow, with_state
from mitmproxy import http
from regproxy.flow.state import FlowState
from regproxy.steps.local_address import LocalAddress, proxy_address

CONFIG = config_text()


def answered(host: str = "reg.test:5000", kind: str = "local", tls: bool = False) -> tuple[http.HTTPFlow, FlowState]:
    """A request the proxy answered itself (still aimed at the dead default target, 127.0.0.1:9)."""
    f = request_flow("/v2/", host=host)
    st = with_state(f)
    st.kind = kind  # type: ignore[assignment]
    f.client_conn.sockname = ("192.0.2.7", 5443)
    if tls:
        f.client_conn.timestamp_tls_setup = 1.0
    f.response = http.Response.make(401, b"{}")
    return f, st


@pytest.mark.parametrize(
    ("host", "tls", "url"),
    [
        ("reg.test:5000", False, "http://reg.test:5000/v2/"),
        ("reg.test", False, "http://reg.test/v2/"),
        ("REG.Example.COM", True, "https://reg.example.com/v2/"),
        ("reg.example.com:8443", True, "https://reg.example.com:8443/v2/"),
        ("127.0.0.1:38211", False, "http://127.0.0.1:38211/v2/"),
        ("[::1]:5000", False, "http://::1:5000/v2/"),  # mitmproxy keeps IPv6 hosts unbracketed
        ("", False, "http://192.0.2.7:5443/v2/"),  # no Host (HTTP/1.0): the socket the client reached
        ("bad host!", True, "https://192.0.2.7:5443/v2/"),
        ("reg.test:99999", False, "http://192.0.2.7:5443/v2/"),
    ],
)
def test_a_local_answer_shows_the_address_the_client_used(host: str, tls: bool, url: str) -> None:
    f, _ = answered(host, tls=tls)
    sent_host = f.request.headers.get("host")
    LocalAddress().responseheaders(f)
    assert f.request.url == url
    assert f.request.headers.get("host") == sent_host  # as the client sent it


@pytest.mark.parametrize("kind", ["local", "token"])
def test_a_failed_local_flow_shows_it_too(kind: str) -> None:
    f, _ = answered(kind=kind)
    f.response = None
    f.kill()
    LocalAddress().error(f)
    assert f.request.url == "http://reg.test:5000/v2/"


def test_upstream_flows_and_unanswered_ones_are_left_alone() -> None:
    up, _ = answered(kind="upstream")
    pending, _ = answered()
    pending.response = None
    bare = request_flow("/v2/")  # no flow state: never taken by the chain
    bare.response = http.Response.make(200)
    for f in (up, pending, bare):
        LocalAddress().responseheaders(f)
        LocalAddress().error(f)
        assert (f.request.host, f.request.port) == ("127.0.0.1", 9)


def test_no_address_at_all_leaves_the_flow_alone() -> None:
    f, _ = answered("")
    f.client_conn.sockname = None  # type: ignore[assignment]
    assert proxy_address(f) is None
    LocalAddress().responseheaders(f)
    assert (f.request.host, f.request.port) == ("127.0.0.1", 9)


def test_a_failure_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(flow: http.HTTPFlow) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr("regproxy.steps.local_address.proxy_address", boom)
    f, _ = answered()
    LocalAddress().responseheaders(f)
    assert f.error is not None and not f.live


def test_through_the_chain_the_ping_shows_the_proxy_once_answered(make_chain: Any) -> None:
    chain: Chain = make_chain(CONFIG)
    f = request_flow("/v2/", host="reg.test:5000")

    async def go() -> None:
        await chain.hook("requestheaders", f)
        assert f.response is not None and f.response.status_code == 401
        assert (f.request.host, f.request.port) == ("127.0.0.1", 9)  # never routed
        await chain.hook("request", f)
        await chain.hook("responseheaders", f)  # mitmproxy runs it for local answers, right before the send
        await chain.hook("response", f)

    asyncio.run(go())
    assert f.request.url == "http://reg.test:5000/v2/"
    assert "answered locally (401)" in f.comment
