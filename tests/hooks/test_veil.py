"""veil.py: `Veil` keeps secrets out of the flow, `Courier` puts them in for the send, `Unveil` for the chain."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hooks.conftest import BACKPLANE, config_text, nginx, request_flow, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.debug.redact import Redactor
from regproxy.flow import state as flowstate
from regproxy.steps.config_loader import Configuration
from regproxy.steps.veil import (
    MAX_SCRUBBED_BODY,
    REDACTED,
    Courier,
    FlowSecrets,
    Unveil,
    Veil,
    scrubbed_body,
    scrubbed_headers,
)
from rig.keys import CAP

CONFIG = config_text(BACKPLANE, nginx())
SIGNED = "https://cdn.example.net/blob?X-Amz-Signature=SECRET"
PASETO = "v4.local.c2VjcmV0LXRva2VuLWJ5dGVz"


@pytest.fixture
def secrets(config: Configuration) -> FlowSecrets:
    return FlowSecrets(config)


def redirected(streamed: bool) -> http.HTTPFlow:
    """An upstream flow whose response redirects to a signed storage URL."""
    f = request_flow("/v2/backplane/true/blobs/sha256:" + "a" * 64)
    st = with_state(f)
    st.kind, st.streamed = "upstream", streamed
    f.response = http.Response.make(307, b"", {"Location": SIGNED})
    return f


# --- Veil: requests ---------------------------------------------------------------------


def test_veil_hides_the_clients_authorization(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/v2/bp/true/manifests/v1", headers=[("Authorization", f"Bearer {PASETO}")])
        with_state(f)
        veil.requestheaders(f)
    assert f.request.headers["authorization"] == REDACTED


def test_veil_leaves_a_flow_without_state_alone(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/v2/", headers=[("Authorization", f"Bearer {PASETO}")])
        veil.requestheaders(f)
        veil.request(f)
    assert f.request.headers["authorization"] == f"Bearer {PASETO}"


def test_a_locally_answered_flow_keeps_only_the_redacted_path(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow(f"/v2/{CAP}/nginx/manifests/v1", method="PUT")
        st = with_state(f)
        st.log_path = "<cap:0123456789>/nginx/manifests/v1"  # as routing names it
        f.response = http.Response.make(405)
        veil.requestheaders(f)
    assert f.request.path == "/v2/<cap:0123456789>/nginx/manifests/v1"


def test_a_local_path_that_is_already_a_path_is_kept_as_it_is(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/healthz?probe=1")
        st = with_state(f)
        st.log_path = "/healthz"
        f.response = http.Response.make(200)
        veil.requestheaders(f)
    assert f.request.path == "/healthz"


def test_a_token_answer_keeps_its_path(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/token")
        st = with_state(f)
        st.kind, st.log_path = "token", "/token (bp/)"
        f.response = http.Response.make(405)
        veil.requestheaders(f)
    assert f.request.path == "/token"


def test_the_upstream_credential_is_only_put_in_by_the_courier(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)
    with taddons.context(veil, courier):
        f = request_flow("/v2/backplane/true/manifests/v1")
        st = with_state(f)
        st.kind, st.upstream_auth = "upstream", "Bearer UPSTREAM-TOKEN"
        veil.request(f)
        assert "authorization" not in f.request.headers  # what every hook before the send sees
        courier.update([f])
    assert f.request.headers["authorization"] == "Bearer UPSTREAM-TOKEN"


def test_the_courier_sends_no_credential_the_veil_did_not_ask_for(secrets: FlowSecrets) -> None:
    courier = Courier(secrets)
    with taddons.context(courier):
        f = request_flow("/v2/backplane/true/manifests/v1")
        st = with_state(f)
        st.kind, st.upstream_auth = "upstream", "Bearer UPSTREAM-TOKEN"
        secrets.of(f)  # the flow is known, but `Veil.request` never ran
        courier.update([f])
    assert "authorization" not in f.request.headers


def test_a_request_answered_locally_gets_no_upstream_credential(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)
    with taddons.context(veil, courier):
        f = request_flow("/v2/backplane/true/manifests/v1")
        st = with_state(f)
        st.kind, st.upstream_auth = "upstream", "Bearer UPSTREAM-TOKEN"
        veil.request(f)
        f.response = http.Response.make(500)
        courier.update([f])
    assert "authorization" not in f.request.headers


def test_a_hook_after_the_request_withdraws_the_pending_credential(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)
    with taddons.context(veil, courier):
        f = request_flow("/v2/backplane/true/manifests/v1")
        st = with_state(f)
        st.kind, st.upstream_auth = "upstream", "Bearer UPSTREAM-TOKEN"
        veil.request(f)
        veil.error(f)
        courier.update([f])
    assert "authorization" not in f.request.headers


# --- Veil, Courier, Unveil: responses ----------------------------------------------------


def test_a_streamed_redirect_is_shown_redacted_sent_real_and_redacted_again(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)

    async def go() -> None:
        with taddons.context(veil, courier):
            f = redirected(streamed=True)
            veil.responseheaders(f)
            assert f.response is not None
            assert f.response.headers["location"] == f"https://cdn.example.net/blob?{REDACTED}"
            courier.update([f])
            assert f.response.headers["location"] == SIGNED  # what is sent
            f.live = False  # sent
            for _ in range(100):
                await asyncio.sleep(0.01)
                if f.response.headers["location"] != SIGNED:
                    break
            assert f.response.headers["location"] == f"https://cdn.example.net/blob?{REDACTED}"

    asyncio.run(go())


def test_a_buffered_response_is_not_sent_from_responseheaders(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)
    with taddons.context(veil, courier):
        f = redirected(streamed=False)
        veil.responseheaders(f)
        courier.update([f])
        assert f.response is not None and REDACTED in f.response.headers["location"]


def test_unveil_gives_the_chain_the_real_response(secrets: FlowSecrets) -> None:
    veil, unveil = Veil(secrets), Unveil(secrets)
    with taddons.context(unveil, veil):
        f = redirected(streamed=False)
        veil.responseheaders(f)
        unveil.response(f)
    assert f.response is not None and f.response.headers["location"] == SIGNED


def test_the_response_hook_hides_again_and_the_courier_sends_the_real_one(secrets: FlowSecrets) -> None:
    veil, unveil, courier = Veil(secrets), Unveil(secrets), Courier(secrets)

    async def go() -> None:
        with taddons.context(unveil, veil, courier):
            f = redirected(streamed=False)
            veil.responseheaders(f)
            unveil.response(f)
            veil.response(f)
            assert f.response is not None and REDACTED in f.response.headers["location"]
            courier.update([f])
            assert f.response.headers["location"] == SIGNED

    asyncio.run(go())


def test_unveil_leaves_a_flow_without_secrets_alone(secrets: FlowSecrets) -> None:
    unveil = Unveil(secrets)
    with taddons.context(unveil):
        f = request_flow("/v2/")
        f.response = http.Response.make(200, b"{}", {"X": "1"})
        unveil.response(f)
        unveil.error(f)
    assert f.response.headers["x"] == "1" and f.response.content == b"{}"


def test_a_token_in_a_small_body_is_hidden_and_sent(secrets: FlowSecrets) -> None:
    veil, courier = Veil(secrets), Courier(secrets)
    body = json.dumps({"token": PASETO, "expires_in": 60}).encode()

    async def go() -> http.HTTPFlow:
        with taddons.context(veil, courier):
            f = request_flow("/token")
            st = with_state(f)
            st.kind = "token"
            f.response = http.Response.make(200, body, {"Content-Type": "application/json"})
            veil.response(f)
            assert f.response is not None and PASETO.encode() not in (f.response.raw_content or b"")
            assert json.loads(f.response.content or b"")["token"] == "[redacted]"
            courier.update([f])
            assert f.response.raw_content == body
            return f

    asyncio.run(go())


def test_a_capability_key_in_a_challenge_is_hidden(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow(f"/v2/{CAP}/nginx/manifests/v1")
        with_state(f)
        challenge = f'Bearer realm="http://reg.test/token",scope="repository:{CAP}/nginx:pull"'
        f.response = http.Response.make(401, b"", {"WWW-Authenticate": challenge})
        veil.responseheaders(f)
    assert f.response is not None and CAP not in f.response.headers["www-authenticate"]
    assert "repository:<capability>/nginx:pull" in f.response.headers["www-authenticate"]


def test_done_redacts_the_authorization_of_flows_still_in_flight(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/v2/backplane/true/manifests/v1", headers=[("Authorization", "Bearer UPSTREAM-TOKEN")])
        with_state(f)
        veil.done()
    assert f.request.headers["authorization"] == REDACTED


def test_running_puts_exactly_one_courier_at_the_very_end(secrets: FlowSecrets) -> None:
    veil = Veil(secrets)
    with taddons.context(veil) as tctx:
        veil.running()
        veil.running()  # again, as after a script reload
        couriers = [a for a in tctx.master.addons.chain if isinstance(a, Courier)]
        assert len(couriers) == 1 and tctx.master.addons.chain[-1] is couriers[0]
        assert couriers[0].secrets is secrets


# --- failing closed ---------------------------------------------------------------------


def test_a_failing_veil_kills_a_response_rather_than_show_it(
    secrets: FlowSecrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> Redactor:
        raise RuntimeError("no redactor")

    monkeypatch.setattr(secrets, "redactor", boom)
    veil = Veil(secrets)
    with taddons.context(veil):
        f = redirected(streamed=True)
        veil.responseheaders(f)
    assert f.error is not None and not f.live


def test_a_failing_veil_on_a_request_answers_500(secrets: FlowSecrets, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(flow: http.HTTPFlow) -> None:
        raise RuntimeError("no state")

    veil = Veil(secrets)
    with taddons.context(veil):
        f = request_flow("/v2/bp/true/manifests/v1")
        with_state(f)
        monkeypatch.setattr(flowstate, "of", boom)
        veil.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500


def test_a_failing_courier_logs_and_sends_nothing(
    secrets: FlowSecrets, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(flow: http.HTTPFlow) -> None:
        raise RuntimeError("lost")

    courier = Courier(secrets)
    monkeypatch.setattr(secrets, "get", boom)
    with taddons.context(courier), caplog.at_level(logging.ERROR, "registryproxy"):
        f = redirected(streamed=True)
        courier.update([f])  # no exception escapes
    assert "internal error delivering a flow (RuntimeError)" in caplog.text


# --- the scrubbing helpers --------------------------------------------------------------


def test_headers_without_secrets_are_not_copied() -> None:
    assert scrubbed_headers(http.Headers(Location="/v2/bp/x/blobs/y", Etag="1"), Redactor()) is None


def test_a_redirect_query_is_redacted_whatever_it_holds() -> None:
    shown = scrubbed_headers(http.Headers(Location="https://cdn.example.net/b?id=1"), Redactor())
    assert shown is not None and shown["location"] == f"https://cdn.example.net/b?{REDACTED}"


def test_a_body_over_the_limit_is_never_searched() -> None:
    body = b'{"token":"' + PASETO.encode() + b'"}' + b" " * MAX_SCRUBBED_BODY
    assert scrubbed_body(body, Redactor()) is body


def test_a_small_body_keeps_bytes_that_are_not_utf8() -> None:
    body = b'\xff{"password":"hunter2"}\xfe'
    assert scrubbed_body(body, Redactor()) == b'\xff{"password":"[redacted]"}\xfe'
