"""The whole addon chain in-process, hook by hook, as mitmproxy's master runs it (no network)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hooks.conftest import BACKPLANE, ROBOT, Chain, config_text, nginx, request_flow
from mitmproxy import http
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import taddons
from regproxy.flow import state as flowstate
from regproxy.mitm import error_pages as failures
from regproxy.tokens.paseto import Grant, TokenCodec
from rig.keys import CAP

REPO = Path(__file__).resolve().parents[2]
CONFIG = config_text(
    BACKPLANE,
    {"bp/special/": {"registry": "http://127.0.0.1:5002", "remote": "other"}},
    nginx(**ROBOT),
    {"hub/": {"registry": "docker.io"}},
    {"only/": {"registry": "http://127.0.0.1:5004", "remote": "x", "hosts": ["images.example.org"]}},
)
HOST = "reg.test"
BASE = f"http://{HOST}"


@pytest.fixture
def proxy(make_chain: Any) -> Chain:
    chain: Chain = make_chain(CONFIG)
    return chain


def flow(
    path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None, host: str = HOST
) -> http.HTTPFlow:
    return request_flow(path, method, headers, host)


def token(chain: Chain, *grants: Grant, audience: str = BASE, lifetime: int = 60) -> str:
    return chain.state.codec.issue_access(audience, grants, lifetime)


def mid(chain: Chain, key: str) -> str:
    """The identity a grant names for the mapping with this key."""
    return next(m.identity for m in chain.state.config.mappings if m.key == key)


def errors(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None
    return [e["code"] for e in json.loads(f.response.content or b"{}")["errors"]]


def test_entry_script_loads_through_mitmproxys_loader(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    with taddons.context() as tctx:
        script = tctx.script(str(REPO / "addon" / "registryproxy.py"))
        (proxy,) = script.addons  # the chain, as one addon
        names = [type(a).__name__ for a in proxy.steps]
        assert names[0] == "FlowStates" and names[-1] == "Veil"
        config = next(a for a in proxy.steps if type(a).__name__ == "Configuration")
        tctx.options.update(registryproxy_config=str(cfg))
        config.configure({"registryproxy_config"})  # the loaded script is not registered with this master
        assert config.state is not None and len(config.state.config.mappings) == 5


def test_shipped_config_is_valid() -> None:
    from regproxy.config import load_file

    config = load_file(REPO / "config.yaml", environ={})
    assert config.mappings


def test_ping_without_token_is_challenged(proxy: Chain) -> None:
    addon = proxy
    f = flow("/v2/")
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 401
    assert f.response.headers["www-authenticate"] == f'Bearer realm="{BASE}/token",service="{HOST}"'
    assert f.response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert errors(f) == ["UNAUTHORIZED"]


def test_ping_with_valid_token_is_200(proxy: Chain) -> None:
    addon = proxy
    f = flow("/v2/", headers=[("Authorization", f"Bearer {token(addon)}")])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 200


def test_realm_comes_from_public_url_not_a_spoofed_host(make_chain: Any) -> None:
    addon: Chain = make_chain(CONFIG.replace("proxies:", "public_url: https://reg.example.com\nproxies:"))
    f = flow("/v2/", host="evil.example.net", headers=[("X-Forwarded-Host", "evil.example.net")])
    addon.run("requestheaders", f)
    assert f.response is not None
    assert 'realm="https://reg.example.com/token"' in f.response.headers["www-authenticate"]


def test_repository_without_token_is_challenged_with_its_scope(proxy: Chain) -> None:
    addon = proxy
    f = flow("/v2/bp/true/manifests/latest", method="HEAD")
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 401
    assert 'scope="repository:bp/true:pull"' in f.response.headers["www-authenticate"]
    assert f.response.content == b""
    assert int(f.response.headers["content-length"]) > 0


def test_unknown_name_and_almost_right_capability_answer_the_same_bytes(proxy: Chain) -> None:
    addon = proxy
    answers = []
    for name in ("nope/app", f"{CAP[:-1]}e/nginx", f"{CAP}/other"):
        f = flow(
            f"/v2/{name}/manifests/v1", headers=[("Authorization", f"Bearer {token(addon, Grant(None, (name,)))}")]
        )
        addon.run("requestheaders", f)
        assert f.response is not None and f.response.status_code == 404
        answers.append((f.response.content, sorted(f.response.headers.items())))
    assert errors(f) == ["NAME_UNKNOWN"]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("mutate", ["tamper", "foreign", "domain", "garbage", "basic"])
def test_bad_tokens_get_401_with_fresh_challenge(proxy: Chain, mutate: str) -> None:
    addon = proxy
    good = token(addon, Grant(mid(addon, "bp/"), ("bp/true",), "UPSTREAM"))
    value = {
        "tamper": f"Bearer {good[:-6]}AAAAAA",
        "foreign": "Bearer "
        + TokenCodec((b"\x22" * 32,)).issue_access(BASE, (Grant(mid(addon, "bp/"), ("bp/true",), "UPSTREAM"),), 60),
        "domain": f"Bearer {token(addon, Grant(mid(addon, 'bp/'), ('bp/true',), 'UPSTREAM'), audience='http://other.test')}",
        "garbage": "Bearer eyJhbGciOiJub25lIn0.e30.",
        "basic": "Basic dXNlcjpwYXNz",
    }[mutate]
    f = flow("/v2/bp/true/manifests/v1", headers=[("Authorization", value)])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 401
    assert 'error="invalid_token"' in f.response.headers["www-authenticate"]
    assert f.request.host == "127.0.0.1" and f.request.port == 9  # never routed upstream


def test_token_for_another_repository_is_insufficient_scope(proxy: Chain) -> None:
    addon = proxy
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/true",), "UPSTREAM"))
    f = flow("/v2/bp/other/manifests/v1", headers=[("Authorization", f"Bearer {t}")])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 401
    assert 'error="insufficient_scope"' in f.response.headers["www-authenticate"]


def test_token_from_another_mapping_for_the_same_name_is_refused(proxy: Chain) -> None:
    addon = proxy
    # bp/special/x belongs to "bp/special/", not to "bp/": a grant through bp/ must not serve it.
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/special/x",), "UPSTREAM"))
    f = flow("/v2/bp/special/x/manifests/v1", headers=[("Authorization", f"Bearer {t}")])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 401


def test_forwarded_request_is_rewritten_with_only_pull_headers(proxy: Chain) -> None:
    addon = proxy
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/true",), "UPSTREAM-TOKEN"))
    accepts = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    ]
    f = flow(
        "/v2/bp/true/manifests/v1?ns=docker.io&x=1",
        method="HEAD",
        headers=[("Authorization", f"Bearer {t}"), ("Cookie", "a=b"), ("X-Forwarded-For", "1.2.3.4")]
        + [("Accept", a) for a in accepts]
        + [("Range", "bytes=0-10"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1")],
    )
    asyncio.run(_requestheaders(addon, f))
    assert f.response is None
    assert f.request.url == "http://127.0.0.1:5001/v2/backplane/true/manifests/v1"
    assert f.request.method == "HEAD"
    assert f.request.headers["host"] == "127.0.0.1:5001"
    assert f.request.headers.get_all("accept") == accepts
    assert f.request.headers["range"] == "bytes=0-10"
    assert f.request.headers["authorization"] == "Bearer UPSTREAM-TOKEN"
    for dropped in ("cookie", "x-forwarded-for", "connection", "x-secret"):
        assert dropped not in f.request.headers


async def _requestheaders(chain: Chain, f: http.HTTPFlow) -> None:
    """`requestheaders`, then (as mitmproxy does for a request without a body) `request`."""
    await chain.hook("requestheaders", f)
    if f.response is None:
        # What mitmweb shows of the request (hooks between the two) holds no upstream credential.
        assert "authorization" not in f.request.headers
        await chain.hook("request", f, update=False)
        assert "authorization" not in f.request.headers
        await chain.update(f)  # `Courier`, in the `update` after every other addon has seen the flow


def test_basic_only_mapping_gets_configured_credentials(proxy: Chain) -> None:
    addon = proxy
    name = f"{CAP}/nginx"
    t = token(addon, Grant(mid(addon, f"{CAP}/nginx"), (name,), None))
    f = flow(f"/v2/{name}/blobs/sha256:{'a' * 64}", headers=[("Authorization", f"Bearer {t}")])
    asyncio.run(_requestheaders(addon, f))
    assert f.request.url == f"http://127.0.0.1:5003/v2/private/nginx/blobs/sha256:{'a' * 64}"
    assert f.request.headers["authorization"].startswith("Basic ")
    assert CAP not in (f.comment or "")


def test_docker_hub_one_component_names_get_library(proxy: Chain) -> None:
    addon = proxy
    t = token(addon, Grant(mid(addon, "hub/"), ("hub/alpine",), "T"))
    f = flow("/v2/hub/alpine/tags/list?n=10&last=3.1&evil=1", headers=[("Authorization", f"Bearer {t}")])
    asyncio.run(_requestheaders(addon, f))
    assert f.request.url == "https://registry-1.docker.io/v2/library/alpine/tags/list?n=10&last=3.1"


def test_hosts_restricted_mapping_serves_only_its_domain(proxy: Chain) -> None:
    addon = proxy
    for host, routed in (("images.example.org", True), ("reg.test", False)):
        t = token(addon, Grant(mid(addon, "only/") if routed else None, ("only/app",), None), audience=f"http://{host}")
        f = flow("/v2/only/app/manifests/v1", host=host, headers=[("Authorization", f"Bearer {t}")])
        asyncio.run(_requestheaders(addon, f))
        if routed:
            assert f.response is None and f.request.host == "127.0.0.1" and f.request.port == 5004
        else:
            assert f.response is not None and f.response.status_code == 404


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_pull_only(proxy: Chain, method: str) -> None:
    addon = proxy
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/true",), "T"))
    for path in ("/v2/bp/true/manifests/v1", "/v2/bp/true/blobs/uploads/"):
        f = flow(path, method=method, headers=[("Authorization", f"Bearer {t}")])
        addon.run("requestheaders", f)
        assert f.response is not None and f.response.status_code == 405, path
        assert errors(f) == ["UNSUPPORTED"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/bp/../etc/manifests/v1",
        "/v2/bp/%2e%2e/x/manifests/v1",
        "/v2/bp/%2E%2e/x/manifests/v1",
        "/v2/bp%2fx/manifests/v1",
        "/v2/bp/x%5c..%5cy/manifests/v1",
        "/v2/bp\\..\\x/manifests/v1",
        "/v2/bp//x/manifests/v1",
        "/v2/bp/./x/manifests/v1",
        "/v2/bp/X/manifests/v1",
        "/v2/bp/x/manifests/../../../y",
        "/v2/bp/x\x00/manifests/v1",
        "/v2/" + "a/" * 200 + "manifests/v1",
        "/etc/passwd",
    ],
)
def test_path_tricks_never_leave_the_proxy(proxy: Chain, path: str) -> None:
    addon = proxy
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/true", "bp/x", "bp/etc"), "T"))
    f = flow(path, headers=[("Authorization", f"Bearer {t}")])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code in (400, 401, 404)
    assert f.request.host == "127.0.0.1" and f.request.port == 9


def _forwarded(addon: Chain, path: str, name: str = "bp/true", method: str = "GET") -> http.HTTPFlow:
    t = token(addon, Grant(mid(addon, "bp/"), (name,), "T"))
    f = flow(path, method=method, headers=[("Authorization", f"Bearer {t}")])
    asyncio.run(_requestheaders(addon, f))
    assert f.response is None
    return f


def test_upstream_401_becomes_the_proxys_challenge_and_body(proxy: Chain) -> None:
    addon = proxy
    f = _forwarded(addon, "/v2/bp/true/manifests/v1")
    upstream_body = b'{"errors":[{"code":"UNAUTHORIZED","detail":[{"Name":"backplane/true"}]}]}'
    f.response = http.Response.make(
        401,
        upstream_body,
        {
            "WWW-Authenticate": 'Bearer realm="https://auth.up/token",service="up",scope="repository:backplane/true:pull"'
        },
    )
    addon.run("responseheaders", f)
    resp = f.response
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == (
        f'Bearer realm="{BASE}/token",service="{HOST}",scope="repository:bp/true:pull",error="invalid_token"'
    )
    assert callable(resp.stream)
    chunks = [resp.stream(upstream_body), resp.stream(b"")]
    sent = b"".join(c if isinstance(c, bytes) else b"".join(c) for c in chunks)
    assert b"backplane" not in sent and json.loads(sent)["errors"][0]["code"] == "UNAUTHORIZED"
    assert int(resp.headers["content-length"]) == len(sent)
    assert f.request.headers["authorization"] == "[redacted]"


def test_upstream_404_body_is_replaced_even_when_not_streamed(proxy: Chain) -> None:
    addon = proxy
    f = _forwarded(addon, "/v2/bp/true/manifests/v9")
    f.response = http.Response.make(404, b"", {})
    addon.run("responseheaders", f)
    addon.run("response", f)
    assert errors(f) == ["MANIFEST_UNKNOWN"]


def test_success_headers_are_filtered_and_stream(proxy: Chain) -> None:
    addon = proxy
    f = _forwarded(addon, f"/v2/bp/true/blobs/sha256:{'b' * 64}")
    f.response = http.Response.make(
        206,
        b"",
        {
            "Content-Range": "bytes 0-9/100",
            "Docker-Content-Digest": "sha256:" + "b" * 64,
            "Docker-Ratelimit-Source": "1.2.3.4",
            "Set-Cookie": "s=1",
            "Server": "upstream/1",
        },
    )
    addon.run("responseheaders", f)
    h = f.response.headers
    assert callable(f.response.stream) and f.response.stream(b"data") == b"data"
    assert h["content-range"] == "bytes 0-9/100" and "docker-content-digest" in h
    for dropped in ("docker-ratelimit-source", "set-cookie", "server"):
        assert dropped not in h


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v2/backplane/true/blobs/sha256:" + "c" * 64, "/v2/bp/true/blobs/sha256:" + "c" * 64),
        ("http://127.0.0.1:5001/v2/backplane/true/blobs/x?y=1", "/v2/bp/true/blobs/x?y=1"),
        ("https://cdn.example.net/data?sig=1", "https://cdn.example.net/data?sig=1"),
        ("/docker/registry/v2/blobs/data", "http://127.0.0.1:5001/docker/registry/v2/blobs/data"),
        ("javascript:alert(1)", None),
        ("/v2/backplane/other/blobs/x", None),
    ],
)
def test_location_is_absolute_or_local(proxy: Chain, location: str, expected: str | None) -> None:
    addon = proxy
    f = _forwarded(addon, f"/v2/bp/true/blobs/sha256:{'c' * 64}")
    f.response = http.Response.make(307, b"", {"Location": location})
    addon.run("responseheaders", f)
    assert f.response.headers.get("location") == expected


def test_link_and_tags_name_are_rewritten(proxy: Chain) -> None:
    addon = proxy
    f = _forwarded(addon, "/v2/bp/true/tags/list?n=2")
    f.response = http.Response.make(
        200,
        json.dumps({"name": "backplane/true", "tags": ["a", "b"]}).encode(),
        {"Link": '</v2/backplane/true/tags/list?last=b&n=2>; rel="next"', "Content-Type": "application/json"},
    )
    addon.run("responseheaders", f)
    assert not f.response.stream
    addon.run("response", f)
    assert f.response.headers["link"] == '</v2/bp/true/tags/list?last=b&n=2>; rel="next"'
    assert json.loads(f.response.content or b"") == {"name": "bp/true", "tags": ["a", "b"]}


def test_exception_in_a_hook_fails_closed(proxy: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    addon = proxy

    def boom(*args: object) -> None:
        raise RuntimeError("secret-looking detail")

    monkeypatch.setattr(addon.state.matcher, "match", boom)
    t = token(addon, Grant(mid(addon, "bp/"), ("bp/true",), "T"))
    f = flow("/v2/bp/true/manifests/v1", headers=[("Authorization", f"Bearer {t}")])
    addon.run("requestheaders", f)
    assert f.response is not None and f.response.status_code == 500
    assert f.request.host == "127.0.0.1" and f.request.port == 9
    assert b"secret-looking" not in (f.response.content or b"")


def test_locally_answered_flow_keeps_no_capability_key_or_token(proxy: Chain) -> None:
    addon = proxy
    t = token(addon, Grant(None, (f"{CAP}/nginx",)))
    f = flow(f"/v2/{CAP}/nginx/manifests/v1", method="PUT", headers=[("Authorization", f"Bearer {t}")])
    addon.run("requestheaders", f)
    addon.run("response", f)
    assert CAP not in f.request.path
    assert t not in str(f.request.headers)


def test_mitmproxy_error_pages_become_registry_errors() -> None:
    failures.install()
    raw = _http1.make_error_response(502, "Connect call failed ('10.1.2.3', 5000)")
    assert b"10.1.2.3" not in raw
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_what_is_sent_is_kept_out_of_the_flow_until_courier_and_after_the_send(
    proxy: Chain,
) -> None:
    """Hooks after the addon's (mitmweb, -w, mitmdump's dump) see no signed redirect query."""
    addon = proxy
    f = _forwarded(addon, "/v2/bp/true/blobs/sha256:" + "a" * 64)
    f.response = http.Response.make(307, b"", {"Location": "https://cdn.example.net/blob?X-Amz-Signature=SECRET"})

    async def go() -> None:
        await addon.hook("responseheaders", f, update=False)
        assert f.response is not None
        assert "SECRET" not in f.response.headers["location"]  # what every later hook sees
        await addon.update(f)
        assert f.response.headers["location"].endswith("X-Amz-Signature=SECRET")  # what is sent
        f.live = False  # sent
        for _ in range(50):
            await asyncio.sleep(0.01)
            if "SECRET" not in f.response.headers["location"]:
                break
        assert f.response.headers["location"] == "https://cdn.example.net/blob?[redacted]"

    asyncio.run(go())


@pytest.mark.parametrize("path", ["/healthz", "/v2/", "/token"])
def test_a_large_body_to_a_path_answered_here_is_closed_once(proxy: Chain, path: str, caplog: Any) -> None:
    """A step that answers closes a request with a large body unread; the steps after it leave the dead flow
    alone (no second answer, no second note, no internal error)."""
    f = flow(path, "POST", [("Content-Length", str(10 * 1024 * 1024))])
    with caplog.at_level("DEBUG", logger="registryproxy"):
        proxy.run("requestheaders", f)
        proxy.run("request", f)
    assert f.error is not None and not f.live and f.response is None
    st = flowstate.of(f)
    assert st is not None and st.token.count("answer replaced by closing") == 1
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
