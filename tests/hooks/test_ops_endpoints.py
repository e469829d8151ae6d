"""steps/ops_endpoints.py: /healthz, /readyz and /metrics on the registry port, or on a listener of their own."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hooks.conftest import new_metrics, request_flow, with_state
from mitmproxy import exceptions, http
from mitmproxy.test import taddons
from regproxy.ops.metrics import Metrics
from regproxy.steps.config_loader import Configuration
from regproxy.steps.ops_endpoints import Operations


@pytest.fixture
def tctx(metrics: Metrics) -> Iterator[Any]:
    """A context holding the Operations of a proxy without a valid configuration (yet)."""
    with taddons.context(Operations(metrics, Configuration(metrics).ready)) as tctx:
        yield tctx


@pytest.fixture
def ops(tctx: Any) -> Operations:
    addon = tctx.master.addons.get("operations")
    assert isinstance(addon, Operations)
    return addon


def answered(addon: Operations, path: str, method: str = "GET", accept: str | None = None) -> http.HTTPFlow:
    f = request_flow(path, method, [("Accept", accept)] if accept else None)
    addon.requestheaders(f)
    return f


def test_the_listen_option_is_registered_empty() -> None:
    addon = Operations(new_metrics(), lambda: (True, ""))
    with taddons.context(addon) as tctx:
        assert tctx.options.registryproxy_ops_listen == ""


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "::1:9100", "[::1:9100", "a b:9100"])
def test_an_invalid_listen_address_is_refused(tctx: Any, ops: Operations, value: str) -> None:
    with pytest.raises(exceptions.OptionsError, match="registryproxy_ops_listen"):
        tctx.configure(ops, registryproxy_ops_listen=value)


def test_a_valid_listen_address_is_accepted_before_running(tctx: Any, ops: Operations) -> None:
    tctx.configure(ops, registryproxy_ops_listen="127.0.0.1:0")
    assert tctx.options.registryproxy_ops_listen == "127.0.0.1:0"
    assert ops._server is None  # the listener starts with the proxy


def test_healthz_answers_without_a_configuration(ops: Operations) -> None:
    f = answered(ops, "/healthz")
    assert f.response is not None and f.response.status_code == 200
    assert json.loads(f.response.content or b"") == {"status": "alive"}
    assert f.response.headers["cache-control"] == "no-store"


def test_readyz_is_503_without_a_configuration(ops: Operations) -> None:
    f = answered(ops, "/readyz")
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content or b"") == {"status": "not ready", "detail": "no valid configuration loaded"}


def test_readyz_is_200_when_ready(metrics: Metrics) -> None:
    addon = Operations(metrics, lambda: (True, "2 mappings loaded"))
    with taddons.context(addon):
        f = answered(addon, "/readyz")
    assert f.response is not None and f.response.status_code == 200
    assert json.loads(f.response.content or b"")["detail"] == "2 mappings loaded"


def test_metrics_answers_the_text_exposition(ops: Operations, metrics: Metrics) -> None:
    metrics.redirect("bp/")
    f = answered(ops, "/metrics")
    assert f.response is not None and f.response.status_code == 200
    assert f.response.headers["content-type"].startswith("text/plain")
    assert b'registryproxy_redirects_total{mapping="bp/"} 1.0' in (f.response.content or b"")


def test_metrics_answers_openmetrics_when_asked(ops: Operations) -> None:
    f = answered(ops, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert f.response is not None and f.response.headers["content-type"].startswith("application/openmetrics-text")
    assert (f.response.content or b"").endswith(b"# EOF\n")


def test_head_gets_the_length_without_the_body(ops: Operations) -> None:
    f = answered(ops, "/healthz", method="HEAD")
    assert f.response is not None and f.response.status_code == 200 and f.response.content == b""
    assert f.response.headers["content-length"] == str(len(b'{"status":"alive"}'))


def test_a_query_string_is_ignored(ops: Operations) -> None:
    f = answered(ops, "/healthz?verbose=1")
    assert f.response is not None and f.response.status_code == 200


def test_the_log_path_is_the_operations_path(ops: Operations) -> None:
    f = request_flow("/healthz?probe=lb-1")
    st = with_state(f)
    ops.requestheaders(f)
    assert st.log_path == "/healthz"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_left_to_the_rest_of_the_chain(ops: Operations, method: str) -> None:
    assert answered(ops, "/healthz", method=method).response is None


@pytest.mark.parametrize("path", ["/v2/", "/healthz/", "/metricsx", "/token"])
def test_other_paths_are_left_alone(ops: Operations, path: str) -> None:
    assert answered(ops, path).response is None


def test_with_a_listener_of_their_own_the_paths_are_left_alone(tctx: Any, ops: Operations) -> None:
    tctx.configure(ops, registryproxy_ops_listen="127.0.0.1:0")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert answered(ops, path).response is None


def test_a_flow_already_answered_is_left_alone(ops: Operations) -> None:
    f = request_flow("/healthz")
    f.response = http.Response.make(418)
    ops.requestheaders(f)
    assert f.response.status_code == 418


def test_a_failing_readiness_check_fails_closed(metrics: Metrics) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("broken")

    addon = Operations(metrics, broken)
    with taddons.context(addon):
        f = answered(addon, "/readyz")
    assert f.response is not None and f.response.status_code == 500


def test_running_starts_the_listener_and_done_stops_it(tctx: Any, ops: Operations) -> None:
    tctx.configure(ops, registryproxy_ops_listen="127.0.0.1:0")
    ops.running()
    try:
        assert ops._server is not None
        host, port = ops._server.address
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        ops.done()
    assert ops._server is None


def test_an_address_in_use_is_logged_not_raised(tctx: Any, ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tctx.configure(ops, registryproxy_ops_listen=f"127.0.0.1:{port}")
        ops.running()
        assert ops._server is None
        ops.done()
    assert f"registryproxy_ops_listen: cannot listen at 127.0.0.1:{port}" in caplog.text
