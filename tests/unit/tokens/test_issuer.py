"""The token endpoint: request parsing, answers and the public base URL (tokens/issuer.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import Config, Mapping, parse
from regproxy.mapping.matcher import Matcher
from regproxy.protocol.errors import RegistryError
from regproxy.tokens.issuer import MAX_PARAMS, TokenAnswer, TokenRequest, TokenService, parse_token_request, public_base
from regproxy.tokens.paseto import Grant, TokenCodec
from regproxy.upstream.auth import UpstreamError, UpstreamToken
from regproxy.upstream.client import RegistryClient

KEY = "11" * 32
AUD = "https://reg.example.com"


def make_config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "secretkey": KEY,
        "proxies": {
            "bp/": {"registry": "index.docker.io", "remote": "backplane"},
            "gh/": {"registry": "ghcr.io", "remote": "org"},
            "hub/": {"registry": "docker.io", "remote": ""},
        },
    }
    data.update(extra)
    return parse(data, {})


class FakeClient(RegistryClient):
    """Answers fetch_token from a table, recording the calls; never touches the network."""

    def __init__(self, answers: dict[str, UpstreamToken | None | UpstreamError] | None = None) -> None:
        super().__init__(timeout=1.0)
        self.answers = answers or {}
        self.calls: list[tuple[str, list[str]]] = []

    async def fetch_token(self, mapping: Mapping, upstream_names: list[str]) -> UpstreamToken | None:
        self.calls.append((mapping.key, list(upstream_names)))
        answer = self.answers.get(mapping.key, UpstreamToken(f"tok-{mapping.key}", time.time() + 3600))
        if isinstance(answer, UpstreamError):
            raise answer
        return answer


def service(client: FakeClient, config: Config | None = None) -> tuple[TokenService, TokenCodec]:
    config = config or make_config()
    codec = TokenCodec(config.secretkeys)
    return TokenService(config, Matcher(config.mappings), codec, client), codec


def get(*scopes: str, offline: bool = False, refresh: str | None = None) -> TokenRequest:
    grant = "refresh_token" if refresh else None
    return TokenRequest(grant, scopes, offline or refresh is not None, refresh, "anonymous")


def answer(svc: TokenService, req: TokenRequest, host: str | None = "reg.example.com") -> TokenAnswer:
    return asyncio.run(svc.answer(req, AUD, host))


# --- parse_token_request ---


def test_get_with_repeated_scopes() -> None:
    req = parse_token_request(
        "GET",
        [("service", "reg"), ("scope", "repository:a:pull"), ("scope", "repository:b:pull repository:c:pull")],
        None,
    )
    assert req == TokenRequest(
        None, ("repository:a:pull", "repository:b:pull repository:c:pull"), False, None, "anonymous"
    )


def test_get_offline_token_and_account() -> None:
    req = parse_token_request("GET", [("offline_token", "TRUE"), ("account", "alice"), ("client_id", "docker")], None)
    assert req.offline and req.subject == "alice"


@pytest.mark.parametrize("value", ["false", "1", ""])
def test_get_offline_token_other_values(value: str) -> None:
    assert not parse_token_request("GET", [("offline_token", value)], None).offline


def test_get_without_parameters() -> None:
    assert parse_token_request("GET", [], None) == TokenRequest(None, (), False, None, "anonymous")


def test_post_password_grant() -> None:
    form = [("grant_type", "password"), ("username", "bob"), ("password", "pw"), ("scope", "repository:a:pull")]
    req = parse_token_request("POST", [], form)
    assert req == TokenRequest("password", ("repository:a:pull",), True, None, "bob")


def test_post_refresh_grant() -> None:
    form = [("grant_type", "refresh_token"), ("refresh_token", "v4.local.x"), ("scope", "repository:a:pull")]
    req = parse_token_request("POST", [], form)
    assert (req.grant_type, req.refresh_token, req.offline, req.scopes) == (
        "refresh_token",
        "v4.local.x",
        True,
        ("repository:a:pull",),
    )


def test_post_refresh_grant_without_token() -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_request("POST", [], [("grant_type", "refresh_token")])
    assert info.value.status == 400


@pytest.mark.parametrize("grant", [None, "client_credentials", "PASSWORD", ""])
def test_post_bad_grant_type(grant: str | None) -> None:
    form = [("grant_type", grant)] if grant is not None else []
    with pytest.raises(RegistryError) as info:
        parse_token_request("POST", [], form)
    assert info.value.status == 400


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "PATCH", "get"])
def test_other_methods_are_405(method: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_request(method, [], None)
    assert info.value.status == 405


@pytest.mark.parametrize(
    "param", [("scope", "repository:a:pull\r\nX: 1"), ("account", "a\x00"), ("sc\tope", "x"), ("scope", "a\x7f")]
)
def test_control_characters_are_refused(param: tuple[str, str]) -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_request("GET", [param], None)
    assert info.value.status == 400


def test_too_many_parameters() -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_request("GET", [("scope", "repository:a:pull")] * (MAX_PARAMS + 1), None)
    assert info.value.status == 400


def test_too_long_parameter() -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_request("GET", [("scope", "a" * 5000)], None)
    assert info.value.status == 400


@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.lists(st.tuples(st.text(max_size=12), st.text(max_size=30)), max_size=6),
    st.one_of(
        st.none(), st.lists(st.tuples(st.sampled_from(["grant_type", "refresh_token", "x"]), st.text(max_size=20)))
    ),
)
def test_parse_token_request_raises_only_registry_errors(
    method: str, query: list[tuple[str, str]], form: list[tuple[str, str]] | None
) -> None:
    try:
        parse_token_request(method, query, form)
    except RegistryError as e:
        assert e.status in (400, 405)


# --- TokenService.answer ---


def test_grants_are_grouped_by_mapping() -> None:
    client = FakeClient()
    svc, codec = service(client)
    result = answer(svc, get("repository:bp/a:pull repository:gh/x:pull", "repository:bp/b:pull,push"))
    access = codec.read_access(str(result.body["token"]), AUD)
    ids = {m.key: m.identity for m in make_config().mappings}
    assert set(access.grants) == {
        Grant(ids["bp/"], ("bp/a", "bp/b"), "tok-bp/"),
        Grant(ids["gh/"], ("gh/x",), "tok-gh/"),
    }
    assert sorted(client.calls) == [("bp/", ["backplane/a", "backplane/b"]), ("gh/", ["org/x"])]


def test_docker_hub_names_go_upstream_with_library() -> None:
    client = FakeClient()
    svc, _ = service(client)
    answer(svc, get("repository:hub/nginx:pull"))
    assert client.calls == [("hub/", ["library/nginx"])]


def test_unknown_names_are_granted_without_mapping() -> None:
    client = FakeClient()
    svc, codec = service(client)
    result = answer(svc, get("repository:nope/x:pull", "repository:bp:pull"))
    access = codec.read_access(str(result.body["token"]), AUD)
    assert access.grants == (Grant(None, ("nope/x", "bp"), None),)
    assert client.calls == []
    assert "0 repositories" in result.outcome


def test_push_only_and_catalog_scopes_ask_nothing_upstream() -> None:
    client = FakeClient()
    svc, codec = service(client)
    result = answer(svc, get("repository:bp/a:push registry:catalog:*"))
    assert codec.read_access(str(result.body["token"]), AUD).grants == ()
    assert client.calls == []


def test_answer_body_shape() -> None:
    svc, _ = service(FakeClient())
    body = answer(svc, get("repository:bp/a:pull")).body
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert isinstance(body["issued_at"], str) and body["issued_at"].endswith("Z")
    time.strptime(body["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert "refresh_token" not in body


def test_lifetime_capped_by_token_ttl() -> None:
    svc, _ = service(FakeClient(), make_config(token_ttl=120))
    assert answer(svc, get("repository:bp/a:pull")).body["expires_in"] == 120


def test_lifetime_capped_by_upstream_expiry() -> None:
    client = FakeClient({"gh/": UpstreamToken("short", time.time() + 90)})
    svc, codec = service(client)
    body = answer(svc, get("repository:bp/a:pull", "repository:gh/x:pull")).body
    assert 85 <= int(str(body["expires_in"])) <= 90
    access = codec.read_access(str(body["token"]), AUD)
    assert access.expires_at <= time.time() + 91


def test_lifetime_without_upstream_token_is_token_ttl() -> None:
    svc, _ = service(FakeClient({"bp/": None}))
    assert answer(svc, get("repository:bp/a:pull")).body["expires_in"] == 300


def test_lifetime_of_expired_upstream_token_is_at_least_one() -> None:
    svc, _ = service(FakeClient({"bp/": UpstreamToken("old", time.time() - 10)}))
    assert answer(svc, get("repository:bp/a:pull")).body["expires_in"] == 1


def test_default_upstream_expiry_keeps_expires_in_at_least_60() -> None:
    svc, _ = service(FakeClient({"bp/": UpstreamToken("t", time.time() + 60)}))
    assert int(str(answer(svc, get("repository:bp/a:pull")).body["expires_in"])) >= 60


def test_offline_request_gets_refresh_token() -> None:
    svc, codec = service(FakeClient())
    req = TokenRequest(None, ("repository:bp/a:pull",), True, None, "alice")
    body = answer(svc, req).body
    assert codec.read_refresh(str(body["refresh_token"]), AUD) == "alice"


def test_refresh_grant_keeps_subject() -> None:
    svc, codec = service(FakeClient())
    refresh = codec.issue_refresh(AUD, "alice", 3600)
    body = answer(svc, get("repository:bp/a:pull", refresh=refresh)).body
    assert codec.read_refresh(str(body["refresh_token"]), AUD) == "alice"
    assert codec.read_access(str(body["token"]), AUD).grant_for("bp/a") is not None


@pytest.mark.parametrize("refresh", ["v4.local.garbage", "not-a-token"])
def test_refresh_grant_with_bad_token_is_401(refresh: str) -> None:
    svc, _ = service(FakeClient())
    with pytest.raises(RegistryError) as info:
        answer(svc, get("repository:bp/a:pull", refresh=refresh))
    assert (info.value.status, info.value.code) == (401, "UNAUTHORIZED")


def test_refresh_grant_with_access_token_is_401() -> None:
    svc, codec = service(FakeClient())
    access = codec.issue_access(AUD, (), 60)
    with pytest.raises(RegistryError) as info:
        answer(svc, get(refresh=access))
    assert info.value.status == 401


def test_refresh_grant_for_another_audience_is_401() -> None:
    svc, codec = service(FakeClient())
    refresh = codec.issue_refresh("https://other.example.com", "alice", 3600)
    with pytest.raises(RegistryError) as info:
        answer(svc, get(refresh=refresh))
    assert info.value.status == 401


def test_upstream_error_is_502() -> None:
    svc, _ = service(FakeClient({"bp/": UpstreamError("upstream token service answered 500")}))
    with pytest.raises(RegistryError) as info:
        answer(svc, get("repository:bp/a:pull"))
    assert (info.value.status, info.value.code) == (502, "UNAVAILABLE")


def test_upstream_timeout_is_504() -> None:
    svc, _ = service(FakeClient({"bp/": UpstreamError("timed out", timeout=True)}))
    with pytest.raises(RegistryError) as info:
        answer(svc, get("repository:bp/a:pull"))
    assert (info.value.status, info.value.code) == (504, "UNAVAILABLE")


def test_hosts_restricted_mapping_on_other_host_is_unknown() -> None:
    config = make_config(proxies={"bp/": {"registry": "ghcr.io", "remote": "o", "hosts": ["a.example.com"]}})
    client = FakeClient()
    svc, codec = service(client, config)
    result = answer(svc, get("repository:bp/x:pull"), host="b.example.com")
    assert codec.read_access(str(result.body["token"]), AUD).grants == (Grant(None, ("bp/x",), None),)
    assert client.calls == []


# --- public_base ---


def test_public_base_configured_host_kept() -> None:
    config = make_config(public_url="https://reg.example.com")
    assert public_base(config, "REG.example.com", tls=False) == "https://reg.example.com"


def test_public_base_mapping_host_kept_with_public_scheme() -> None:
    config = make_config(
        public_url="https://reg.example.com",
        proxies={"bp/": {"registry": "ghcr.io", "remote": "o", "hosts": ["alt.example.com"]}},
    )
    assert public_base(config, "alt.example.com:8443", tls=False) == "https://alt.example.com:8443"


def test_public_base_unknown_host_falls_back_to_public_url() -> None:
    config = make_config(public_url="https://reg.example.com")
    assert public_base(config, "evil.example.com", tls=True) == "https://reg.example.com"


def test_public_base_missing_host_falls_back_to_public_url() -> None:
    config = make_config(public_url="https://reg.example.com:8443")
    assert public_base(config, None, tls=True) == "https://reg.example.com:8443"


@pytest.mark.parametrize(("tls", "scheme"), [(True, "https"), (False, "http")])
def test_public_base_without_public_url_uses_host(tls: bool, scheme: str) -> None:
    assert public_base(make_config(), "127.0.0.1:5000", tls=tls) == f"{scheme}://127.0.0.1:5000"


def test_public_base_without_public_url_or_host() -> None:
    assert public_base(make_config(), None, tls=False) == "http://localhost"


# --- a mapping's policy ---


def test_a_repository_the_policy_refuses_is_granted_without_asking_upstream() -> None:
    config = make_config(
        proxies={"hub/": {"registry": "docker.io", "remote": "", "allow": ["library/*"], "deny": ["library/busybox"]}}
    )
    client = FakeClient()
    svc, codec = service(client, config)
    a = answer(svc, get("repository:hub/busybox:pull", "repository:hub/library/nginx:pull", "repository:hub/x/y:pull"))
    # Only the admitted name is named to the upstream's token service.
    assert client.calls == [("hub/", ["library/nginx"])]
    token = codec.read_access(str(a.body["token"]), AUD)
    refused = token.grant_for("hub/busybox")
    assert refused is not None and refused.upstream_token is None  # 403 DENIED at the request, not a challenge
    assert token.grant_for("hub/x/y") == refused
    admitted = token.grant_for("hub/library/nginx")
    assert admitted is not None and admitted.upstream_token == "tok-hub/"


def test_a_repository_refused_whole_asks_no_upstream_token_at_all() -> None:
    config = make_config(proxies={"hub/": {"registry": "docker.io", "remote": "", "deny": ["library/busybox"]}})
    client = FakeClient()
    svc, _ = service(client, config)
    answer(svc, get("repository:hub/library/busybox:pull"))
    assert client.calls == []
