"""The operations listener: health answers, OpsServer and its address option (ops/listener.py)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from regproxy.ops.listener import MAX_CONNECTIONS, OpsServer, health_answer, parse_listen
from regproxy.ops.metrics import MULTIPROC_ENV, Metrics

HTTP_TIMEOUT = 5.0


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    """The proxy's real metrics source, for the listener to serve."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return Metrics()


def samples(body: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name` in a text exposition, by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


# --- health_answer ---


def fixed_metrics(accept: str | None) -> tuple[bytes, str]:
    return f"metrics for {accept}".encode(), "text/plain; version=0.0.4; charset=utf-8"


def test_health_answer_healthz() -> None:
    assert health_answer("/healthz", (False, "x"), None, None) == (200, b'{"status":"alive"}', "application/json")


def test_health_answer_readyz() -> None:
    status, body, content_type = health_answer("/readyz", (True, "3 mappings"), None, None) or (0, b"", "")
    assert (status, json.loads(body), content_type) == (
        200,
        {"status": "ready", "detail": "3 mappings"},
        "application/json",
    )
    status, body, _ = health_answer("/readyz?verbose", (False, 'no "config"'), None, None) or (0, b"", "")
    assert (status, json.loads(body)) == (503, {"status": "not ready", "detail": 'no "config"'})


def test_health_answer_metrics() -> None:
    answer = health_answer("/metrics", (True, ""), fixed_metrics, "text/plain")
    assert answer == (200, b"metrics for text/plain", "text/plain; version=0.0.4; charset=utf-8")


@pytest.mark.parametrize("path", ["/", "/metrics/", "/v2/", "/healthz/x", "healthz", "/HEALTHZ", ""])
def test_health_answer_other_paths(path: str) -> None:
    assert health_answer(path, (True, ""), fixed_metrics, None) is None


def test_health_answer_metrics_without_a_source() -> None:
    assert health_answer("/metrics", (True, ""), None, None) is None


# --- OpsServer ---


class Ready:
    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (True, "serving 2 mappings")
        self.fail = False

    def __call__(self) -> tuple[bool, str]:
        if self.fail:
            raise RuntimeError("secret-detail-must-not-leak")
        return self.answer


@pytest.fixture
def ready() -> Ready:
    return Ready()


@pytest.fixture
def ops(metrics: Metrics, ready: Ready) -> Iterator[tuple[str, int]]:
    server = OpsServer("127.0.0.1", 0, metrics.render, ready)
    address = server.start()
    try:
        yield address
    finally:
        server.stop()


def get(
    address: tuple[str, int], path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_ops_start_binds_a_kernel_chosen_port(ops: tuple[str, int]) -> None:
    host, port = ops
    assert host == "127.0.0.1" and port > 0


def test_ops_healthz(ops: tuple[str, int]) -> None:
    status, headers, body = get(ops, "/healthz")
    assert (status, body, headers["content-type"]) == (200, b'{"status":"alive"}', "application/json")
    assert headers["content-length"] == str(len(body))


def test_ops_readyz(ops: tuple[str, int], ready: Ready) -> None:
    status, _, body = get(ops, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready", "detail": "serving 2 mappings"})
    ready.answer = (False, "configuration not loaded")
    status, headers, body = get(ops, "/readyz")
    assert (status, json.loads(body)) == (503, {"status": "not ready", "detail": "configuration not loaded"})
    assert headers["content-type"] == "application/json"


def test_ops_metrics(ops: tuple[str, int], metrics: Metrics) -> None:
    metrics.request(mapping="bp/", method="GET", route="manifest", status=200)
    status, headers, body = get(ops, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(body, "registryproxy_requests_total")
    assert found == {(("mapping", "bp/"), ("method", "GET"), ("route", "manifest"), ("status", "200")): 1.0}


def test_ops_metrics_openmetrics(ops: tuple[str, int]) -> None:
    status, headers, body = get(ops, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


def test_ops_head_has_headers_only(ops: tuple[str, int]) -> None:
    status, headers, body = get(ops, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_ops_unknown_path_is_404_json(ops: tuple[str, int]) -> None:
    status, headers, body = get(ops, "/v2/")
    assert (status, json.loads(body), headers["content-type"]) == (404, {"status": "not found"}, "application/json")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_ops_other_methods_are_405_json(ops: tuple[str, int], method: str) -> None:
    status, headers, body = get(ops, "/metrics", method=method)
    assert (status, json.loads(body)) == (405, {"status": "method not allowed"})
    assert headers["allow"] == "GET, HEAD"


def test_ops_unknown_method_is_json(ops: tuple[str, int]) -> None:
    status, headers, body = get(ops, "/healthz", method="BREW")
    assert status == 501 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "error", "code": 501}


def test_ops_failing_source_answers_500_and_keeps_serving(ops: tuple[str, int], ready: Ready) -> None:
    ready.fail = True
    status, _, body = get(ops, "/readyz")
    assert (status, json.loads(body)) == (500, {"status": "error"})
    assert b"secret-detail" not in body
    assert get(ops, "/healthz")[0] == 200


def test_ops_oversized_request_line_is_refused(ops: tuple[str, int]) -> None:
    with socket.create_connection(ops, timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.0 414")
    assert get(ops, "/healthz")[0] == 200


def test_ops_too_many_headers_are_refused(ops: tuple[str, int]) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    with socket.create_connection(ops, timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.0 431")


def test_ops_does_not_log_requests(ops: tuple[str, int], capfd: pytest.CaptureFixture[str], ready: Ready) -> None:
    capfd.readouterr()
    get(ops, "/healthz")
    get(ops, "/nope")
    get(ops, "/metrics", method="POST")
    ready.fail = True
    get(ops, "/readyz")
    with socket.create_connection(ops, timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        sock.recv(1024)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_ops_stop_is_prompt_and_releases_the_port(metrics: Metrics, ready: Ready) -> None:
    server = OpsServer("127.0.0.1", 0, metrics.render, ready)
    address = server.start()
    assert get(address, "/healthz")[0] == 200
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=HTTP_TIMEOUT).close()
    server.stop()  # a second stop is harmless


def test_ops_stop_with_an_idle_client_connected(metrics: Metrics, ready: Ready) -> None:
    server = OpsServer("127.0.0.1", 0, metrics.render, ready)
    address = server.start()
    idle = socket.create_connection(address, timeout=HTTP_TIMEOUT)  # opened, never sends a request
    try:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
    finally:
        idle.close()


def test_ops_bounds_concurrent_connections(ops: tuple[str, int]) -> None:
    idle = [socket.create_connection(ops, timeout=HTTP_TIMEOUT) for _ in range(MAX_CONNECTIONS)]
    try:
        assert get_when(ops, lambda answer: answer is None) is None  # closed unanswered: no slot left
    finally:
        for sock in idle:
            sock.close()
    assert get_when(ops, lambda answer: answer == 200) == 200  # slots come back as the idle clients leave


def get_when(address: tuple[str, int], wanted: Callable[[int | None], bool]) -> int | None:
    """Ask /healthz until the answer (a status, or None when the connection is closed unanswered) is wanted."""
    deadline = time.monotonic() + HTTP_TIMEOUT
    while True:
        try:
            status: int | None = get(address, "/healthz")[0]
        except (http.client.RemoteDisconnected, ConnectionResetError):
            status = None
        if wanted(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_ops_start_on_a_taken_port_raises(ops: tuple[str, int], metrics: Metrics, ready: Ready) -> None:
    with pytest.raises(OSError):
        OpsServer("127.0.0.1", ops[1], metrics.render, ready).start()


def test_ops_serves_what_it_is_given(ready: Ready) -> None:
    calls: list[str | None] = []

    def source(accept: str | None) -> tuple[bytes, str]:
        calls.append(accept)
        return b"given", "text/plain"

    server = OpsServer("127.0.0.1", 0, source, ready)
    address = server.start()
    try:
        assert get(address, "/metrics", headers={"Accept": "x/y"})[2] == b"given"
        assert get(address, "/metrics")[2] == b"given"
    finally:
        server.stop()
    assert calls == ["x/y", None]


# --- parse_listen ---


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:0", ("::", 0)),
        (":9100", ("0.0.0.0", 9100)),
        ("localhost:65535", ("localhost", 65535)),
        (" 0.0.0.0:80 ", ("0.0.0.0", 80)),
        ("ops.internal:9100", ("ops.internal", 9100)),
    ],
)
def test_parse_listen(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize(
    "text",
    ["", "9100", "localhost", "::1:9100", "[::1]9100", "[::1]:", "[]:80", "[127.0.0.1]:80", "[::1:80"]
    + ["host:70000", "host:-1", "host:+80", "host:abc", "host:", "host:٣", "host:123456", "a b:80", "a/b:80"]
    + ["user@host:80", "h\x00:80"],
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="registryproxy_ops_listen") as info:
        parse_listen(text)
    assert "\n" not in str(info.value)


@given(st.text(max_size=80))
def test_parse_listen_only_raises_value_error(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ValueError as e:
        assert str(e).startswith("registryproxy_ops_listen: ") and "\n" not in str(e)
        return
    assert host and 0 <= port <= 65535


def test_parse_listen_result_binds(metrics: Metrics, ready: Ready) -> None:
    server = OpsServer(*parse_listen("127.0.0.1:0"), metrics.render, ready)
    host, port = server.start()
    try:
        assert get((host, port), "/healthz")[0] == 200
    finally:
        server.stop()
