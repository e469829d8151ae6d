"""Metrics, label folding, exposition and multiprocess aggregation (ops/metrics.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from regproxy.ops.labels import (
    GRANTS,
    METHODS,
    REFUSAL_REASONS,
    ROUTES,
    fold_mapping,
    fold_method,
    fold_reason,
    fold_route,
    fold_status,
)
from regproxy.ops.metrics import MULTIPROC_ENV, Metrics

ADDON_DIR = Path(__file__).resolve().parents[3] / "addon"
SUBPROCESS_TIMEOUT = 60.0


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return Metrics()


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def samples(body: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name` in a text exposition, by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


# --- each metric, with its labels ---


def test_request_counter(metrics: Metrics) -> None:
    metrics.request(mapping="bp/", method="GET", route="manifest", status=200)
    metrics.request(mapping="bp/", method="GET", route="manifest", status=200)
    metrics.request(mapping="bp/", method="HEAD", route="blob", status=404)
    labels = {"mapping": "bp/", "method": "GET", "route": "manifest", "status": "200"}
    assert value(metrics, "registryproxy_requests_total", **labels) == 2
    assert value(metrics, "registryproxy_requests_total", mapping="bp/", method="HEAD", route="blob", status="404") == 1


def test_request_without_mapping_or_status(metrics: Metrics) -> None:
    metrics.request(mapping="", method="GET", route="ping", status="error")
    assert value(metrics, "registryproxy_requests_total", mapping="-", method="GET", route="ping", status="error") == 1


def test_upstream_latency_histogram(metrics: Metrics) -> None:
    for seconds in (0.003, 0.2, 0.2, 45.0):
        metrics.upstream_latency("bp/", seconds)
    metrics.upstream_latency("bp/", -1.0)  # a clock step never makes a negative observation
    assert value(metrics, "registryproxy_upstream_latency_seconds_count", mapping="bp/") == 5
    assert value(metrics, "registryproxy_upstream_latency_seconds_sum", mapping="bp/") == pytest.approx(45.403)
    assert value(metrics, "registryproxy_upstream_latency_seconds_bucket", mapping="bp/", le="0.005") == 2
    assert value(metrics, "registryproxy_upstream_latency_seconds_bucket", mapping="bp/", le="0.25") == 4
    assert value(metrics, "registryproxy_upstream_latency_seconds_bucket", mapping="bp/", le="60.0") == 5


def test_bytes_streamed(metrics: Metrics) -> None:
    metrics.bytes_streamed("bp/", 1000)
    metrics.bytes_streamed("bp/", 24)
    metrics.bytes_streamed("bp/", 0)
    metrics.bytes_streamed("bp/", -5)
    assert value(metrics, "registryproxy_streamed_bytes_total", mapping="bp/") == 1024


@pytest.mark.parametrize("grant", [*GRANTS, "other"])
def test_tokens_issued(metrics: Metrics, grant: str) -> None:
    metrics.token_issued(grant)
    assert value(metrics, "registryproxy_tokens_issued_total", grant=grant) == 1


@pytest.mark.parametrize("reason", REFUSAL_REASONS)
def test_tokens_refused(metrics: Metrics, reason: str) -> None:
    metrics.token_refused(reason)
    assert value(metrics, "registryproxy_tokens_refused_total", reason=reason) == 1


def test_tokens_refused_accepts_registry_error_codes(metrics: Metrics) -> None:
    metrics.token_refused("UNAUTHORIZED")
    metrics.token_refused("SIZE_INVALID")
    metrics.token_refused("insufficient-scope")
    assert value(metrics, "registryproxy_tokens_refused_total", reason="unauthorized") == 1
    assert value(metrics, "registryproxy_tokens_refused_total", reason="size_invalid") == 1
    assert value(metrics, "registryproxy_tokens_refused_total", reason="insufficient_scope") == 1


def test_upstream_token_fetches(metrics: Metrics) -> None:
    metrics.upstream_token_fetch("auth.example.com", True)
    metrics.upstream_token_fetch("auth.example.com", False)
    metrics.upstream_token_fetch("auth.example.com", False)
    assert value(metrics, "registryproxy_upstream_token_fetches_total", upstream="auth.example.com", outcome="ok") == 1
    failed = value(metrics, "registryproxy_upstream_token_fetches_total", upstream="auth.example.com", outcome="failed")
    assert failed == 2


def test_redirects(metrics: Metrics) -> None:
    metrics.redirect("cap:1a2b3c")
    assert value(metrics, "registryproxy_redirects_total", mapping="cap:1a2b3c") == 1


def test_config_reloads(metrics: Metrics) -> None:
    metrics.config_reload(True)
    metrics.config_reload(True)
    metrics.config_reload(False)
    assert value(metrics, "registryproxy_config_reloads_total", outcome="ok") == 2
    assert value(metrics, "registryproxy_config_reloads_total", outcome="failed") == 1


def test_config_info_gauges(metrics: Metrics) -> None:
    metrics.set_config_info(mappings=4, keys=2)
    metrics.set_config_info(mappings=3, keys=1)
    assert value(metrics, "registryproxy_mappings") == 3
    assert value(metrics, "registryproxy_secret_keys") == 1


def test_instances_do_not_share_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    first, second = Metrics(), Metrics()
    first.redirect("bp/")
    assert value(first, "registryproxy_redirects_total", mapping="bp/") == 1
    assert value(second, "registryproxy_redirects_total", mapping="bp/") is None


def test_given_registry_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.config_reload(True)
    assert m.registry is registry
    assert registry.get_sample_value("registryproxy_config_reloads_total", {"outcome": "ok"}) == 1


# --- exposition ---


def test_render_text_format(metrics: Metrics) -> None:
    metrics.request(mapping="bp/", method="GET", route="tags", status=200)
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(body, "registryproxy_requests_total")
    assert found == {(("mapping", "bp/"), ("method", "GET"), ("route", "tags"), ("status", "200")): 1.0}


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text",
        "text/plain;q=0.5, application/openmetrics-text;q=0.9",
        "APPLICATION/OPENMETRICS-TEXT; version=abc",
    ],
)
def test_render_openmetrics_when_asked(metrics: Metrics, accept: str) -> None:
    metrics.token_issued("password")
    body, content_type = metrics.render(accept)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b'registryproxy_tokens_issued_total{grant="password"} 1.0' in body


@pytest.mark.parametrize("accept", [None, "", "*/*", "text/plain;version=x.y", "text/html", "\x00" * 100])
def test_render_defaults_to_text(metrics: Metrics, accept: str | None) -> None:
    assert metrics.render(accept)[1] == "text/plain; version=0.0.4; charset=utf-8"


def test_label_values_are_escaped_in_the_exposition(metrics: Metrics) -> None:
    hostile = 'a"b\\c\nd}'
    metrics.redirect(hostile)
    body, _ = metrics.render()
    assert samples(body, "registryproxy_redirects_total") == {(("mapping", hostile),): 1.0}


# --- cardinality folding ---


@pytest.mark.parametrize(
    ("method", "folded"),
    [("GET", "GET"), ("head", "HEAD"), ("Delete", "DELETE"), ("BREW", "OTHER"), ("", "OTHER"), ("G\x00ET", "OTHER")],
)
def test_fold_method(method: str, folded: str) -> None:
    assert fold_method(method) == folded


@pytest.mark.parametrize(("route", "folded"), [*((r, r) for r in ROUTES), ("Blob", "other"), ("../x", "other")])
def test_fold_route(route: str, folded: str) -> None:
    assert fold_route(route) == folded


@pytest.mark.parametrize(
    ("status", "folded"),
    [(200, "200"), (599, "599"), (100, "100"), (99, "error"), (600, "error"), (-1, "error"), (True, "error")]
    + [("error", "error"), ("200", "error"), ("<script>", "error")],
)
def test_fold_status(status: int | str, folded: str) -> None:
    assert fold_status(status) == folded


@pytest.mark.parametrize(
    ("reason", "folded"),
    [("denied", "denied"), ("DENIED", "denied"), (" Expired ", "expired"), ("invalid_request", "invalid_request")]
    + [("malformed claims", "other"), ("x" * 10_000, "other"), ("", "other"), ("denied\n", "denied")],
)
def test_fold_reason(reason: str, folded: str) -> None:
    assert fold_reason(reason) == folded


def test_fold_mapping_truncates_and_names_none() -> None:
    assert fold_mapping("") == "-"
    assert fold_mapping("bp/") == "bp/"
    assert fold_mapping("x" * 500) == "x" * 64


@given(st.text(max_size=200), st.text(max_size=50), st.text(max_size=50), st.text(max_size=50), st.integers())
def test_folded_labels_stay_in_bounded_sets(mapping: str, method: str, route: str, reason: str, status: int) -> None:
    assert fold_method(method) in (*METHODS, "OTHER")
    assert fold_route(route) in ROUTES
    assert fold_reason(reason) in (*REFUSAL_REASONS, "other")
    assert fold_status(status) == "error" or 100 <= int(fold_status(status)) <= 599
    assert 1 <= len(fold_mapping(mapping)) <= 64


def test_hostile_requests_make_a_bounded_number_of_series(metrics: Metrics) -> None:
    for i in range(300):
        metrics.request(mapping="bp/", method=f"M{i}", route=f"/v2/{i}", status=1000 + i)
        metrics.token_refused(f"reason {i}")
        metrics.token_issued(f"grant{i}")
    body, _ = metrics.render()
    assert samples(body, "registryproxy_requests_total") == {
        (("mapping", "bp/"), ("method", "OTHER"), ("route", "other"), ("status", "error")): 300.0
    }
    assert samples(body, "registryproxy_tokens_refused_total") == {(("reason", "other"),): 300.0}
    assert samples(body, "registryproxy_tokens_issued_total") == {(("grant", "other"),): 300.0}


# --- multiprocess mode ---

WRITER = """
import os, sys
from regproxy.ops.metrics import Metrics
m = Metrics()
assert m.multiprocess
n = int(sys.argv[1])
for _ in range(n):
    m.request(mapping="bp/", method="GET", route="blob", status=200)
    m.upstream_latency("bp/", 0.1 * n)
m.bytes_streamed("bp/", 1000 * n)
m.set_config_info(mappings=n, keys=1)
print(os.getpid())
"""

# Sets the variable after prometheus_client was imported, as a supervisor that sets it in-process
# would: Metrics must still write to the files, and aggregate them with the writers'.
READER = """
import os, sys
import prometheus_client
from regproxy.ops import metrics as mod
os.environ[mod.MULTIPROC_ENV] = sys.argv[1]
for pid in sys.argv[2:]:
    mod.mark_process_dead(int(pid))
m = mod.Metrics()
m.request(mapping="bp/", method="GET", route="blob", status=200)
sys.stdout.write(m.render()[0].decode())
"""


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**env, "PYTHONPATH": str(ADDON_DIR)},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_multiprocess_render_aggregates_every_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    writer_env = {**env, MULTIPROC_ENV: str(tmp_path)}
    pids = [run_python(WRITER, str(n), env=writer_env).strip() for n in (2, 3)]
    assert len(set(pids)) == 2
    assert len(list(tmp_path.glob("*.db"))) >= 2

    body = run_python(READER, str(tmp_path), env=env).encode()
    requests = samples(body, "registryproxy_requests_total")
    assert requests == {(("mapping", "bp/"), ("method", "GET"), ("route", "blob"), ("status", "200")): 6.0}
    assert samples(body, "registryproxy_streamed_bytes_total") == {(("mapping", "bp/"),): 5000.0}
    assert samples(body, "registryproxy_upstream_latency_seconds_count") == {(("mapping", "bp/"),): 5.0}
    assert samples(body, "registryproxy_upstream_latency_seconds_sum")[(("mapping", "bp/"),)] == pytest.approx(1.3)
    # The gauge is the most recent value a live process set: the second writer's.
    assert samples(body, "registryproxy_mappings") == {(): 3.0}


def test_multiprocess_dead_workers_leave_gauges_but_keep_counters(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    writer_env = {**env, MULTIPROC_ENV: str(tmp_path)}
    pids = [run_python(WRITER, str(n), env=writer_env).strip() for n in (2, 3)]

    body = run_python(READER, str(tmp_path), *pids, env=env).encode()
    assert samples(body, "registryproxy_mappings") == {}
    requests = samples(body, "registryproxy_requests_total")
    assert requests == {(("mapping", "bp/"), ("method", "GET"), ("route", "blob"), ("status", "200")): 6.0}


def test_reset_multiprocess_dir_removes_stale_samples(tmp_path: Path) -> None:
    from regproxy.ops.metrics import reset_multiprocess_dir

    directory = tmp_path / "prom"
    reset_multiprocess_dir(str(directory))
    assert directory.is_dir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "keep.txt").write_text("not a sample file")
    reset_multiprocess_dir(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
