"""steps/rewrite.py: `ResponseRewrite` says the upstream's answer in local terms (errors, headers, links, tags)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hooks.conftest import BACKPLANE, config_text, nginx, request_flow, sample, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.flow.state import FlowState
from regproxy.mapping.matcher import Match
from regproxy.ops.metrics import Metrics
from regproxy.protocol.names import parse_route
from regproxy.steps import rewrite
from regproxy.steps.config_loader import Configuration
from regproxy.steps.rewrite import ResponseRewrite
from rig.keys import CAP

CONFIG = config_text(BACKPLANE, nginx())
BASE = "http://reg.test"
DIGEST = "sha256:" + "c" * 64


@pytest.fixture
def addon(config: Configuration, metrics: Metrics) -> Iterator[ResponseRewrite]:
    rr = ResponseRewrite(config, metrics)
    with taddons.context(rr):
        yield rr


def upstream_flow(
    config: Configuration, suffix: str, method: str = "GET", name: str = "bp/true"
) -> tuple[http.HTTPFlow, FlowState]:
    """A flow as routing leaves it: sent upstream for the local `name`."""
    assert config.state is not None
    match = config.state.matcher.match(name, None)
    assert match is not None
    f = request_flow(f"/v2/{name}{suffix}", method)
    st = with_state(f)
    st.kind, st.base, st.match, st.route = "upstream", BASE, match, parse_route(f"/v2/{name}{suffix}")
    f.request.url = f"{match.mapping.upstream.origin}/v2/{match.upstream_name}{suffix}"
    return f, st


def answer(
    addon: ResponseRewrite,
    f: http.HTTPFlow,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | http.Headers | None = None,
) -> http.Response:
    f.response = http.Response.make(status, body, headers if headers is not None else {})
    addon.responseheaders(f)
    assert f.response is not None
    return f.response


def sent(resp: http.Response, upstream_body: bytes) -> bytes:
    """What a streamed response sends for this upstream body."""
    assert callable(resp.stream)
    chunks = [resp.stream(upstream_body), resp.stream(b"")]
    return b"".join(c if isinstance(c, bytes) else b"".join(c) for c in chunks)


def codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


# --- guards -------------------------------------------------------------------------------


def test_a_flow_without_state_is_left_alone(addon: ResponseRewrite) -> None:
    f = request_flow("/v2/bp/true/manifests/v1")
    f.response = http.Response.make(404, b"upstream text", {"Server": "up"})
    addon.responseheaders(f)
    addon.response(f)
    assert f.response.content == b"upstream text" and f.response.headers["server"] == "up"


def test_a_local_answer_is_left_alone(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/manifests/v1")
    st.kind = "local"
    resp = answer(addon, f, 404, b"local", {"X-Local": "1"})
    addon.response(f)
    assert resp.content == b"local" and resp.headers["x-local"] == "1" and not resp.stream


def test_a_flow_without_a_response_is_left_alone(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/manifests/v1")
    addon.responseheaders(f)
    addon.response(f)
    assert f.response is None and st.upstream_status is None


# --- upstream errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "upstream", "status", "code"),
    [
        ("/manifests/v1", 404, 404, "MANIFEST_UNKNOWN"),
        (f"/blobs/{DIGEST}", 404, 404, "BLOB_UNKNOWN"),
        ("/tags/list", 404, 404, "NAME_UNKNOWN"),
        ("/manifests/v1", 403, 403, "DENIED"),
        ("/manifests/v1", 500, 502, "UNAVAILABLE"),
        ("/manifests/v1", 504, 504, "UNAVAILABLE"),
        ("/manifests/v1", 429, 429, "TOOMANYREQUESTS"),
        ("/manifests/v1", 418, 418, "UNSUPPORTED"),
    ],
)
def test_an_upstream_error_becomes_the_proxys_own(
    addon: ResponseRewrite, config: Configuration, suffix: str, upstream: int, status: int, code: str
) -> None:
    f, st = upstream_flow(config, suffix)
    upstream_body = b'{"errors":[{"code":"X","detail":{"name":"backplane/true"}}]}'
    resp = answer(addon, f, upstream, upstream_body, {"Server": "up", "Content-Length": str(len(upstream_body))})
    body = sent(resp, upstream_body)
    assert resp.status_code == status and codes(body) == [code] and b"backplane" not in body
    assert dict(resp.headers) == {
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": str(len(body)),
        "Docker-Distribution-Api-Version": "registry/2.0",
        "Connection": "close",  # the upstream body may still be coming: no other request on this connection
    }
    assert (st.upstream_status, st.error_body, st.streamed) == (upstream, body, True)


def test_the_replacement_body_is_sent_at_once_and_only_once(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, f"/blobs/{DIGEST}")
    resp = answer(addon, f, 404, b"", {"Content-Length": "1000"})
    assert callable(resp.stream)
    assert [resp.stream(b"part 1"), resp.stream(b"part 2"), resp.stream(b"")] == [st.error_body, b"", b""]


def test_an_http2_error_answer_keeps_the_connection(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/manifests/v1")
    f.request.http_version = "HTTP/2.0"
    assert "connection" not in answer(addon, f, 404).headers


def test_a_range_past_the_end_keeps_the_blobs_size(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, f"/blobs/{DIGEST}")
    resp = answer(addon, f, 416, b"", {"Content-Range": "bytes */100"})
    assert resp.status_code == 416 and resp.headers["content-range"] == "bytes */100"
    assert codes(sent(resp, b"")) == ["SIZE_INVALID"]


def test_an_upstream_401_gets_the_proxys_challenge_for_the_local_name(
    addon: ResponseRewrite, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[object] = []
    assert config.client is not None
    monkeypatch.setattr(config.client, "learn", lambda upstream, challenge: told.append(("learn", challenge)))
    monkeypatch.setattr(config.client, "drop_tokens", lambda mapping: told.append(("drop", mapping.key)))
    f, _ = upstream_flow(config, "/manifests/v1")
    upstream = 'Bearer realm="https://auth.up/token",service="up",scope="repository:backplane/true:pull"'
    resp = answer(addon, f, 401, b"", {"WWW-Authenticate": upstream})
    assert resp.headers["www-authenticate"] == (
        f'Bearer realm="{BASE}/token",service="reg.test",scope="repository:bp/true:pull",error="invalid_token"'
    )
    assert told == [("learn", upstream), ("drop", "bp/")]


def test_a_buffered_error_body_is_replaced_in_response(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/manifests/v9")
    answer(addon, f, 404)
    addon.response(f)
    assert f.response is not None and f.response.content == st.error_body
    assert codes(f.response.content or b"") == ["MANIFEST_UNKNOWN"]


def test_a_head_error_keeps_an_empty_body(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/manifests/v9", method="HEAD")
    answer(addon, f, 404)
    addon.response(f)
    assert f.response is not None and f.response.content == b""
    assert st.error_body is not None and f.response.headers["content-length"] == str(len(st.error_body))


# --- successful answers -------------------------------------------------------------------


def test_only_the_headers_a_client_needs_are_kept_and_the_body_streams(
    addon: ResponseRewrite, config: Configuration
) -> None:
    f, st = upstream_flow(config, f"/blobs/{DIGEST}")
    resp = answer(
        addon,
        f,
        206,
        b"",
        {
            "Content-Range": "bytes 0-9/100",
            "Docker-Content-Digest": DIGEST,
            "ETag": '"x"',
            "Set-Cookie": "s=1",
            "Server": "up/1",
            "Docker-Ratelimit-Source": "1.2.3.4",
            "Strict-Transport-Security": "max-age=1",
        },
    )
    assert {k.lower() for k in resp.headers} == {
        "content-range",
        "docker-content-digest",
        "etag",
        "content-length",
        "docker-distribution-api-version",
    }
    assert resp.stream is True and st.streamed and st.upstream_status == 206


def test_the_upstreams_api_version_header_is_kept(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/manifests/v1")
    resp = answer(addon, f, 200, b"", {"Docker-Distribution-Api-Version": "registry/2.1"})
    assert resp.headers["docker-distribution-api-version"] == "registry/2.1"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (f"/v2/backplane/true/blobs/{DIGEST}", f"/v2/bp/true/blobs/{DIGEST}"),
        ("http://127.0.0.1:5001/v2/backplane/true/blobs/x?y=1", "/v2/bp/true/blobs/x?y=1"),
        ("https://cdn.example.net/data?sig=1", "https://cdn.example.net/data?sig=1"),
        ("/docker/registry/v2/blobs/data", "http://127.0.0.1:5001/docker/registry/v2/blobs/data"),
        ("/v2/backplane/other/blobs/x", None),
        ("ftp://cdn.example.net/data", None),
    ],
)
def test_a_redirect_is_absolute_or_local(
    addon: ResponseRewrite, config: Configuration, location: str, expected: str | None
) -> None:
    f, _ = upstream_flow(config, f"/blobs/{DIGEST}")
    resp = answer(addon, f, 307, b"", {"Location": location})
    assert resp.headers.get("location") == expected


def test_a_capability_mappings_redirect_elsewhere_on_the_upstream_is_dropped(
    addon: ResponseRewrite, config: Configuration
) -> None:
    f, _ = upstream_flow(config, f"/blobs/{DIGEST}", name=f"{CAP}/nginx")
    resp = answer(addon, f, 307, b"", {"Location": "/docker/registry/v2/blobs/data"})
    assert "location" not in resp.headers


def test_redirects_are_counted_by_mapping(addon: ResponseRewrite, config: Configuration, metrics: Metrics) -> None:
    for status in (307, 200):
        f, _ = upstream_flow(config, f"/blobs/{DIGEST}")
        answer(addon, f, status, b"", {"Location": "https://cdn.example.net/data"})
    assert sample(metrics, "registryproxy_redirects_total", mapping="bp/") == 1


def test_links_are_rewritten_and_foreign_ones_dropped(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/referrers/" + DIGEST)
    links = ['</v2/backplane/true/referrers/x?n=1>; rel="next"', '</v2/backplane/other/tags/list>; rel="next"']
    resp = answer(addon, f, 200, b"", http.Headers([(b"Link", v.encode()) for v in links]))
    assert resp.headers.get_all("link") == ['</v2/bp/true/referrers/x?n=1>; rel="next"']


# --- tags lists ---------------------------------------------------------------------------


def test_a_tags_list_is_buffered_and_its_name_rewritten(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/tags/list")
    resp = answer(addon, f, 200, json.dumps({"name": "backplane/true", "tags": ["a", "b"]}).encode())
    assert not resp.stream and not st.streamed
    addon.response(f)
    assert f.response is not None and json.loads(f.response.content or b"") == {"name": "bp/true", "tags": ["a", "b"]}


def test_a_tags_list_is_paged_here_when_the_upstream_ignored_n(addon: ResponseRewrite, config: Configuration) -> None:
    f, st = upstream_flow(config, "/tags/list")
    st.page = {"n": "2"}
    answer(addon, f, 200, json.dumps({"name": "backplane/true", "tags": ["c", "a", "b"]}).encode())
    addon.response(f)
    assert f.response is not None and json.loads(f.response.content or b"")["tags"] == ["a", "b"]
    assert f.response.headers["link"] == '</v2/bp/true/tags/list?n=2&last=b>; rel="next"'


def test_a_head_of_a_tags_list_streams(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/tags/list", method="HEAD")
    assert answer(addon, f, 200).stream is True


def test_a_malformed_tags_list_is_502(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/tags/list")
    answer(addon, f, 200, b"<html>backplane/true</html>")
    addon.response(f)
    assert f.response is not None and f.response.status_code == 502
    assert codes(f.response.content or b"") == ["UNAVAILABLE"]


def test_an_oversized_tags_list_is_killed(addon: ResponseRewrite, config: Configuration) -> None:
    f, _ = upstream_flow(config, "/tags/list")
    f.response = http.Response.make(200)
    f.response.headers["Content-Length"] = str(rewrite.MAX_TAGS_BODY + 1)  # headers only: the body is to come
    addon.responseheaders(f)
    assert f.error is not None and not f.live


# --- failing closed -----------------------------------------------------------------------


def test_a_failure_in_responseheaders_kills_the_flow(
    addon: ResponseRewrite, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(location: str, request_url: str, match: Match) -> str:
        raise RuntimeError("broken")

    monkeypatch.setattr(rewrite, "rewrite_location", boom)
    f, _ = upstream_flow(config, f"/blobs/{DIGEST}")
    answer(addon, f, 307, b"", {"Location": "/v2/backplane/true/blobs/x"})
    assert f.error is not None and not f.live


def test_a_failure_in_response_kills_the_flow(
    addon: ResponseRewrite, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(body: bytes, match: Match, page: dict[str, str], has_link: bool) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(rewrite, "rewrite_tags", boom)
    f, _ = upstream_flow(config, "/tags/list")
    answer(addon, f, 200, b'{"name":"backplane/true","tags":[]}')
    addon.response(f)
    assert f.error is not None and not f.live
