"""Limits end to end: a real Redis (Debian's redis-server on a free loopback port), mitmdumps with the
addon, real clients, and three replicas behind HAProxy sharing one budget.

- A burst over a client's limit gets 429 TOOMANYREQUESTS with Retry-After; after it, requests pass.
- A mapping's manifest window, in Redis, resets when the window ends.
- A spoofed X-Forwarded-For from an address that is not a trusted proxy changes nothing.
- skopeo waits for Retry-After and retries; containerd (ctr) and docker fail with the registry's
  `toomanyrequests` error.
- Three replicas behind HAProxy (HTTP mode, `option forwardfor`) under concurrent load admit exactly
  the budget between them.
- Redis killed mid-run: `open` serves on (no 500, no hang) with one log line and a metric, `closed`
  answers 503 with Retry-After; once Redis is back, limits apply again.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from rig import clients, daemons, proxy, registry, standard
from rig.haproxy import HAProxy, start_haproxy
from rig.procs import LOOPBACK, wait_until
from rig.redis_server import RedisServer, start_redis
from rig.standard import APP

pytestmark = pytest.mark.e2e

KEY_HEX = "4e" * 32
ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]


def _config(upstreams: dict[str, registry.Upstream], limits: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "secretkey": KEY_HEX,
        "limits": limits,
        **top,
        "proxies": {"anon/": {"registry": upstreams["anonymous"].url, "remote": "platform"}},
    }


def _start(config: dict[str, Any], tmp: Path) -> proxy.ProxyProc:
    return proxy.start_proxy(config, tmp)


def _token(base: str, name: str = "anon/app") -> str:
    r = httpx.get(f"{base}/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def _manifest(
    client: httpx.Client, base: str, tok: str, headers: list[tuple[str, str]] | None = None
) -> httpx.Response:
    return client.get(
        f"{base}/v2/anon/app/manifests/v1", headers=[*ACCEPT, ("Authorization", f"Bearer {tok}"), *(headers or [])]
    )


def _dump(p: proxy.ProxyProc, name: str) -> None:
    sys.stdout.write(f"--- {name} output (tail):\n{p.output()[-3000:]}\n")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, emptied."""
    redis_server.flush()
    return redis_server


def test_a_burst_over_the_client_limit_gets_429_then_passes_after_retry_after(
    upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    p = _start(_config(upstreams, {"client_requests": "2/2s", "client_burst": 3}), tmp_path)
    try:
        tok = _token(p.url)
        with httpx.Client(timeout=30) as c:
            codes = [_manifest(c, p.url, tok).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
            r = _manifest(c, p.url, tok)
            assert r.status_code == 429
            err = r.json()["errors"][0]
            assert err["code"] == "TOOMANYREQUESTS" and "client_requests" in err["message"]
            assert "127.0.0.1" not in r.text
            retry = int(r.headers["retry-after"])
            assert 1 <= retry <= 2
            time.sleep(retry)
            assert _manifest(c, p.url, tok).status_code == 200
        p.wait_for_output(r"GET anon/app/manifests/v1 mapping=anon/ status=429 upstream=- .*limited: client_requests")
        metrics = httpx.get(f"{p.url}/metrics", timeout=10).text
        assert re.search(
            r'registryproxy_limit_refusals_total\{limit="client_requests",mapping="anon/"\} [1-9]', metrics
        )
    finally:
        p.stop()
        _dump(p, "proxy")


def test_a_mapping_window_in_redis_resets_when_the_window_ends(
    upstreams: dict[str, registry.Upstream], redis: RedisServer, tmp_path: Path
) -> None:
    p = _start(_config(upstreams, {"manifest_gets": "3/3s"}, redis_url=redis.url), tmp_path)
    try:
        tok = _token(p.url)
        with httpx.Client(timeout=30) as c:
            # HEADs are not counted (count_heads: false).
            head = c.head(f"{p.url}/v2/anon/app/manifests/v1", headers=[*ACCEPT, ("Authorization", f"Bearer {tok}")])
            assert head.status_code == 200
            # Start at a window's beginning, so that three GETs fit in it.
            time.sleep(3 - time.time() % 3 + 0.05)
            codes = [_manifest(c, p.url, tok).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429], codes
            r = _manifest(c, p.url, tok)
            assert r.status_code == 429 and "manifest_gets" in r.text
            time.sleep(int(r.headers["retry-after"]))
            assert _manifest(c, p.url, tok).status_code == 200
        assert any(k.startswith("registryproxy:limits:manifest_gets:") for k in redis.cli("KEYS", "*").split())
    finally:
        p.stop()
        _dump(p, "proxy")


def test_a_spoofed_forwarded_for_from_an_untrusted_address_changes_nothing(
    upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    # Only 192.0.2.1 is a trusted front end: the test's own address (127.0.0.1) is not.
    config = _config(upstreams, {"client_requests": "3/1h"}, trusted_proxies=["192.0.2.1"])
    p = _start(config, tmp_path)
    try:
        tok = _token(p.url)
        with httpx.Client(timeout=30) as c:
            codes = [
                _manifest(
                    c, p.url, tok, [("X-Forwarded-For", f"198.51.100.{i}"), ("Forwarded", f"for=198.51.100.{i}")]
                ).status_code
                for i in range(6)
            ]
        assert codes == [200, 200, 200, 429, 429, 429], codes
    finally:
        p.stop()
        _dump(p, "proxy")


# --- clients --------------------------------------------------------------------------------------


def test_clients_get_a_clear_error_and_skopeo_retries(
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """skopeo honours Retry-After and retries: with a short window its second pull waits and succeeds.
    With one manifest GET an hour, containerd and docker fail at once with the registry's error."""
    want = image_digests["anonymous"][(APP, "v1")]
    short = _start(_config(upstreams, {"manifest_gets": "1/4s"}), tmp_path / "short")
    hour = _start(_config(upstreams, {"manifest_gets": "1/1h"}), tmp_path / "hour")
    containerd = daemons.start_containerd(tmp_path_factory.mktemp("containerd"))
    dockerd: daemons.Dockerd | None = None
    try:
        # Start at a window's beginning, so that both pulls' manifest GETs fall in one window (windows are
        # fixed and aligned on the epoch: a pull that crossed a boundary would be admitted again, ~3% of runs).
        time.sleep(4 - time.time() % 4 + 0.05)
        assert clients.skopeo_copy(f"{short.host}/anon/app:v1", tmp_path / "first", tag="v1").check().digest == want
        started = time.monotonic()
        again = clients.skopeo_copy(f"{short.host}/anon/app:v1", tmp_path / "second", tag="v1").check()
        assert again.digest == want
        short.wait_for_output(r"GET anon/app/manifests/v1 mapping=anon/ status=429 .*limited: manifest_gets")
        sys.stdout.write(f"--- skopeo's second pull took {time.monotonic() - started:.1f}s (a 429, then a retry)\n")

        assert clients.skopeo_copy(f"{hour.host}/anon/app:v1", tmp_path / "third", tag="v1").check().digest == want
        res = containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", f"{hour.host}/anon/app:v1")
        assert res.returncode != 0
        assert re.search(r"429|too many requests|toomanyrequests", res.stdout + res.stderr, re.IGNORECASE), (
            res.describe()
        )
        sys.stdout.write(f"--- ctr printed:\n{res.stdout[-1500:]}{res.stderr[-1500:]}\n")

        dockerd = daemons.start_dockerd(tmp_path_factory.mktemp("dockerd"), containerd)
        res = dockerd.docker("pull", f"{hour.host}/anon/app:v1", timeout=180)
        assert res.returncode != 0
        out = res.stdout + res.stderr
        assert re.search(r"toomanyrequests|too many requests", out, re.IGNORECASE), res.describe()
        sys.stdout.write(f"--- docker printed:\n{out[-1500:]}\n")
    finally:
        if dockerd is not None:
            dockerd.stop()
        containerd.stop()
        for name, p in (("short", short), ("hour", hour)):
            p.stop()
            _dump(p, name)


# --- replicas ---------------------------------------------------------------------------------------


def test_three_replicas_behind_haproxy_share_one_budget(
    upstreams: dict[str, registry.Upstream], redis: RedisServer, tmp_path: Path
) -> None:
    budget = 12
    config = _config(
        upstreams,
        {"manifest_gets": f"{budget}/1h", "client_requests": "8/1h"},
        redis_url=redis.url,
        trusted_proxies=[LOOPBACK],
    )
    replicas: list[proxy.ProxyProc] = []
    hp: HAProxy | None = None
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(_start, config, tmp_path / f"r{i}") for i in range(3)]
        replicas += [f.result() for f in futures if f.exception() is None]
        assert len(replicas) == 3, [f.exception() for f in futures]
        hp = start_haproxy(tmp_path / "haproxy", [r.port for r in replicas], forwardfor=True)
        tok = _token(hp.url)

        def get(i: int) -> int:
            # Eight clients as HAProxy reports them (X-Forwarded-For from a trusted front end).
            headers = [("X-Forwarded-For", f"198.51.100.{i % 8}")]
            with httpx.Client(timeout=30) as c:
                return _manifest(c, hp.url, tok, headers).status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            codes = list(pool.map(get, range(40)))
        assert codes.count(200) == budget and codes.count(429) == 40 - budget, codes
        wait_until(
            lambda: (
                sum(len(re.findall(r"manifests/v1 mapping=anon/ status=(?:200|429)", r.output())) for r in replicas)
                == 40
            ),
            10,
            "a log line per request",
        )
        served = [len(re.findall(r"manifests/v1 mapping=anon/ status=200", r.output())) for r in replicas]
        assert sum(served) == budget and all(n > 0 for n in served), served
        # The client buckets are shared too: one client (HAProxy forwards its address) gets 8 in all.
        with ThreadPoolExecutor(max_workers=6) as pool:
            redis.cli("DEL", "registryproxy:limits:manifest_gets:anon/")
            tags = list(
                pool.map(
                    lambda _: (
                        httpx.get(
                            f"{hp.url}/v2/anon/app/tags/list",
                            headers={"Authorization": f"Bearer {tok}", "X-Forwarded-For": "203.0.113.9"},
                            timeout=30,
                        ).status_code
                    ),
                    range(12),
                )
            )
        assert tags.count(200) == 8 and tags.count(429) == 4, tags
    finally:
        if hp is not None:
            hp.proc.stop()
        for i, r in enumerate(replicas):
            r.stop()
            _dump(r, f"replica {i}")


# --- Redis killed mid-run ----------------------------------------------------------------------------


def test_redis_killed_mid_run_open_serves_on_and_closed_answers_503(
    upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis")
    port = server.port
    opened = _start(_config(upstreams, {"manifest_gets": "100/1h"}, redis_url=server.url), tmp_path / "open")
    closed = _start(
        _config(upstreams, {"manifest_gets": "100/1h", "on_store_failure": "closed"}, redis_url=server.url),
        tmp_path / "closed",
    )
    try:
        tok_open, tok_closed = _token(opened.url), _token(closed.url)
        with httpx.Client(timeout=30) as c:
            assert _manifest(c, opened.url, tok_open).status_code == 200
            assert _manifest(c, closed.url, tok_closed).status_code == 200
            server.stop()  # killed mid-run
            for _ in range(5):
                started = time.monotonic()
                assert _manifest(c, opened.url, tok_open).status_code == 200
                r = _manifest(c, closed.url, tok_closed)
                assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE", r.text
                assert r.headers["retry-after"] == "5"
                assert time.monotonic() - started < 3  # bounded, never a hang
            for p in (opened, closed):
                p.wait_for_output(r"limits store failed \(redis admit: \w+")
                assert p.output().count("limits store failed") == 1, p.output()[-2000:]
                metrics = httpx.get(f"{p.url}/metrics", timeout=10).text
                assert re.search(r"registryproxy_limit_store_failures_total [1-9]", metrics)
            assert "status=500" not in opened.output() + closed.output()
            # Redis back on the same port: limits apply again (after the store's short pause, 2 s, during
            # which it still answers 503).
            server = start_redis(tmp_path / "redis2", port=port)
            wait_until(
                lambda: _manifest(c, closed.url, tok_closed).status_code == 200,
                15,
                "the closed proxy to serve again once Redis is back",
                interval=0.25,
            )
            closed.wait_for_output(r"limits store answers again")
    finally:
        server.stop()
        for name, p in (("open", opened), ("closed", closed)):
            p.stop()
            _dump(p, name)
