"""routing.py: `Router` answers what the proxy owns, checks the client's token, and routes upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hooks.conftest import BACKPLANE, ROBOT, config_text, nginx, request_flow, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.flow.state import FlowState
from regproxy.steps.config_loader import Configuration
from regproxy.steps.routing import Router
from regproxy.tokens.paseto import AccessToken, Grant, TokenError
from rig.keys import CAP

CONFIG = config_text(
    BACKPLANE,
    nginx("https://registry.example.com", **ROBOT),
    {"only/": {"registry": "http://127.0.0.1:5004", "hosts": ["images.example.org"]}},
)
BASE = "http://reg.test"
DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def router(config: Configuration) -> Iterator[Router]:
    addon = Router(config)
    with taddons.context(addon):
        yield addon


def mapping_id(config: Configuration, key: str) -> str:
    assert config.state is not None
    return next(m.identity for m in config.state.config.mappings if m.key == key)


def bearer(config: Configuration, *grants: Grant, audience: str = BASE) -> tuple[str, str]:
    assert config.state is not None
    return ("Authorization", f"Bearer {config.state.codec.issue_access(audience, grants, 60)}")


def pull(config: Configuration, key: str, *names: str, upstream_token: str | None = "UP") -> tuple[str, str]:
    """The Authorization of a client holding pull on these names through the mapping `key`."""
    return bearer(config, Grant(mapping_id(config, key), names, upstream_token))


def routed(
    router: Router, path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None, host: str = "reg.test"
) -> tuple[http.HTTPFlow, FlowState]:
    f = request_flow(path, method, headers, host)
    st = with_state(f)
    router.requestheaders(f)
    return f, st


def errors(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None
    return [e["code"] for e in json.loads(f.response.content or b"{}")["errors"]]


def challenge(f: http.HTTPFlow) -> str:
    assert f.response is not None and f.response.status_code == 401
    return str(f.response.headers["www-authenticate"])


# --- guards -------------------------------------------------------------------------------


def test_a_flow_without_state_is_left_alone(router: Router) -> None:
    f = request_flow("/v2/bp/true/manifests/v1")
    router.requestheaders(f)
    assert f.response is None and f.request.host == "127.0.0.1" and f.request.port == 9


def test_a_flow_already_answered_is_left_alone(router: Router) -> None:
    f = request_flow("/v2/")
    with_state(f)
    f.response = http.Response.make(200, b"alive")
    router.requestheaders(f)
    assert f.response.content == b"alive"


def test_the_token_endpoints_flow_is_left_alone(router: Router) -> None:
    f = request_flow("/token")
    st = with_state(f)
    st.kind = "token"
    router.requestheaders(f)
    assert f.response is None and st.route is None


def test_without_a_configuration_nothing_is_routed(config: Configuration) -> None:
    addon = Router(Configuration(config.metrics))
    with taddons.context(addon):
        f, st = routed(addon, "/v2/bp/true/manifests/v1")
    assert f.response is None and st.route is None


# --- local answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [("/etc/passwd", 404, "NAME_UNKNOWN"), ("/v2/BP/x/manifests/v1", 400, "NAME_INVALID")],
)
def test_paths_that_are_not_routes_are_answered_here(router: Router, path: str, status: int, code: str) -> None:
    f, st = routed(router, path)
    assert f.response is not None and f.response.status_code == status and errors(f) == [code]
    assert st.route is None


def test_a_capability_in_a_path_that_is_not_a_route_stays_out_of_the_log(router: Router) -> None:
    _, st = routed(router, f"/v2/{CAP}/nginx/other/v1")
    assert CAP not in st.log_path


def test_the_ping_without_a_token_is_challenged(router: Router) -> None:
    f, st = routed(router, "/v2/")
    assert challenge(f) == f'Bearer realm="{BASE}/token",service="reg.test"'
    assert st.token == "none"


def test_the_ping_with_a_token_is_200(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/", headers=[bearer(config)])
    assert f.response is not None and f.response.status_code == 200 and f.response.content == b"{}"
    assert st.token == "ok"


def test_the_catalog_lists_nothing(router: Router, config: Configuration) -> None:
    f, _ = routed(router, "/v2/_catalog", headers=[bearer(config)])
    assert f.response is not None and json.loads(f.response.content or b"") == {"repositories": []}


def test_the_catalog_without_a_token_is_challenged_for_its_scope(router: Router) -> None:
    f, _ = routed(router, "/v2/_catalog")
    assert 'scope="registry:catalog:*"' in challenge(f)


def test_a_repository_without_a_token_is_challenged_for_its_scope(router: Router) -> None:
    f, st = routed(router, "/v2/bp/true/manifests/v1")
    assert challenge(f).endswith('scope="repository:bp/true:pull"')
    assert st.log_path == "bp/true/manifests/v1" and st.token == "none"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer ", "Bearer v4.local.garbage", "Token x"])
def test_a_bad_authorization_is_an_invalid_token(router: Router, value: str) -> None:
    f, st = routed(router, "/v2/bp/true/manifests/v1", headers=[("Authorization", value)])
    assert 'error="invalid_token"' in challenge(f)
    assert st.token == "invalid_token" and st.token_refusal == "invalid_token"


def test_a_token_for_another_domain_is_an_invalid_token(router: Router, config: Configuration) -> None:
    grant = Grant(mapping_id(config, "bp/"), ("bp/true",), "UP")
    f, _ = routed(router, "/v2/bp/true/manifests/v1", headers=[bearer(config, grant, audience="http://other.test")])
    assert 'error="invalid_token"' in challenge(f)


def test_an_expired_token_is_noted_as_expired(
    router: Router, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    def expired(token: str, audience: str) -> AccessToken:
        raise TokenError("expired")

    assert config.state is not None
    monkeypatch.setattr(config.state.codec, "read_access", expired)
    f, st = routed(router, "/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    assert 'error="invalid_token"' in challenge(f) and st.token_refusal == "expired"


def test_a_token_for_another_repository_is_insufficient_scope(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/bp/other/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    assert 'error="insufficient_scope"' in challenge(f)
    assert st.token_refusal == "insufficient_scope"


def test_an_unmapped_name_is_404(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/nope/app/manifests/v1", headers=[bearer(config, Grant(None, ("nope/app",)))])
    assert f.response is not None and f.response.status_code == 404 and errors(f) == ["NAME_UNKNOWN"]
    assert st.match is None


def test_a_mapping_for_other_hosts_is_404_here(router: Router, config: Configuration) -> None:
    f, _ = routed(router, "/v2/only/app/manifests/v1", headers=[pull(config, "only/", "only/app")])
    assert f.response is not None and f.response.status_code == 404


def test_a_grant_from_a_changed_mapping_is_stale(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/bp/true/manifests/v1", headers=[bearer(config, Grant("0" * 20, ("bp/true",), "UP"))])
    assert 'error="invalid_token"' in challenge(f)
    assert st.token == "stale (mapping changed)" and st.token_refusal == "invalid_token"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/bp/true/manifests/v1"),
        ("DELETE", f"/v2/bp/true/blobs/{DIGEST}"),
        ("GET", "/v2/bp/true/blobs/uploads/"),
    ],
)
def test_the_proxy_is_pull_only(router: Router, config: Configuration, method: str, path: str) -> None:
    f, _ = routed(router, path, method, headers=[pull(config, "bp/", "bp/true")])
    assert f.response is not None and f.response.status_code == 405 and errors(f) == ["UNSUPPORTED"]
    assert f.request.host == "127.0.0.1" and f.request.port == 9


# --- routing upstream ---------------------------------------------------------------------


def test_a_pull_is_routed_to_the_mappings_upstream(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    assert f.response is None
    assert f.request.url == "http://127.0.0.1:5001/v2/backplane/true/manifests/v1"
    assert f.request.headers["host"] == "127.0.0.1:5001"
    assert st.kind == "upstream" and st.match is not None and st.match.upstream_name == "backplane/true"
    assert st.upstream_auth == "Bearer UP"
    assert f.comment == "registryproxy: bp/true/manifests/v1 via bp/ -> 127.0.0.1:5001/backplane/true"


def test_only_pull_headers_go_upstream_in_order(router: Router, config: Configuration) -> None:
    accepts = [("Accept", "application/vnd.oci.image.index.v1+json"), ("Accept", "application/json")]
    headers = [pull(config, "bp/", "bp/true"), ("Cookie", "a=b"), ("X-Forwarded-For", "10.0.0.1")]
    headers += [*accepts, ("Range", "bytes=0-1"), ("Connection", "close"), ("User-Agent", "docker/27")]
    f, _ = routed(router, f"/v2/bp/true/blobs/{DIGEST}", headers=headers)
    assert f.request.headers.fields == (
        (b"Host", b"127.0.0.1:5001"),
        (b"Accept", b"application/vnd.oci.image.index.v1+json"),
        (b"Accept", b"application/json"),
        (b"Range", b"bytes=0-1"),
        (b"User-Agent", b"docker/27"),
    )


def test_a_capability_mapping_sends_its_credentials_and_logs_its_label(router: Router, config: Configuration) -> None:
    name = f"{CAP}/nginx"
    f, st = routed(router, f"/v2/{name}/manifests/v1", headers=[pull(config, name, name, upstream_token=None)])
    assert f.request.url == "https://registry.example.com/v2/private/nginx/manifests/v1"
    assert st.upstream_auth is not None and st.upstream_auth.startswith("Basic ")
    assert CAP not in st.log_path and CAP not in (f.comment or "")
    assert st.match is not None and st.log_path == f"<{st.match.mapping.label}>/manifests/v1"


def test_only_the_tags_paging_parameters_go_upstream(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/bp/true/tags/list?n=10&last=v1&evil=1", headers=[pull(config, "bp/", "bp/true")])
    assert f.request.path == "/v2/backplane/true/tags/list?n=10&last=v1"
    assert st.page == {"n": "10", "last": "v1"}


def test_an_absolute_form_target_names_no_other_host_upstream(router: Router, config: Configuration) -> None:
    f = request_flow("/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    f.request.authority = "evil.example.net"
    with_state(f)
    router.requestheaders(f)
    assert f.request.authority == "" and f.request.headers["host"] == "127.0.0.1:5001"


def test_an_http2_request_carries_the_upstream_as_its_authority(router: Router, config: Configuration) -> None:
    f = request_flow("/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    f.request.http_version = "HTTP/2.0"
    f.request.authority = "reg.test"
    with_state(f)
    router.requestheaders(f)
    assert f.request.authority == "127.0.0.1:5001" and "host" not in f.request.headers


# --- failing closed -----------------------------------------------------------------------


def test_a_failure_while_routing_answers_500_and_routes_nothing(
    router: Router, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(name: str, host: str | None) -> None:
        raise RuntimeError("secret-looking detail")

    assert config.state is not None
    monkeypatch.setattr(config.state.matcher, "match", boom)
    f, _ = routed(router, "/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    assert f.response is not None and f.response.status_code == 500
    assert f.request.host == "127.0.0.1" and f.request.port == 9
    assert b"secret-looking" not in (f.response.content or b"")


# --- what each part notes in the flow's state ---------------------------------------------


def test_a_name_refused_before_its_lookup_is_logged_with_capabilities_hidden(
    router: Router, config: Configuration
) -> None:
    f, st = routed(router, f"/v2/{CAP}/nginx/manifests/v1", headers=[pull(config, "bp/", "bp/true")])
    assert 'error="insufficient_scope"' in challenge(f)
    assert st.match is None and st.log_path == "<capability?>/nginx/manifests/v1" and st.base == BASE


def test_a_refusal_after_the_lookup_names_the_mapping(router: Router, config: Configuration) -> None:
    name = f"{CAP}/nginx"
    f, st = routed(router, f"/v2/{name}/manifests/v1", "DELETE", headers=[pull(config, name, name)])
    assert f.response is not None and f.response.status_code == 405
    assert st.match is not None and st.log_path == f"<{st.match.mapping.label}>/manifests/v1"
    assert (st.token, st.token_refusal, st.kind, st.upstream_auth) == ("ok", None, "local", None)


def test_a_routed_pull_notes_its_route_token_and_credential(router: Router, config: Configuration) -> None:
    f, st = routed(router, "/v2/bp/true/tags/list?n=2", headers=[pull(config, "bp/", "bp/true")])
    assert f.response is None and st.route is not None and st.route.name == "bp/true"
    assert (st.kind, st.token, st.token_refusal, st.upstream_auth) == ("upstream", "ok", None, "Bearer UP")
    assert st.page == {"n": "2"} and f.request.path == "/v2/backplane/true/tags/list?n=2"


def test_a_token_without_upstream_token_sends_the_mappings_own_credential_or_none(
    router: Router, config: Configuration
) -> None:
    _, st = routed(router, "/v2/bp/true/manifests/v1", headers=[pull(config, "bp/", "bp/true", upstream_token=None)])
    assert st.kind == "upstream" and st.upstream_auth is None
