"""steps/keep_bodies.py: which upstream bodies are read whole and kept in the flow, and what a flow shows after the send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hooks.conftest import Chain, config_text, request_flow, with_state
from mitmproxy import contentviews, exceptions, http
from mitmproxy.test import taddons
from regproxy.flow import state as flowstate
from regproxy.flow.state import FlowState
from regproxy.protocol.names import RouteKind, parse_route
from regproxy.steps import keep_bodies
from regproxy.steps.keep_bodies import DEFAULT_KEEP_BLOB_SIZE, MAX_KEPT_BODY, OPTION, KeepBodies, keeps
from regproxy.steps.veil import MAX_SCRUBBED_BODY
from regproxy.tokens.paseto import Grant

DIGEST = "sha256:" + "c" * 64
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG = config_text(upstream_timeout=5)


@pytest.fixture
def addon() -> Iterator[KeepBodies]:
    a = KeepBodies()
    with taddons.context(a):
        yield a


def answer(status: int = 200, length: int | None = 1000, **headers: str) -> http.Response:
    """An upstream answer's head, as `ResponseRewrite` leaves it: streaming."""
    fields = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    if length is not None:
        fields.append((b"Content-Length", str(length).encode()))
    resp = http.Response(b"HTTP/1.1", status, b"", http.Headers(fields), None, None, 0, None)
    resp.stream = True
    return resp


def upstream_flow(path: str, resp: http.Response, method: str = "GET") -> tuple[http.HTTPFlow, FlowState]:
    f = request_flow(path, method)
    st = with_state(f)
    st.kind, st.route, st.streamed = "upstream", parse_route(path), True
    f.response = resp
    return f, st


# --- the decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "method", "resp", "limit", "kept"),
    [
        (RouteKind.MANIFEST, "GET", answer(length=2000), 0, True),
        (RouteKind.MANIFEST, "GET", answer(length=MAX_KEPT_BODY), 0, True),
        (RouteKind.MANIFEST, "GET", answer(length=MAX_KEPT_BODY + 1), 0, False),
        (RouteKind.REFERRERS, "GET", answer(length=300), 0, True),
        (RouteKind.BLOB, "GET", answer(length=1500), DEFAULT_KEEP_BLOB_SIZE, True),
        (RouteKind.BLOB, "GET", answer(length=DEFAULT_KEEP_BLOB_SIZE), DEFAULT_KEEP_BLOB_SIZE, True),
        (RouteKind.BLOB, "GET", answer(length=DEFAULT_KEEP_BLOB_SIZE + 1), DEFAULT_KEEP_BLOB_SIZE, False),
        (RouteKind.BLOB, "GET", answer(length=1 << 30), DEFAULT_KEEP_BLOB_SIZE, False),
        (RouteKind.BLOB, "GET", answer(length=10), 0, False),  # the option at 0 keeps no blob
        (RouteKind.BLOB, "GET", answer(length=0), 0, True),  # nothing to keep, nothing to stream
        (RouteKind.MANIFEST, "HEAD", answer(length=2000), 0, False),  # no body
        (RouteKind.BLOB, "GET", answer(206, length=100), DEFAULT_KEEP_BLOB_SIZE, False),  # a range
        (RouteKind.BLOB, "GET", answer(307, length=100, Location="https://cdn/x?sig"), DEFAULT_KEEP_BLOB_SIZE, False),
        (RouteKind.MANIFEST, "GET", answer(length=None), 0, False),  # until the connection closes
        (RouteKind.MANIFEST, "GET", answer(length=None, Transfer_Encoding="chunked"), 0, False),
        (RouteKind.MANIFEST, "GET", answer(length=100, Transfer_Encoding="chunked"), 0, False),
        (RouteKind.MANIFEST, "GET", answer(length=100, Content_Encoding="gzip"), 0, False),  # could not be scrubbed
        (RouteKind.MANIFEST, "GET", answer(length=100, Content_Encoding="identity"), 0, True),
        (RouteKind.MANIFEST, "GET", answer(length=None, Content_Length="1e3"), 0, False),
        (RouteKind.MANIFEST, "GET", answer(length=None, Content_Length="-1"), 0, False),
        (RouteKind.MANIFEST, "GET", answer(length=None, Content_Length="9" * 40), 0, False),
        (RouteKind.TAGS, "GET", answer(length=100), DEFAULT_KEEP_BLOB_SIZE, False),  # the rewrite's business
        (RouteKind.PING, "GET", answer(length=2), DEFAULT_KEEP_BLOB_SIZE, False),
    ],
)
def test_what_is_kept(kind: RouteKind, method: str, resp: http.Response, limit: int, kept: bool) -> None:
    assert keeps(kind, method, resp, limit) is kept


def test_kept_bodies_are_never_beyond_what_veil_scrubs() -> None:
    assert MAX_KEPT_BODY <= MAX_SCRUBBED_BODY and MAX_KEPT_BODY <= 4 * 1024 * 1024


# --- the option -----------------------------------------------------------------------------------


def test_the_option_sets_the_blob_limit(addon: KeepBodies) -> None:
    assert addon.blob_limit == DEFAULT_KEEP_BLOB_SIZE
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **{OPTION: 4096})
        assert addon.blob_limit == 4096
        tctx.configure(addon, **{OPTION: 0})
        assert addon.blob_limit == 0


@pytest.mark.parametrize("value", [-1, MAX_KEPT_BODY + 1])
def test_an_out_of_range_option_is_refused(addon: KeepBodies, value: int) -> None:
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError, match=OPTION):
        tctx.configure(addon, **{OPTION: value})


def test_loading_registers_the_oci_view(addon: KeepBodies) -> None:
    assert contentviews.registry["oci"].name == "OCI"


# --- the hooks ------------------------------------------------------------------------------------


def test_a_small_manifest_is_buffered_not_streamed(addon: KeepBodies) -> None:
    f, st = upstream_flow("/v2/bp/true/manifests/v1", answer(length=1200, Content_Type=MANIFEST_TYPE))
    addon.responseheaders(f)
    assert f.response is not None and f.response.stream is False and not st.streamed


def test_a_large_blob_still_streams(addon: KeepBodies) -> None:
    f, st = upstream_flow(f"/v2/bp/true/blobs/{DIGEST}", answer(length=DEFAULT_KEEP_BLOB_SIZE + 1))
    addon.responseheaders(f)
    assert f.response is not None and f.response.stream is True and st.streamed


@pytest.mark.parametrize("case", ["replaced error", "buffered tags", "local", "no route", "no state"])
def test_what_the_rewrite_did_otherwise_is_left_alone(addon: KeepBodies, case: str) -> None:
    def replace(data: bytes) -> bytes:
        return b"{}"

    f, st = upstream_flow("/v2/bp/true/manifests/v1", answer(length=100))
    assert f.response is not None
    if case == "replaced error":
        st.error_body, f.response.stream = b"{}", replace
    elif case == "buffered tags":
        st.streamed, f.response.stream = False, False
    elif case == "local":
        st.kind = "local"
    elif case == "no route":
        st.route = None
    else:
        f = request_flow("/v2/bp/true/manifests/v1")
        f.response = answer(length=100)
    before = f.response.stream if f.response else None
    addon.responseheaders(f)
    assert f.response is not None and f.response.stream is before


def test_a_streamed_error_shows_the_registry_error_the_client_was_sent(addon: KeepBodies) -> None:
    f, st = upstream_flow("/v2/bp/true/manifests/v9", answer(404, length=61))  # streamed: no content
    st.error_body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
    addon.response(f)
    assert f.response is not None and f.response.raw_content == st.error_body


def test_a_streamed_redirect_shows_an_empty_body_not_the_upstreams_page(addon: KeepBodies) -> None:
    f, _ = upstream_flow(f"/v2/bp/true/blobs/{DIGEST}", answer(307, length=120))
    assert f.response is not None
    f.response.headers["Location"] = "https://cdn.example.net/blob?[redacted]"  # streamed: no content
    addon.response(f)
    assert f.response.raw_content == b""


@pytest.mark.parametrize("case", ["HEAD", "blob", "kept", "no location"])
def test_other_answers_keep_what_they_hold(addon: KeepBodies, case: str) -> None:
    status = 200 if case in ("blob", "kept") else 307
    method = "HEAD" if case == "HEAD" else "GET"
    f, st = upstream_flow(f"/v2/bp/true/blobs/{DIGEST}", answer(status, length=120), method)
    assert f.response is not None
    if case != "no location":
        f.response.headers["Location"] = "https://cdn.example.net/blob"
    if case == "kept":
        st.streamed, f.response.data.content = False, b"x" * 120
    else:
        f.response.data.content = None
    before = f.response.raw_content
    addon.response(f)
    assert f.response.raw_content == before


def test_a_failure_kills_the_flow(addon: KeepBodies, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> bool:
        raise RuntimeError("broken")

    monkeypatch.setattr(keep_bodies, "keeps", boom)
    f, _ = upstream_flow("/v2/bp/true/manifests/v1", answer(length=100))
    addon.responseheaders(f)
    assert f.error is not None and not f.live


# --- in the chain ---------------------------------------------------------------------------------


def test_through_the_chain_a_kept_manifest_is_sent_whole_shown_scrubbed_and_counted(make_chain: Any) -> None:
    chain: Chain = make_chain(CONFIG)
    mapping = next(m for m in chain.state.config.mappings if m.key == "bp/")
    tok = chain.state.codec.issue_access("http://reg.test", (Grant(mapping.identity, ("bp/true",), "UP"),), 60)
    body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "token": "looks-secret"}).encode()
    f = request_flow("/v2/bp/true/manifests/v1", headers=[("Authorization", f"Bearer {tok}")])

    async def go() -> None:
        await chain.hook("requestheaders", f)
        await chain.hook("request", f)
        assert f.response is None and f.request.port == 5001  # routed upstream
        f.response = http.Response.make(200, b"", {"Content-Type": MANIFEST_TYPE, "Content-Length": str(len(body))})
        f.response.data.content = None  # the head only, as mitmproxy has it at `responseheaders`
        await chain.hook("responseheaders", f)
        assert f.response.stream is False  # read whole, then sent
        f.response.data.content = body
        await chain.hook("response", f, update=False)
        shown = f.response.raw_content or b""
        assert b"looks-secret" not in shown and json.loads(shown)["token"] == "[redacted]"
        await chain.update(f)  # `Courier`: what is sent right after
        assert f.response.raw_content == body

    asyncio.run(go())
    st = flowstate.of(f)
    assert st is not None and st.bytes_streamed == len(body) and not st.timed_out and not st.streamed
    assert "upstream 200" in f.comment and not f.marked
