"""answers.py: the proxy's own answers (registry errors, challenges) and the fail-closed guard."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging

import pytest
from hooks.conftest import request_flow, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.flow import answers
from regproxy.flow import state as flowstate
from regproxy.flow.answers import fail_closed
from regproxy.protocol.errors import RegistryError


def errors(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None
    return [e["code"] for e in json.loads(f.response.content or b"{}")["errors"]]


def test_reply_answers_json_with_the_api_version() -> None:
    f = request_flow("/v2/")
    answers.answer_locally(f, 200, b"{}")
    assert f.response is not None and f.response.status_code == 200
    assert f.response.content == b"{}"
    assert f.response.headers["content-type"] == answers.JSON_TYPE
    assert f.response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_reply_headers_override_the_defaults() -> None:
    f = request_flow("/metrics")
    answers.answer_locally(f, 200, b"x 1\n", {"Content-Type": "text/plain"})
    assert f.response is not None and f.response.headers["content-type"] == "text/plain"


def test_reply_to_head_carries_the_length_not_the_body() -> None:
    f = request_flow("/v2/", method="HEAD")
    answers.answer_locally(f, 404, b'{"errors":[]}')
    assert f.response is not None and f.response.content == b""
    assert f.response.headers["content-length"] == str(len(b'{"errors":[]}'))


@pytest.mark.parametrize(
    "headers",
    [[("Content-Length", str(answers.MAX_LOCAL_BODY + 1))], [("Transfer-Encoding", "chunked")]],
)
def test_reply_to_a_large_upload_closes_instead_of_reading_it(headers: list[tuple[str, str]]) -> None:
    f = request_flow("/v2/bp/x/blobs/uploads/", method="POST", headers=headers)
    st = with_state(f)
    answers.answer_error(f, RegistryError(405, "UNSUPPORTED"))
    assert f.response is None and f.error is not None and not f.live
    assert "405 answer replaced by closing" in st.token


def test_reply_at_the_body_limit_is_answered() -> None:
    f = request_flow("/token", method="POST", headers=[("Content-Length", str(answers.MAX_LOCAL_BODY))])
    answers.answer_locally(f, 200, b"{}")
    assert f.response is not None and f.live


def test_reply_error_is_the_registry_error_format() -> None:
    f = request_flow("/v2/x/manifests/v1")
    answers.answer_error(f, RegistryError(404, "MANIFEST_UNKNOWN"))
    assert f.response is not None and f.response.status_code == 404
    assert errors(f) == ["MANIFEST_UNKNOWN"]


def test_an_answer_notes_the_token_outcome_and_why_a_token_was_refused() -> None:
    f = request_flow("/v2/bp/x/manifests/v1")
    st = with_state(f)
    answers.answer_challenge(
        f, "http://reg.test", "repository:bp/x:pull", "invalid_token", token="x", refusal="expired"
    )
    assert (st.token, st.token_refusal, st.kind) == ("x", "expired", "local")


def test_an_answer_without_an_outcome_keeps_the_one_so_far() -> None:
    f = request_flow("/healthz")
    st = with_state(f)
    answers.answer_locally(f, 200, b"ok")
    assert (st.token, st.token_refusal, st.kind) == ("-", None, "local")


def test_an_answer_to_a_routed_flow_sends_nothing_upstream_and_adds_its_note() -> None:
    f = request_flow("/v2/bp/x/manifests/v1")
    st = with_state(f)
    st.kind, st.token, st.upstream_auth = "upstream", "ok", "Bearer UP"
    answers.answer_error(f, RegistryError(429, "TOOMANYREQUESTS"), {"Retry-After": "3"}, note="limited: manifest_gets")
    after = flowstate.of(f)  # the same state (a new name: mypy keeps `st.kind` narrowed to "upstream")
    assert after is st and (after.kind, after.upstream_auth, after.token) == (
        "local",
        None,
        "ok; limited: manifest_gets",
    )
    assert f.response is not None and f.response.status_code == 429 and f.response.headers["retry-after"] == "3"


def test_the_token_endpoints_answer_stays_a_token_flow() -> None:
    f = request_flow("/token")
    st = with_state(f)
    st.kind = "token"
    answers.answer_error(f, RegistryError(400, "UNSUPPORTED"), token="refused: x", refusal="unsupported")
    assert (st.kind, st.token, st.token_refusal) == ("token", "refused: x", "unsupported")


def test_an_answer_closed_unread_keeps_the_outcome_and_its_note_before_the_closing() -> None:
    f = request_flow("/v2/bp/x/manifests/v1", headers=[("Content-Length", str(answers.MAX_LOCAL_BODY + 1))])
    st = with_state(f)
    st.token = "ok"
    answers.answer_error(f, RegistryError(429, "TOOMANYREQUESTS"), note="limited: client_requests")
    assert f.response is None and not f.live
    assert st.token == "ok; limited: client_requests; 429 answer replaced by closing: body over 65536 bytes"


def test_an_answer_to_a_flow_without_state_still_answers() -> None:
    f = request_flow("/v2/")
    answers.answer_locally(f, 200, b"{}", token="ok", refusal="x", note="y")
    assert f.response is not None and f.response.status_code == 200


def test_service_is_the_public_base_netloc() -> None:
    assert answers.service("https://reg.example.com:8443") == "reg.example.com:8443"


def test_challenge_names_the_realm_service_scope_and_error() -> None:
    f = request_flow("/v2/bp/x/manifests/v1")
    answers.answer_challenge(f, "https://reg.example.com", "repository:bp/x:pull", "invalid_token")
    assert f.response is not None and f.response.status_code == 401
    assert f.response.headers["www-authenticate"] == (
        'Bearer realm="https://reg.example.com/token",service="reg.example.com",'
        'scope="repository:bp/x:pull",error="invalid_token"'
    )
    assert errors(f) == ["UNAUTHORIZED"]


def test_error_response_is_a_standalone_registry_error() -> None:
    resp = answers.error_response(RegistryError(502, "UNAVAILABLE"))
    assert resp.status_code == 502
    assert resp.headers["content-type"] == answers.JSON_TYPE
    assert json.loads(resp.content or b"")["errors"][0]["code"] == "UNAVAILABLE"


class Failing:
    """An addon whose hooks fail, as any addon's hook might."""

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("secret-looking detail")

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(0)
        raise KeyError("secret-looking detail")


class Passing:
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.comment = "seen"


def test_fail_closed_keeps_the_hooks_name_and_kind() -> None:
    assert Failing.requestheaders.__name__ == "requestheaders"
    assert not inspect.iscoroutinefunction(Failing.requestheaders)
    assert inspect.iscoroutinefunction(Failing.response)  # mitmproxy awaits it


def test_a_hook_that_returns_is_left_alone() -> None:
    addon = Passing()
    with taddons.context(addon):
        f = request_flow("/v2/")
        addon.requestheaders(f)
        assert f.comment == "seen" and f.response is None


def test_a_failing_hook_answers_500_without_the_detail(caplog: pytest.LogCaptureFixture) -> None:
    addon = Failing()
    with taddons.context(addon):
        f = request_flow("/v2/bp/x/manifests/v1")
        addon.requestheaders(f)  # no exception escapes
    assert f.response is not None and f.response.status_code == 500
    assert errors(f) == ["UNKNOWN"]
    assert b"secret-looking" not in (f.response.content or b"")
    assert "internal error in requestheaders hook (RuntimeError)" in caplog.text
    assert "secret-looking" not in "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_a_failing_async_hook_kills_a_flow_already_answered() -> None:
    addon = Failing()

    async def go() -> http.HTTPFlow:
        with taddons.context(addon):
            f = request_flow("/v2/bp/x/manifests/v1")
            f.response = http.Response.make(200, b"upstream body")
            await addon.response(f)
            return f

    f = asyncio.run(go())
    assert f.error is not None and not f.live


def test_mitmproxy_dispatches_to_the_wrapped_hooks() -> None:
    addon = Failing()

    async def go() -> http.HTTPFlow:
        with taddons.context(addon) as tctx:
            f = request_flow("/v2/bp/x/manifests/v1")
            await tctx.cycle(addon, f)
            return f

    f = asyncio.run(go())
    assert f.response is not None and f.response.status_code == 500


def test_a_failing_hook_on_a_finished_flow_does_nothing() -> None:
    addon = Failing()
    with taddons.context(addon):
        f = request_flow("/v2/")
        f.live = False
        addon.requestheaders(f)
    assert f.response is None and f.error is None
