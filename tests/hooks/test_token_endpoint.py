"""steps/token_endpoint.py: `/token` answers the proxy's own tokens; the flow keeps no credential."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hooks.conftest import config_text, request_flow, sample, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.config import Mapping
from regproxy.flow import answers
from regproxy.flow.state import FlowState
from regproxy.ops.metrics import Metrics
from regproxy.protocol.errors import RegistryError
from regproxy.steps.config_loader import Configuration
from regproxy.steps.token_endpoint import TokenEndpoint
from regproxy.tokens.issuer import TokenAnswer, TokenRequest
from regproxy.upstream.auth import UpstreamError, UpstreamToken

CONFIG = config_text()
BASE = "http://reg.test"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def endpoint(config: Configuration, metrics: Metrics) -> Iterator[TokenEndpoint]:
    addon = TokenEndpoint(config, metrics)
    with taddons.context(addon):
        yield addon


@pytest.fixture
def upstream_tokens(config: Configuration, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """The upstream token requests, answered without a network: (mapping key, upstream names)."""
    asked: list[tuple[str, list[str]]] = []

    async def fetch_token(mapping: Mapping, upstream_names: list[str]) -> UpstreamToken:
        asked.append((mapping.key, upstream_names))
        return UpstreamToken("UPSTREAM-TOKEN", time.time() + 300, time.time())

    assert config.client is not None
    monkeypatch.setattr(config.client, "fetch_token", fetch_token)
    return asked


def token_flow(
    query: str = "", method: str = "GET", form: str | None = None, headers: list[tuple[str, str]] | None = None
) -> tuple[http.HTTPFlow, FlowState]:
    extra = list(headers or []) + ([("Content-Type", FORM)] if form is not None else [])
    f = request_flow(f"/token{query}", method, extra)
    if form is not None:
        f.request.content = form.encode()
    return f, with_state(f)


def ask(endpoint: TokenEndpoint, f: http.HTTPFlow) -> http.HTTPFlow:
    """`requestheaders`, then (when it did not answer) `request`, as mitmproxy runs them."""
    endpoint.requestheaders(f)
    if f.response is None and f.live:
        asyncio.run(endpoint.request(f))
    return f


def body(f: http.HTTPFlow) -> Any:
    assert f.response is not None
    return json.loads(f.response.content or b"")


def errors(f: http.HTTPFlow) -> list[str]:
    return [e["code"] for e in body(f)["errors"]]


# --- guards -------------------------------------------------------------------------------


def test_other_paths_are_left_to_routing(endpoint: TokenEndpoint) -> None:
    f = request_flow("/v2/token")
    st = with_state(f)
    endpoint.requestheaders(f)
    assert st.kind == "local" and f.response is None and f.request.path == "/v2/token"


def test_a_flow_without_state_is_left_alone(endpoint: TokenEndpoint) -> None:
    f = request_flow("/token?scope=repository:bp/true:pull")
    ask(endpoint, f)
    assert f.response is None and f.request.path == "/token?scope=repository:bp/true:pull"


def test_without_a_configuration_the_path_is_left_alone(metrics: Metrics) -> None:
    addon = TokenEndpoint(Configuration(metrics), metrics)
    with taddons.context(addon):
        f, st = token_flow("?scope=repository:bp/true:pull")
        ask(addon, f)
    assert f.response is None and st.kind == "local"


def test_a_flow_already_answered_is_left_alone(endpoint: TokenEndpoint) -> None:
    f, st = token_flow()
    f.response = http.Response.make(503)
    ask(endpoint, f)
    assert f.response.status_code == 503 and st.kind == "local"


def test_request_leaves_a_flow_the_endpoint_did_not_claim(endpoint: TokenEndpoint) -> None:
    f, st = token_flow()
    asyncio.run(endpoint.request(f))
    assert f.response is None and st.token == "-"


# --- requestheaders -----------------------------------------------------------------------


def test_the_path_is_claimed_and_the_flow_keeps_no_query_or_authorization(endpoint: TokenEndpoint) -> None:
    f, st = token_flow("?scope=repository:bp/true:pull&service=reg.test", headers=[("Authorization", "Basic dTpw")])
    endpoint.requestheaders(f)
    assert (st.kind, st.log_path, st.base) == ("token", "/token", BASE)
    assert f.request.path == "/token"
    assert f.request.headers["authorization"] == "[redacted]"
    assert f.response is None


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_methods_other_than_get_and_post_are_405(endpoint: TokenEndpoint, method: str) -> None:
    f, _ = token_flow(method=method)
    endpoint.requestheaders(f)
    assert f.response is not None and f.response.status_code == 405
    assert errors(f) == ["UNSUPPORTED"]


def test_an_oversized_post_is_closed_unread(endpoint: TokenEndpoint) -> None:
    """The 413 is replaced by closing: answering would make mitmproxy read the whole body first."""
    f, st = token_flow(method="POST", headers=[("Content-Length", str(answers.MAX_LOCAL_BODY + 1))])
    endpoint.requestheaders(f)
    assert f.response is None and f.error is not None and not f.live
    assert "413 answer replaced by closing" in st.token


# --- request: tokens ----------------------------------------------------------------------


def test_an_anonymous_get_gets_a_token_for_the_public_base(
    endpoint: TokenEndpoint, config: Configuration, metrics: Metrics
) -> None:
    f, st = token_flow("?scope=repository:nope/app:pull&service=reg.test")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 200
    assert f.response.headers["cache-control"] == "no-store"
    answer = body(f)
    assert answer["token"] == answer["access_token"] and answer["expires_in"] == 300 and "refresh_token" not in answer
    assert config.state is not None
    assert config.state.codec.read_access(answer["token"], BASE).grant_for("nope/app") is not None
    assert st.token == "issued pull on 0 repositories for 300s"
    assert sample(metrics, "registryproxy_tokens_issued_total", grant="anonymous") == 1


def test_a_mapped_scope_wraps_the_upstream_token(
    endpoint: TokenEndpoint, config: Configuration, upstream_tokens: list[tuple[str, list[str]]]
) -> None:
    f, st = token_flow("?scope=repository:bp/true:pull,push")
    ask(endpoint, f)
    assert upstream_tokens == [("bp/", ["backplane/true"])]
    assert config.state is not None
    grant = config.state.codec.read_access(body(f)["token"], BASE).grant_for("bp/true")
    assert grant is not None and grant.upstream_token == "UPSTREAM-TOKEN"
    assert f.response is not None and "UPSTREAM-TOKEN" not in (f.response.text or "")
    assert st.log_path == "/token (bp/)"
    assert st.token == "issued pull on 1 repositories for 300s"


def test_a_password_grant_gets_a_refresh_token_and_the_flow_keeps_no_password(
    endpoint: TokenEndpoint, metrics: Metrics
) -> None:
    f, _ = token_flow(method="POST", form="grant_type=password&username=robot&password=hunter2&scope=")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 200
    assert "refresh_token" in body(f)
    assert b"hunter2" not in (f.request.content or b"")
    assert b"password=[redacted]" in (f.request.content or b"")
    assert sample(metrics, "registryproxy_tokens_issued_total", grant="password") == 1


def test_a_refresh_grant_renews_the_token(endpoint: TokenEndpoint, config: Configuration) -> None:
    assert config.state is not None
    refresh = config.state.codec.issue_refresh(BASE, "robot", 60)
    f, _ = token_flow(method="POST", form=f"grant_type=refresh_token&refresh_token={refresh}")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 200
    assert refresh.encode() not in (f.request.content or b"")


# --- request: refusals and failures -------------------------------------------------------


def test_an_unknown_grant_type_is_refused_and_noted(endpoint: TokenEndpoint, metrics: Metrics) -> None:
    f, st = token_flow(method="POST", form="grant_type=client_credentials")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 400
    assert errors(f) == ["UNSUPPORTED"]
    assert st.token == "refused: grant_type must be password or refresh_token"
    assert st.token_refusal == "unsupported"
    assert sample(metrics, "registryproxy_tokens_issued_total", grant="anonymous") == 0


def test_a_bad_refresh_token_is_401(endpoint: TokenEndpoint) -> None:
    f, st = token_flow(method="POST", form="grant_type=refresh_token&refresh_token=v4.local.forged")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 401
    assert errors(f) == ["UNAUTHORIZED"] and st.token_refusal == "unauthorized"
    assert b"v4.local.forged" not in (f.request.content or b"")


@pytest.mark.parametrize(("timeout", "status"), [(False, 502), (True, 504)])
def test_an_upstream_token_service_failure_is_unavailable(
    endpoint: TokenEndpoint, config: Configuration, monkeypatch: pytest.MonkeyPatch, timeout: bool, status: int
) -> None:
    async def fetch_token(mapping: Mapping, upstream_names: list[str]) -> UpstreamToken:
        raise UpstreamError("token service of 127.0.0.1:5001 failed", timeout=timeout)

    assert config.client is not None
    monkeypatch.setattr(config.client, "fetch_token", fetch_token)
    f, st = token_flow("?scope=repository:bp/true:pull")
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == status
    assert errors(f) == ["UNAVAILABLE"] and st.token_refusal == "unavailable"


def test_an_unexpected_failure_fails_closed(
    endpoint: TokenEndpoint, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(req: TokenRequest, audience: str, host: str | None) -> TokenAnswer:
        raise RuntimeError("broken")

    assert config.state is not None
    monkeypatch.setattr(config.state.tokens, "answer", broken)
    f, _ = token_flow()
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 500


def test_a_registry_error_raised_deep_down_keeps_its_status(
    endpoint: TokenEndpoint, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def denied(req: TokenRequest, audience: str, host: str | None) -> TokenAnswer:
        raise RegistryError(403, "DENIED")

    assert config.state is not None
    monkeypatch.setattr(config.state.tokens, "answer", denied)
    f, st = token_flow()
    ask(endpoint, f)
    assert f.response is not None and f.response.status_code == 403
    assert st.token == "refused: DENIED" and st.token_refusal == "denied"
