"""steps/access_log.py: one log line per request (text or JSON), its metrics, and its comment and mark."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hooks.conftest import BACKPLANE, config_text, nginx, request_flow, sample, with_state
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow
from regproxy.flow.state import FlowState
from regproxy.ops.metrics import Metrics
from regproxy.protocol.names import parse_route
from regproxy.steps.access_log import MARK_FAILED, MARK_REFUSED, AccessLog
from regproxy.steps.config_loader import Configuration
from rig.keys import CAP

CONFIG = config_text(BACKPLANE, nginx())
PASETO = "v4.local.c2VjcmV0LXRva2VuLWJ5dGVz"
QUIETED = ("mitmproxy.proxy.server", "httpx", "httpcore")


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """The addon sets the level of mitmproxy's and httpx's loggers: give them back."""
    levels = {name: logging.getLogger(name).level for name in QUIETED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def tctx(config: Configuration, metrics: Metrics) -> Iterator[Any]:
    with taddons.context(AccessLog(config, metrics)) as tctx:
        yield tctx


@pytest.fixture
def log(tctx: Any) -> AccessLog:
    addon = tctx.master.addons.get("accesslog")
    assert isinstance(addon, AccessLog)
    return addon


def json_format(tctx: Any, log: AccessLog) -> None:
    tctx.configure(log, registryproxy_log_format="json")
    for handler in logging.getLogger("registryproxy.access").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's capture handlers, attached here too
            handler.stream = sys.stdout  # the handler outlives a test (and its captured stdout)


def upstream_flow(
    config: Configuration, status: int = 200, headers: dict[str, str] | None = None
) -> tuple[http.HTTPFlow, FlowState]:
    """A flow routed upstream and answered, as the chain leaves it for the log."""
    assert config.state is not None
    path = "/v2/bp/true/blobs/sha256:" + "e" * 64
    f = request_flow(path)
    st = with_state(f)
    st.kind, st.route, st.token = "upstream", parse_route(path), "ok"
    st.match = config.state.matcher.match("bp/true", None)
    st.log_path = "bp/true/blobs/sha256:" + "e" * 64
    st.upstream_status = status
    f.comment = "registryproxy: routed"
    f.response = http.Response.make(status)
    f.response.headers.update(headers or {})  # as the upstream announced them (the body is not read here)
    return f, st


def local_flow(status: int, token: str = "ok", path: str = "/v2/") -> tuple[http.HTTPFlow, FlowState]:
    f = request_flow(path)
    st = with_state(f)
    st.log_path, st.token = path, token
    f.response = http.Response.make(status, b"{}")
    return f, st


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "registryproxy"]


# --- options ------------------------------------------------------------------------------


def test_options_are_registered_with_their_defaults(tctx: Any) -> None:
    assert tctx.options.registryproxy_connection_logs is False
    assert tctx.options.registryproxy_log_format == "text"


@pytest.mark.parametrize("value", ["xml", "JSON"])
def test_an_unknown_log_format_is_refused(tctx: Any, log: AccessLog, value: str) -> None:
    """mitmproxy checks `choices` only for command-line flags, not for `--set` or an options update."""
    with pytest.raises(exceptions.OptionsError, match="registryproxy_log_format"):
        tctx.configure(log, registryproxy_log_format=value)


def test_mitmproxys_connection_lines_are_quiet_unless_asked_for(tctx: Any, log: AccessLog) -> None:
    assert all(logging.getLogger(name).level == logging.WARNING for name in QUIETED)
    tctx.configure(log, registryproxy_connection_logs=True)
    assert all(logging.getLogger(name).level == logging.NOTSET for name in QUIETED)
    tctx.configure(log, registryproxy_connection_logs=False)
    assert all(logging.getLogger(name).level == logging.WARNING for name in QUIETED)


# --- the line -----------------------------------------------------------------------------


def test_a_text_line_per_request(log: AccessLog, config: Configuration, caplog: pytest.LogCaptureFixture) -> None:
    f, st = upstream_flow(config, 200, {"Content-Length": "42"})
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(f)
    [line] = lines(caplog)
    assert line.startswith(f"GET {st.log_path} mapping=bp/ status=200 upstream=200 bytes=42 ")
    assert line.endswith("ms cache=off token=ok")


def test_a_streamed_body_is_logged_with_the_bytes_sent(
    log: AccessLog, config: Configuration, caplog: pytest.LogCaptureFixture
) -> None:
    f, st = upstream_flow(config, 200, {"Content-Length": "42"})
    st.streamed, st.bytes_streamed = True, 17
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(f)
    assert " bytes=17 " in lines(caplog)[0]


def test_a_replaced_error_body_is_logged_with_its_own_length(
    log: AccessLog, config: Configuration, caplog: pytest.LogCaptureFixture
) -> None:
    f, st = upstream_flow(config, 404, {"Content-Length": "61"})
    st.streamed, st.error_body, st.bytes_streamed = True, b"x" * 61, 0
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(f)
    assert " status=404 upstream=404 bytes=61 " in lines(caplog)[0]


@pytest.mark.parametrize(("timed_out", "upstream"), [(False, "failed"), (True, "timeout")])
def test_a_failed_flow_is_logged_as_an_error(
    log: AccessLog, config: Configuration, caplog: pytest.LogCaptureFixture, timed_out: bool, upstream: str
) -> None:
    f, st = upstream_flow(config)
    f.response = None
    f.error = tflow.terr("connection closed")
    st.timed_out = timed_out
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.error(f)
    assert f" status=error upstream={upstream} bytes=- " in lines(caplog)[0]


def test_a_json_line_per_request(
    tctx: Any, log: AccessLog, config: Configuration, capsys: pytest.CaptureFixture[str]
) -> None:
    json_format(tctx, log)
    f, st = upstream_flow(config, 200, {"Content-Length": "42"})
    log.response(f)
    record = json.loads(capsys.readouterr().out)
    assert record["request_id"] == f.id and record["client"] == "127.0.0.1:22"
    assert (record["method"], record["name"], record["mapping"]) == ("GET", st.log_path, "bp/")
    assert (record["status"], record["upstream_status"], record["bytes"], record["token"]) == (200, 200, 42, "ok")
    assert isinstance(record["duration_ms"], float) and record["time"].endswith("+00:00")


def test_a_json_line_holds_no_secret(
    tctx: Any, log: AccessLog, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    json_format(tctx, log)
    f, _ = local_flow(401, token=f"refused: bearer {PASETO}", path=f"/v2/{CAP}/nginx/manifests/v1")
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(f)
    out = capsys.readouterr().out
    record = json.loads(out)
    assert CAP not in out and PASETO not in out
    assert record["name"] == "/v2/<capability>/nginx/manifests/v1"
    assert record["upstream_status"] is None and lines(caplog) == []  # JSON replaces the text line


def test_switching_back_to_text(tctx: Any, log: AccessLog, caplog: pytest.LogCaptureFixture) -> None:
    json_format(tctx, log)
    tctx.configure(log, registryproxy_log_format="text")
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(local_flow(200)[0])
    assert lines(caplog)[0].startswith("GET /v2/ mapping=- status=200 upstream=- ")


def test_a_flow_without_state_is_not_logged(log: AccessLog, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    f = request_flow("/v2/")
    f.response = http.Response.make(200)
    with caplog.at_level(logging.INFO, "registryproxy"):
        log.response(f)
    assert lines(caplog) == [] and f.comment == "" and not f.marked
    assert sample(metrics, "registryproxy_requests_total", mapping="-", method="GET", route="other", status="200") == 0


# --- comment and mark ---------------------------------------------------------------------


def test_an_upstream_flows_comment_gets_the_outcome(log: AccessLog, config: Configuration) -> None:
    f, _ = upstream_flow(config, 200)
    log.response(f)
    assert f.comment == "registryproxy: routed; token ok; upstream 200"
    assert not f.marked


def test_a_local_answers_comment_says_so(log: AccessLog) -> None:
    f, _ = local_flow(404, path="nope/app/manifests/v1")
    log.response(f)
    assert f.comment == "registryproxy: nope/app/manifests/v1 answered locally (404); token ok"


@pytest.mark.parametrize(
    ("status", "token", "mark"),
    [
        (200, "ok", ""),
        (401, "none", ""),  # a challenge is how every pull starts
        (401, "invalid_token", MARK_REFUSED),
        (404, "ok", MARK_REFUSED),
        (500, "ok", MARK_FAILED),
        (502, "ok", MARK_FAILED),
    ],
)
def test_refusals_and_failures_are_marked(log: AccessLog, status: int, token: str, mark: str) -> None:
    f, _ = local_flow(status, token)
    log.response(f)
    assert f.marked == mark


def test_a_failed_or_timed_out_flow_is_marked_failed(log: AccessLog, config: Configuration) -> None:
    f, st = upstream_flow(config, 200)
    st.timed_out = True
    log.response(f)
    assert f.marked == MARK_FAILED


# --- metrics ------------------------------------------------------------------------------


def test_each_request_is_counted(log: AccessLog, config: Configuration, metrics: Metrics) -> None:
    f, st = upstream_flow(config, 200)
    st.bytes_streamed = 1234
    st.token_refusal = "expired"
    log.response(f)
    labels = {"mapping": "bp/", "method": "GET", "route": "blob", "status": "200"}
    assert sample(metrics, "registryproxy_requests_total", **labels) == 1
    assert sample(metrics, "registryproxy_streamed_bytes_total", mapping="bp/") == 1234
    assert sample(metrics, "registryproxy_tokens_refused_total", reason="expired") == 1


def test_token_requests_and_errors_are_counted_with_their_route(log: AccessLog, metrics: Metrics) -> None:
    f, st = local_flow(200, path="/token")
    st.kind = "token"
    log.response(f)
    g = request_flow("/v2/")
    with_state(g)
    g.error = tflow.terr("killed")
    log.error(g)
    assert sample(metrics, "registryproxy_requests_total", mapping="-", method="GET", route="token", status="200") == 1
    assert (
        sample(metrics, "registryproxy_requests_total", mapping="-", method="GET", route="other", status="error") == 1
    )


# --- failing closed -----------------------------------------------------------------------


def test_a_failure_while_logging_kills_the_flow(
    log: AccessLog, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(**labels: object) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(metrics, "request", boom)
    f, _ = local_flow(200)
    log.response(f)  # no exception escapes
    assert f.error is not None and not f.live
