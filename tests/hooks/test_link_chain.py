"""Share links through the whole chain in-process (token endpoint, routing, access log, veil), with a clock
the test sets and upstream token requests answered without a network."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

import pytest
import yaml
from hooks.conftest import BACKPLANE, ROBOT, Chain, config_text, nginx, request_flow
from mitmproxy import http
from regproxy.config import Mapping
from regproxy.flow import state as flowstate
from regproxy.links import mint
from regproxy.upstream.auth import UpstreamToken
from rig.keys import CAP

KEY = "ab" * 32  # hooks.conftest.KEY: the secret key of config_text
CONFIG = config_text(BACKPLANE, nginx(**ROBOT))
HOST = "reg.test"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Proxy:
    def __init__(self, chain: Chain, clock: Clock, fetched: list[tuple[str, list[str]]]) -> None:
        self.chain, self.clock, self.fetched = chain, clock, fetched
        self.seen: list[str] = []  # what flows showed before each update

    def link(self, key: str, seconds: float, secret: str = KEY) -> tuple[str, str]:
        link, made = mint(bytes.fromhex(secret), key, int(self.clock.now + seconds))
        return link, made.id

    def token(self, name: str) -> dict[str, Any]:
        f = request_flow(f"/token?service={HOST}&scope=repository:{name}:pull")
        self.run(f)
        assert f.response is not None and f.response.status_code == 200
        body: dict[str, Any] = json.loads(f.response.content or b"")
        return body

    def get(self, name: str, token: str | None = None, suffix: str = "/manifests/v1") -> http.HTTPFlow:
        headers = [("Authorization", f"Bearer {token}")] if token else []
        f = request_flow(f"/v2/{name}{suffix}", headers=headers)
        self.run(f)
        return f

    def run(self, f: http.HTTPFlow) -> None:
        """The hooks of a flow, noting what the flow shows before each update (what mitmweb gets, what a
        flow dump keeps); the update's courier then puts in what is sent."""

        async def hook(name: str) -> None:
            await self.chain.hook(name, f, update=False)
            self.seen.append(shown(f))
            await self.chain.update(f)

        async def hooks() -> None:
            await hook("requestheaders")
            if f.response is None:
                await hook("request")
            if f.response is not None:
                await hook("response")

        asyncio.run(hooks())

    def reload(self, text: str) -> None:
        with open(self.chain.state.path, "w", encoding="utf-8") as out:
            out.write(text)
        assert self.chain.config.reload("test")


@pytest.fixture
def proxy(make_chain: Any, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    chain: Chain = make_chain(CONFIG)
    clock = Clock()
    chain.config.clock = clock
    fetched: list[tuple[str, list[str]]] = []

    async def fetch_token(mapping: Mapping, upstream_names: list[str]) -> UpstreamToken:
        fetched.append((mapping.key, upstream_names))
        return UpstreamToken("UPSTREAM-TOKEN", time.time() + 300, time.time())

    assert chain.config.client is not None
    monkeypatch.setattr(chain.config.client, "fetch_token", fetch_token)
    return Proxy(chain, clock, fetched)


def routed(f: http.HTTPFlow) -> bool:
    return f.response is None and f.request.host == "127.0.0.1" and f.request.port != 9


def error(f: http.HTTPFlow) -> tuple[int, str, str]:
    assert f.response is not None
    [e] = json.loads(f.response.content or b"")["errors"]
    return f.response.status_code, e["code"], e["message"]


def shown(f: http.HTTPFlow) -> str:
    """Everything the flow shows (mitmweb, a flow dump): request, response and comment."""
    parts = [f.request.url, str(f.request.headers), f.comment, (f.request.content or b"").decode("latin-1")]
    if f.response is not None:
        parts += [str(f.response.headers), (f.response.content or b"").decode("latin-1")]
    return "\n".join(parts)


def test_a_namespace_link_is_routed_as_its_mapping(proxy: Proxy) -> None:
    link, link_id = proxy.link("bp/", 3600)
    body = proxy.token(f"{link}/app")
    f = proxy.get(f"{link}/app", body["token"])
    assert routed(f) and f.request.url == "http://127.0.0.1:5001/v2/backplane/app/manifests/v1"
    assert proxy.fetched == [("bp/", ["backplane/app"])]
    st = flowstate.of(f)
    assert st is not None and st.link == link_id and st.match is not None and st.match.mapping.key == "bp/"
    assert link not in f.comment and f"<link:{link_id}>/app" in f.comment


def test_a_capability_link_serves_the_keys_last_segment(proxy: Proxy) -> None:
    link, _ = proxy.link(f"{CAP}/nginx", 3600)
    body = proxy.token(f"{link}/nginx")
    f = proxy.get(f"{link}/nginx", body["token"])
    assert routed(f) and f.request.url == "http://127.0.0.1:5003/v2/private/nginx/manifests/v1"
    assert f.request.headers.get("authorization") == "Bearer UPSTREAM-TOKEN"  # put in by the courier
    assert CAP not in f.comment and link not in f.comment


def test_a_token_expires_no_later_than_its_link_and_then_the_link_is_refused(proxy: Proxy) -> None:
    link, _ = proxy.link("bp/", 5)
    body = proxy.token(f"{link}/app")
    assert body["expires_in"] <= 5
    assert routed(proxy.get(f"{link}/app", body["token"]))
    proxy.clock.now += 6
    # The token went with the link: the client is challenged, asks again, and is told why.
    f = proxy.get(f"{link}/app", body["token"])
    assert f.response is not None and f.response.status_code == 401
    again = proxy.token(f"{link}/app")
    f = proxy.get(f"{link}/app", again["token"])
    status, code, message = error(f)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(proxy.clock.now - 6 + 5)))
    assert (status, code, message) == (403, "DENIED", f"this link expired at {expiry}")
    assert link not in "\n".join(proxy.seen)


def test_a_revocation_stops_a_token_already_issued_at_the_next_request(proxy: Proxy) -> None:
    link, link_id = proxy.link("bp/", 3600)
    body = proxy.token(f"{link}/app")
    assert routed(proxy.get(f"{link}/app", body["token"]))
    proxy.reload(config_text(BACKPLANE, nginx(**ROBOT), revoked_links=[link_id]))
    f = proxy.get(f"{link}/app", body["token"])
    assert error(f) == (403, "DENIED", "this link was revoked")
    # A new token grants nothing through it either.
    f = proxy.get(f"{link}/app", proxy.token(f"{link}/app")["token"])
    assert error(f) == (403, "DENIED", "this link was revoked")
    # Another link of the same mapping is untouched.
    other, _ = proxy.link("bp/", 3600)
    assert routed(proxy.get(f"{other}/app", proxy.token(f"{other}/app")["token"]))


def test_a_rotation_keeps_links_of_a_listed_key(proxy: Proxy) -> None:
    link, _ = proxy.link("bp/", 3600)
    new = secrets.token_hex(32)
    rotated = yaml.safe_load(config_text(BACKPLANE))
    del rotated["secretkey"]
    proxy.reload(yaml.safe_dump({"secretkeys": [new, KEY], **rotated}))
    assert routed(proxy.get(f"{link}/app", proxy.token(f"{link}/app")["token"]))
    proxy.reload(config_text(BACKPLANE, secretkey=new))
    f = proxy.get(f"{link}/app", proxy.token(f"{link}/app")["token"])
    assert error(f)[:2] == (404, "NAME_UNKNOWN")


def non_genuine(proxy: Proxy) -> dict[str, str]:
    link, _ = proxy.link("bp/", 3600)
    foreign, _ = proxy.link("bp/", 3600, secret="cd" * 32)
    i = 40
    tampered = link[:i] + ("a" if link[i] != "a" else "b") + link[i + 1 :]
    return {
        "unknown": "nope",
        "tampered": tampered,
        "foreign": foreign,
        "random": "rpl1" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(64)),
        "garbage": secrets.token_hex(34),
    }


def test_a_non_genuine_link_is_answered_as_an_unknown_name_byte_for_byte(proxy: Proxy) -> None:
    answers = {}
    for kind, segment in non_genuine(proxy).items():
        name = f"{segment}/app"
        challenge = proxy.get(name)
        assert challenge.response is not None and challenge.response.status_code == 401
        body = proxy.token(name)
        f = proxy.get(name, body["token"])
        assert f.response is not None and not routed(f)
        answers[kind] = (
            challenge.response.content,
            sorted(challenge.response.headers.items(multi=True)),
            sorted(body),
            body["expires_in"],
            f.response.status_code,
            f.response.content,
            sorted(f.response.headers.items(multi=True)),
        )
        if segment.startswith("rpl1"):  # of a link's shape: hidden as a link is (the others are names)
            assert segment not in "\n".join(proxy.seen)
    assert error(f)[:2] == (404, "NAME_UNKNOWN")
    # The challenge names the scope, so its header differs by the name; everything else is the same.
    unknown = answers.pop("unknown")
    for kind, got in answers.items():
        assert got[0] == unknown[0] and got[2:] == unknown[2:], kind
        assert len(got[1]) == len(unknown[1]), kind
    assert proxy.fetched == []  # nothing asked of any upstream


def test_the_access_log_names_the_link_by_id_only(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    link, link_id = proxy.link("bp/", 3600)
    with caplog.at_level(logging.DEBUG):
        body = proxy.token(f"{link}/app")
        proxy.reload(config_text(BACKPLANE, revoked_links=[link_id]))
        proxy.get(f"{link}/app", body["token"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert link not in text
    lines = [r.getMessage() for r in caplog.records if r.name == "registryproxy" and " status=" in r.getMessage()]
    assert len(lines) == 2 and all(line.endswith(f" link={link_id}") for line in lines)
    assert f"<link:{link_id}>/app/manifests/v1" in lines[1] and "status=403" in lines[1]
    metrics = proxy.chain.config.metrics
    assert metrics.registry.get_sample_value(
        "registryproxy_link_requests_total", {"link": link_id, "state": "revoked"}
    ) == pytest.approx(1.0)


def test_the_token_endpoint_flow_holds_no_link(proxy: Proxy) -> None:
    link, _ = proxy.link("bp/", 3600)
    f = request_flow("/token", method="POST", headers=[("Content-Type", "application/x-www-form-urlencoded")])
    f.request.content = (
        f"grant_type=password&username=u&password=p&service={HOST}&scope=repository:{link}/app:pull".encode()
    )
    proxy.run(f)
    assert f.response is not None and f.response.status_code == 200
    # From the `request` hook on (mitmproxy has read the body by then; at `requestheaders` it has not).
    assert link not in "\n".join(proxy.seen[1:]) and "password=p" not in "\n".join(proxy.seen[1:])
