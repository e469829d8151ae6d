"""Mirror mode through the whole chain in-process (no network): the root key `*`, containerd's `?ns=HOST`,
the realm `/ns/HOST/token` and the binding of its tokens (steps/routing.py,
steps/token_endpoint.py, tokens/issuer.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from hooks.conftest import BACKPLANE, ROBOT, Chain, config_text, nginx, request_flow
from mitmproxy import http
from regproxy.config import Mapping
from regproxy.flow import answers
from regproxy.tokens import issuer as tokenservice
from regproxy.upstream.auth import UpstreamToken
from rig.keys import CAP

KEY = "cd" * 32
CONFIG = config_text(
    {"*": {"registry": "docker.io", "mirror_of": ["docker.io"]}},
    {"gh/": {"registry": "http://127.0.0.1:5002", "mirror_of": ["ghcr.io", "registry.example.com:5000"]}},
    BACKPLANE,
    nginx(**ROBOT),
    secretkey=KEY,
)
OLD_CONFIG = config_text(secretkey=KEY)
HOST = "reg.test"
BASE = f"http://{HOST}"
FORM = "application/x-www-form-urlencoded"


Asked = list[tuple[str, list[str]]]


def offline(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> Asked:
    """The upstream token requests the chain makes from now on (answered without a network)."""
    calls: Asked = []

    async def fetch_token(mapping: Mapping, upstream_names: list[str]) -> UpstreamToken:
        calls.append((mapping.key, upstream_names))
        return UpstreamToken(f"UP-{mapping.label}", time.time() + 300, time.time())

    monkeypatch.setattr(chain.state.tokens.client, "fetch_token", fetch_token)
    return calls


@pytest.fixture
def asked(make_chain: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Chain, Asked]:
    """The mirror chain and the upstream token requests it made."""
    chain: Chain = make_chain(CONFIG)
    return chain, offline(chain, monkeypatch)


@pytest.fixture
def proxy(asked: tuple[Chain, Asked]) -> Chain:
    return asked[0]


def run(chain: Chain, f: http.HTTPFlow) -> http.HTTPFlow:
    """requestheaders, then (unless answered) request, then the update, as mitmproxy runs them; for a
    local answer the response hook and its update, after which the flow holds what was sent."""

    async def go() -> None:
        await chain.hook("requestheaders", f, update=False)
        if f.response is None and f.live:
            await chain.hook("request", f, update=False)
        if f.response is not None:
            await chain.hook("response", f)
        else:
            await chain.update(f)

    asyncio.run(go())
    return f


def get(chain: Chain, path: str, tok: str | None = None, method: str = "GET") -> http.HTTPFlow:
    headers = [("Authorization", f"Bearer {tok}")] if tok else []
    return run(chain, request_flow(path, method, headers, HOST))


def challenge(f: http.HTTPFlow) -> str:
    assert f.response is not None and f.response.status_code == 401, f.response
    return str(f.response.headers["www-authenticate"])


def realm_path(www_authenticate: str) -> str:
    realm = www_authenticate.split('realm="', 1)[1].split('"', 1)[0]
    assert realm.startswith(BASE)
    return realm[len(BASE) :]


def token_at(chain: Chain, path: str, *names: str, post: bool = False) -> str:
    """A token from the realm `path`, as containerd asks for one: GET, or POST with a password grant."""
    params = [("scope", f"repository:{n}:pull") for n in names] + [("service", HOST)]
    if post:
        f = request_flow(path, "POST", [("Content-Type", FORM)], HOST)
        form = params + [("grant_type", "password"), ("username", "u"), ("password", "p"), ("client_id", "c")]
        f.request.content = urlencode(form).encode()
    else:
        f = request_flow(f"{path}?{urlencode(params)}", "GET", [], HOST)
    run(chain, f)
    assert f.response is not None
    assert f.response.status_code == 200, f.response.content
    tok: str = json.loads(f.response.content or b"")["token"]
    return tok


def upstream_of(f: http.HTTPFlow) -> str:
    assert f.response is None, f.response and f.response.content
    return f.request.url


# --- the root key -------------------------------------------------------------------------


def test_the_root_serves_docker_hub_names_as_dockerd_sends_them(asked: tuple[Chain, Asked]) -> None:
    proxy, calls = asked
    f = get(proxy, "/v2/library/alpine/manifests/latest", method="HEAD")
    assert challenge(f) == (f'Bearer realm="{BASE}/token",service="{HOST}",scope="repository:library/alpine:pull"')
    tok = token_at(proxy, "/token", "library/alpine", "someuser/app")
    assert calls == [("*", ["library/alpine", "someuser/app"])]
    f = get(proxy, "/v2/library/alpine/manifests/latest", tok, method="HEAD")
    assert upstream_of(f) == "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    assert f.request.headers["authorization"] == "Bearer UP-*"
    f = get(proxy, f"/v2/someuser/app/blobs/sha256:{'a' * 64}", tok)
    assert upstream_of(f) == f"https://registry-1.docker.io/v2/someuser/app/blobs/sha256:{'a' * 64}"


def test_longer_keys_win_over_the_root(proxy: Chain) -> None:
    tok = token_at(proxy, "/token", "bp/true", f"{CAP}/nginx", "alpine")
    assert (
        upstream_of(get(proxy, "/v2/bp/true/manifests/v1", tok))
        == "http://127.0.0.1:5001/v2/backplane/true/manifests/v1"
    )
    f = get(proxy, f"/v2/{CAP}/nginx/manifests/v1", tok)
    assert upstream_of(f) == "http://127.0.0.1:5003/v2/private/nginx/manifests/v1"
    assert upstream_of(get(proxy, "/v2/alpine/manifests/3", tok)) == (
        "https://registry-1.docker.io/v2/library/alpine/manifests/3"
    )


def test_a_capability_key_with_a_typo_is_never_sent_to_the_root(asked: tuple[Chain, Asked]) -> None:
    proxy, calls = asked
    names = (f"{CAP}/ngnix", f"{CAP}/nginx/x", CAP, f"x/{CAP}/nginx")
    tok = token_at(proxy, "/token", *names)
    assert calls == []
    for name in names:
        f = get(proxy, f"/v2/{name}/manifests/v1", tok)
        assert f.response is not None and f.response.status_code == 404
        assert f.request.host == "127.0.0.1" and f.request.port == 9
        assert CAP not in (f.comment or "")


def test_the_catalog_lists_nothing(proxy: Chain) -> None:
    tok = token_at(proxy, "/token", "library/alpine")
    for path in ("/v2/_catalog", "/v2/_catalog?ns=docker.io"):
        f = get(proxy, path, tok if "ns=" not in path else token_at(proxy, "/ns/docker.io/token"))
        assert f.response is not None and f.response.content == b'{"repositories":[]}'


# --- ?ns= ---------------------------------------------------------------------------------


def test_an_ns_request_is_challenged_with_its_registrys_realm(proxy: Chain) -> None:
    f = get(proxy, "/v2/library/alpine/manifests/latest?ns=docker.io", method="HEAD")
    assert challenge(f) == (
        f'Bearer realm="{BASE}/ns/docker.io/token",service="{HOST}",scope="repository:library/alpine:pull"'
    )
    f = get(proxy, "/v2/org/app/manifests/v1?ns=registry.example.com:5000")
    assert realm_path(challenge(f)) == "/ns/registry.example.com:5000/token"


@pytest.mark.parametrize("post", [False, True])
def test_containerds_mirror_pull_of_two_registries(asked: tuple[Chain, Asked], post: bool) -> None:
    proxy, calls = asked
    hub = token_at(proxy, "/ns/docker.io/token", "library/alpine", post=post)
    gh = token_at(proxy, "/ns/ghcr.io/token", "org/app", post=post)
    assert calls == [("*", ["library/alpine"]), ("gh/", ["org/app"])]
    f = get(proxy, "/v2/library/alpine/manifests/latest?ns=docker.io", hub, method="HEAD")
    assert upstream_of(f) == "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    assert f.request.headers["authorization"] == "Bearer UP-*"
    f = get(proxy, f"/v2/org/app/blobs/sha256:{'b' * 64}?ns=ghcr.io", gh)
    assert upstream_of(f) == f"http://127.0.0.1:5002/v2/org/app/blobs/sha256:{'b' * 64}"
    assert f.request.headers["authorization"] == "Bearer UP-gh/"
    assert "ns=" not in f.request.url


def test_a_token_is_good_only_where_it_was_issued(proxy: Chain) -> None:
    plain = token_at(proxy, "/token", "org/app")
    hub = token_at(proxy, "/ns/docker.io/token", "org/app")
    gh = token_at(proxy, "/ns/ghcr.io/token", "org/app")
    for tok, path in (
        (plain, "/v2/org/app/manifests/v1?ns=ghcr.io"),
        (hub, "/v2/org/app/manifests/v1?ns=ghcr.io"),
        (gh, "/v2/org/app/manifests/v1"),
        (gh, "/v2/org/app/manifests/v1?ns=docker.io"),
        (gh, "/v2/org/app/manifests/v1?ns=registry.example.com:5000"),
    ):
        f = get(proxy, path, tok)
        assert 'error="invalid_token"' in challenge(f), path
    assert upstream_of(get(proxy, "/v2/org/app/manifests/v1?ns=ghcr.io", gh)).startswith("http://127.0.0.1:5002/")
    assert upstream_of(get(proxy, "/v2/org/app/manifests/v1", plain)).startswith("https://registry-1.docker.io/")


def test_an_unknown_ns_gets_the_404_of_an_unknown_name(asked: tuple[Chain, Asked]) -> None:
    proxy, calls = asked
    f = get(proxy, "/v2/org/app/manifests/v1?ns=quay.io")
    assert realm_path(challenge(f)) == "/ns/quay.io/token"
    tok = token_at(proxy, "/ns/quay.io/token", "org/app")
    assert calls == []
    unknown = get(proxy, "/v2/org/app/manifests/v1?ns=quay.io", tok)
    typo = get(proxy, f"/v2/{CAP}/ngnix/manifests/v1", token_at(proxy, "/token", f"{CAP}/ngnix"))
    assert unknown.response is not None and typo.response is not None
    assert unknown.response.status_code == typo.response.status_code == 404
    assert unknown.response.content == typo.response.content
    assert unknown.request.port == 9


@pytest.mark.parametrize("query", ["ns=", "ns=bad%20host", "ns=a/b", "ns=ghcr.io&ns=docker.io", "ns=x:99999"])
def test_a_malformed_ns_is_404_at_once(asked: tuple[Chain, Asked], query: str) -> None:
    proxy, calls = asked
    f = get(proxy, f"/v2/org/app/manifests/v1?{query}")
    assert f.response is not None and f.response.status_code == 404
    assert json.loads(f.response.content or b"")["errors"][0]["code"] == "NAME_UNKNOWN"
    assert calls == []


def test_ns_never_reaches_a_capability_mapping(asked: tuple[Chain, Asked]) -> None:
    proxy, calls = asked
    for ns in ("docker.io", "ghcr.io"):
        tok = token_at(proxy, f"/ns/{ns}/token", f"{CAP}/nginx")
        f = get(proxy, f"/v2/{CAP}/nginx/manifests/v1?ns={ns}", tok)
        assert f.response is not None and f.response.status_code == 404
    assert calls == []


def test_the_logs_name_the_registry_and_the_mapping(proxy: Chain) -> None:
    tok = token_at(proxy, "/ns/ghcr.io/token", "org/app")
    f = request_flow("/ns/ghcr.io/token?scope=repository:org/app:pull", "GET", [], HOST)
    run(proxy, f)
    assert f.comment is not None and "/ns/ghcr.io/token (gh/)" in f.comment
    f = get(proxy, "/v2/org/app/manifests/v1?ns=ghcr.io", tok)
    assert f.comment is not None and "org/app/manifests/v1?ns=ghcr.io via gh/ -> 127.0.0.1:5002/org/app" in f.comment


# --- old configurations -------------------------------------------------------------------


def test_without_mirror_mode_ns_is_ignored_as_before(make_chain: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    chain: Chain = make_chain(OLD_CONFIG)
    offline(chain, monkeypatch)
    tok = token_at(chain, "/token", "bp/true")
    f = get(chain, "/v2/bp/true/manifests/v1?ns=ghcr.io", tok)
    assert upstream_of(f) == "http://127.0.0.1:5001/v2/backplane/true/manifests/v1"
    f = get(chain, "/v2/bp/true/manifests/v1?ns=ghcr.io", method="HEAD")
    assert realm_path(challenge(f)) == "/token"
    f = get(chain, "/ns/ghcr.io/token?scope=repository:bp/true:pull")
    assert f.response is not None and f.response.status_code == 404


def test_the_token_service_knows_the_token_path() -> None:
    assert tokenservice.TOKEN_PATH == answers.TOKEN_PATH
