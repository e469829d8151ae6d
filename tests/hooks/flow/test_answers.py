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
from regproxy.flow.answers import fail_closed
from regproxy.protocol.errors import RegistryError


def errors(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None
    return [e["code"] for e in json.loads(f.response.content or b"{}")["errors"]]


def test_reply_answers_json_with_the_api_version() -> None:
    f = request_flow("/v2/")
    answers.reply(f, 200, b"{}")
    assert f.response is not None and f.response.status_code == 200
    assert f.response.content == b"{}"
    assert f.response.headers["content-type"] == answers.JSON_TYPE
    assert f.response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_reply_headers_override_the_defaults() -> None:
    f = request_flow("/metrics")
    answers.reply(f, 200, b"x 1\n", {"Content-Type": "text/plain"})
    assert f.response is not None and f.response.headers["content-type"] == "text/plain"


def test_reply_to_head_carries_the_length_not_the_body() -> None:
    f = request_flow("/v2/", method="HEAD")
    answers.reply(f, 404, b'{"errors":[]}')
    assert f.response is not None and f.response.content == b""
    assert f.response.headers["content-length"] == str(len(b'{"errors":[]}'))


@pytest.mark.parametrize(
    "headers",
    [[("Content-Length", str(answers.MAX_LOCAL_BODY + 1))], [("Transfer-Encoding", "chunked")]],
)
def test_reply_to_a_large_upload_closes_instead_of_reading_it(headers: list[tuple[str, str]]) -> None:
    f = request_flow("/v2/bp/x/blobs/uploads/", method="POST", headers=headers)
    st = with_state(f)
    answers.reply_error(f, RegistryError(405, "UNSUPPORTED"))
    assert f.response is None and f.error is not None and not f.live
    assert "405 answer replaced by closing" in st.token


def test_reply_at_the_body_limit_is_answered() -> None:
    f = request_flow("/token", method="POST", headers=[("Content-Length", str(answers.MAX_LOCAL_BODY))])
    answers.reply(f, 200, b"{}")
    assert f.response is not None and f.live


def test_reply_error_is_the_registry_error_format() -> None:
    f = request_flow("/v2/x/manifests/v1")
    answers.reply_error(f, RegistryError(404, "MANIFEST_UNKNOWN"))
    assert f.response is not None and f.response.status_code == 404
    assert errors(f) == ["MANIFEST_UNKNOWN"]


def test_service_is_the_public_base_netloc() -> None:
    assert answers.service("https://reg.example.com:8443") == "reg.example.com:8443"


def test_challenge_names_the_realm_service_scope_and_error() -> None:
    f = request_flow("/v2/bp/x/manifests/v1")
    answers.challenge(f, "https://reg.example.com", "repository:bp/x:pull", "invalid_token")
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
