"""steps/cache.py: the cache's plans and answers in the whole chain, with a real directory store.

The upstream is httpx's MockTransport behind the configuration's RegistryClient (its one test seam,
`_http`): it answers the HEADs and GETs the cache itself sends, and counts them. What mitmproxy would
fetch upstream for a flow the chain sends on is given as the flow's response, as in test_chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hooks.conftest import BACKPLANE, Chain, config_text, request_flow, sample
from mitmproxy import http
from regproxy.flow import state as flowstate
from regproxy.flow.state import FlowState
from regproxy.ops.metrics import Metrics
from regproxy.steps.access_log import AccessLog
from regproxy.steps.cache import Cache
from regproxy.tokens.paseto import Grant

HOST = "reg.test"
BASE = f"http://{HOST}"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OTHER = {"bq/": {"registry": "http://127.0.0.1:5001", "remote": "elsewhere"}}


@dataclass
class Upstream:
    """What the cache's own upstream requests get: the tag `v1` names MANIFEST; `fail` answers every request
    with that status (0: connection refused)."""

    tags: dict[str, bytes] = field(default_factory=lambda: {"v1": MANIFEST})
    fail: int | None = None
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        if self.fail == 0:
            raise httpx.ConnectError("refused", request=request)
        if self.fail is not None:
            return httpx.Response(self.fail, headers={"Retry-After": "7"})
        ref = request.url.path.rsplit("/", 1)[-1]
        body = self.tags.get(ref) or next((b for b in self.tags.values() if _digest(b) == ref), None)
        if body is None:
            return httpx.Response(404)
        headers = {"Content-Type": INDEX_TYPE, "Docker-Content-Digest": _digest(body), "Content-Length": str(len(body))}
        return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def proxy(make_chain: Callable[[str], Chain], tmp_path: Path, upstream: Upstream) -> Chain:
    return cached_chain(make_chain, tmp_path, upstream)


def cached_chain(make_chain: Callable[[str], Chain], tmp_path: Path, upstream: Upstream, **cache: Any) -> Chain:
    settings = {"store": str(tmp_path / "store"), "max_size": "1GB", **cache}
    chain = make_chain(
        config_text(BACKPLANE, OTHER, {"nc/": {"registry": "http://127.0.0.1:5001", "cache": False}}, cache=settings)
    )
    client = chain.config.client
    assert client is not None
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return chain


def pull(chain: Chain, path: str, key: str = "bp/", method: str = "GET") -> tuple[http.HTTPFlow, FlowState]:
    """A client's pull request with a token for the name in `path`, through the request hooks."""
    name = path.split("/v2/", 1)[1].rsplit("/manifests/", 1)[0].rsplit("/blobs/", 1)[0]
    mid = next(m.identity for m in chain.state.config.mappings if m.key == key)
    token = chain.state.codec.issue_access(BASE, (Grant(mid, (name,), "UPSTREAM-TOKEN"),), 60)
    f = request_flow(path, method, [("Authorization", f"Bearer {token}"), ("Accept", INDEX_TYPE)], HOST)

    async def run() -> None:
        await chain.hook("requestheaders", f)
        await chain.hook("request", f)

    asyncio.run(run())
    st = flowstate.of(f)
    assert st is not None
    return f, st


def answer(chain: Chain, f: http.HTTPFlow, body: bytes, status: int = 200) -> None:
    """The upstream's answer to a flow the chain sent on, through the response hooks."""
    headers = {"Content-Type": INDEX_TYPE, "Content-Length": str(len(body)), "Docker-Content-Digest": _digest(body)}
    f.response = http.Response.make(status, body if f.request.method == "GET" else b"", headers)

    async def run() -> None:
        await chain.hook("responseheaders", f)
        await chain.hook("response", f)

    asyncio.run(run())


def metrics(chain: Chain) -> Metrics:
    return chain.find(AccessLog).metrics


def test_a_tag_is_asked_with_a_head_then_served_from_the_store(proxy: Chain, upstream: Upstream) -> None:
    f, st = pull(proxy, "/v2/bp/true/manifests/v1")
    assert st.cache == "fill" and f.response is None and f.request.host == "127.0.0.1" and f.request.port == 5001
    answer(proxy, f, MANIFEST)
    assert upstream.seen == [("HEAD", "/v2/backplane/true/manifests/v1")]
    for _ in range(3):
        g, st2 = pull(proxy, "/v2/bp/true/manifests/v1")
        assert st2.cache == "hit" and g.response is not None and g.response.status_code == 200
        assert g.response.content == MANIFEST
        assert g.response.headers["docker-content-digest"] == DIGEST
        assert g.response.headers["content-type"] == INDEX_TYPE
    assert [m for m, _ in upstream.seen] == ["HEAD"] * 4  # never a GET from the cache itself
    assert sample(metrics(proxy), "registryproxy_cache_manifest_gets_saved_total") == 3
    assert sample(metrics(proxy), "registryproxy_cache_requests_total", kind="manifest", outcome="hit") == 3


def test_a_digest_once_stored_needs_no_upstream_request(proxy: Chain, upstream: Upstream) -> None:
    f, st = pull(proxy, f"/v2/bp/true/manifests/{DIGEST}")
    assert st.cache == "fill"
    answer(proxy, f, MANIFEST)
    g, st2 = pull(proxy, f"/v2/bp/true/manifests/{DIGEST}", method="HEAD")
    assert st2.cache == "hit" and g.response is not None
    assert g.response.headers["content-length"] == str(len(MANIFEST)) and g.response.content == b""
    assert upstream.seen == []


def test_a_manifest_that_does_not_match_its_digest_is_not_stored(proxy: Chain, upstream: Upstream) -> None:
    f, _ = pull(proxy, f"/v2/bp/true/manifests/{DIGEST}")
    answer(proxy, f, MANIFEST + b" ")
    _, st = pull(proxy, f"/v2/bp/true/manifests/{DIGEST}")
    assert st.cache == "fill"


def test_another_mapping_never_sees_what_one_stored(proxy: Chain, upstream: Upstream) -> None:
    f, _ = pull(proxy, f"/v2/bp/true/manifests/{DIGEST}")
    answer(proxy, f, MANIFEST)
    # The same digest through another mapping (another upstream repository): upstream, as if never stored.
    g, st = pull(proxy, f"/v2/bq/true/manifests/{DIGEST}", key="bq/")
    assert st.cache == "fill" and g.response is None and g.request.path == f"/v2/elsewhere/true/manifests/{DIGEST}"
    # ...and another repository of the same mapping likewise.
    h, st2 = pull(proxy, f"/v2/bp/other/manifests/{DIGEST}")
    assert st2.cache == "fill" and h.response is None


@pytest.mark.parametrize("fail", [0, 503, 429])
def test_a_failing_upstream_gets_the_stale_tag(proxy: Chain, upstream: Upstream, fail: int) -> None:
    f, _ = pull(proxy, "/v2/bp/true/manifests/v1")
    answer(proxy, f, MANIFEST)
    upstream.fail = fail
    g, st = pull(proxy, "/v2/bp/true/manifests/v1")
    assert st.cache == "stale" and g.response is not None and g.response.content == MANIFEST
    assert sample(metrics(proxy), "registryproxy_cache_stale_total", mapping="bp/") == 1
    # A tag never seen gets the failure's registry error.
    h, st2 = pull(proxy, "/v2/bp/true/manifests/v2")
    assert st2.cache == "miss" and h.response is not None
    status = {0: 502, 503: 502, 429: 429}[fail]
    assert h.response.status_code == status
    assert json.loads(h.response.content or b"")["errors"][0]["code"] in ("UNAVAILABLE", "TOOMANYREQUESTS")


def test_stale_if_error_zero_answers_the_error(
    make_chain: Callable[[str], Chain], tmp_path: Path, upstream: Upstream
) -> None:
    chain = cached_chain(make_chain, tmp_path, upstream, stale_if_error="0s")
    f, _ = pull(chain, "/v2/bp/true/manifests/v1")
    answer(chain, f, MANIFEST)
    upstream.fail = 0
    g, st = pull(chain, "/v2/bp/true/manifests/v1")
    assert st.cache == "miss" and g.response is not None and g.response.status_code == 502


def test_tag_ttl_trusts_the_tag_without_asking(
    make_chain: Callable[[str], Chain], tmp_path: Path, upstream: Upstream
) -> None:
    chain = cached_chain(make_chain, tmp_path, upstream, tag_ttl="1h")
    f, _ = pull(chain, "/v2/bp/true/manifests/v1")
    answer(chain, f, MANIFEST)
    upstream.seen.clear()
    _, st = pull(chain, "/v2/bp/true/manifests/v1")
    assert st.cache == "hit" and upstream.seen == []


def test_an_unknown_tag_is_answered_as_the_upstream_does(proxy: Chain, upstream: Upstream) -> None:
    f, st = pull(proxy, "/v2/bp/true/manifests/nope")
    assert st.cache == "miss" and f.response is not None and f.response.status_code == 404
    assert json.loads(f.response.content or b"")["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_a_head_by_tag_not_stored_is_answered_from_the_upstreams_head(proxy: Chain, upstream: Upstream) -> None:
    f, st = pull(proxy, "/v2/bp/true/manifests/v1", method="HEAD")
    assert st.cache == "miss" and f.response is not None and f.response.status_code == 200
    assert f.response.headers["docker-content-digest"] == DIGEST
    assert f.response.headers["content-length"] == str(len(MANIFEST))


def test_a_blob_get_goes_to_the_blob_server_without_the_upstream_credential(proxy: Chain) -> None:
    blob = "sha256:" + "b" * 64
    f, st = pull(proxy, f"/v2/bp/true/blobs/{blob}")
    cache = proxy.find(Cache)
    assert st.cache == "fill" and f.response is None
    service = cache.holder.service
    assert service is not None and f.request.host == "127.0.0.1" and f.request.port == service.port
    assert f.request.path.startswith("/t/") and "authorization" not in f.request.headers
    assert st.upstream_auth is None


def test_a_mapping_without_cache_is_off(proxy: Chain, upstream: Upstream) -> None:
    f, st = pull(proxy, "/v2/nc/true/manifests/v1", key="nc/")
    assert st.cache == "off" and f.response is None and upstream.seen == []


def test_a_reload_applies_sizes_and_times_and_a_new_store(
    make_chain: Callable[[str], Chain], tmp_path: Path, upstream: Upstream
) -> None:
    chain = cached_chain(make_chain, tmp_path, upstream)
    f, _ = pull(chain, "/v2/bp/true/manifests/v1")
    answer(chain, f, MANIFEST)
    cache = chain.find(Cache)
    first = cache.holder.service
    assert first is not None and first.index.max_size == 10**9
    path = Path(chain.state.path)
    settings = {"store": str(tmp_path / "store"), "max_size": "2GB", "tag_ttl": "1h"}
    path.write_text(config_text(BACKPLANE, OTHER, cache=settings))
    assert chain.config.reload("test")
    upstream.seen.clear()
    _, st = pull(chain, "/v2/bp/true/manifests/v1")
    assert cache.holder.service is first and first.index.max_size == 2 * 10**9  # the same store, reconfigured
    assert st.cache == "hit" and upstream.seen == []  # tag_ttl applies at once
    # Another store: opened on the next request; what the old one held is not in it.
    path.write_text(config_text(BACKPLANE, OTHER, cache={"store": str(tmp_path / "other")}))
    assert chain.config.reload("test")
    _, st2 = pull(chain, f"/v2/bp/true/manifests/{DIGEST}")
    assert cache.holder.service is not first and st2.cache == "fill"
    # No cache: off.
    path.write_text(config_text(BACKPLANE, OTHER))
    assert chain.config.reload("test")
    _, st3 = pull(chain, f"/v2/bp/true/manifests/{DIGEST}")
    assert st3.cache == "off" and cache.holder.service is None
