"""The pure parts of the cache benchmark (tests/bench/cachebench.py): counting upstream requests and the
proxy's cache= fields, the per-configuration summary, the per-store blob count and issue 20's targets."""

from __future__ import annotations

from typing import Any

import pytest
from bench import cachebench
from bench.cachebench import Goal, cache_fields, check_targets, classify_requests, store_use, summarize

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_classify_requests_counts_each_kind_and_blob_gets_per_digest() -> None:
    got = classify_requests(
        [
            ("GET", "/v2/"),
            ("HEAD", "/v2/platform/wan/manifests/8x4m"),
            ("GET", "/v2/platform/wan/manifests/8x4m"),
            ("GET", f"/v2/platform/wan/manifests/{D1}"),
            ("GET", f"/v2/platform/wan/blobs/{D1}"),
            ("GET", f"/v2/platform/wan/blobs/{D1}?ns=x"),
            ("HEAD", f"/v2/platform/wan/blobs/{D2}"),
            ("POST", "/v2/platform/wan/blobs/uploads/"),
        ]
    )
    assert got == {
        "manifest_get": 2,
        "manifest_head": 1,
        "blob_get": 2,
        "blob_head": 1,
        "other": 2,
        "blob_digests": {D1: 2},
    }


def test_cache_fields_reads_text_and_json_access_lines() -> None:
    out = "\n".join(
        [
            "GET /v2/basic/wan/manifests/8x4m mapping=basic/ status=200 upstream=200 bytes=1825 3.1ms token=ok cache=hit",
            f"GET /v2/basic/wan/blobs/{D1} mapping=basic/ status=200 upstream=- bytes=10 1.0ms token=ok cache=hit",
            '{"method":"GET","name":"basic/wan","status":200,"cache":"miss"}',
            '{"method":"GET","cache": "fill"}',
            "GET /v2/ mapping=- status=401 upstream=- bytes=0 0.2ms token=none",
            "cachebench=hit is not a field",
        ]
    )
    assert cache_fields(out) == {"fill": 1, "hit": 2, "miss": 1}
    assert cache_fields("") == {}


def _pull(
    config: str,
    phase: str,
    seconds: float,
    *,
    rnd: int = 0,
    client: str = "skopeo",
    gets: dict[str, int] | None = None,
    wire: int = 0,
    cache: dict[str, int] | None = None,
) -> dict[str, Any]:
    gets = gets or {}
    return {
        "pull": {
            "rtt_ms": 20,
            "kind": "https-basic",
            "client": client,
            "config": config,
            "phase": phase,
            "index": 0 if phase == "cold" else 1,
            "seconds": seconds,
            "connections": {"registry": 1},
            "proxy_cpu_s": None if config == "direct" else 0.1,
            "proxy_blob_bytes": None,
            "idle_s": None,
        },
        "round": rnd,
        "upstream": {
            "manifest_get": 1,
            "manifest_head": 0,
            "blob_get": sum(gets.values()),
            "blob_head": 0,
            "other": 0,
            "blob_digests": gets,
            "blobstore_get": 0,
            "token_requests": 0,
            "wire_bytes": wire,
        },
        "peak_rss_mb": None if config == "direct" else 90.0,
        "cache": cache or {},
    }


def _pulls(cache_warm: float = 0.22, cache_cold: float = 1.0, refetch: bool = False) -> list[dict[str, Any]]:
    both = {D1: 1, D2: 1}
    return [
        _pull("direct", "cold", 0.9, gets=both, wire=100),
        _pull("direct", "warm", 0.8, gets=both, wire=100),
        _pull("proxy", "cold", 1.0, gets=both, wire=100),
        _pull("proxy", "warm", 0.4, gets=both, wire=100),
        _pull("proxy-cache", "cold", cache_cold, gets=both, wire=100, cache={"fill": 2, "miss": 1}),
        _pull("proxy-cache", "warm", cache_warm, gets={D1: 1} if refetch else {}, wire=5, cache={"hit": 3}),
        _pull("proxy-cache", "cold", cache_cold, rnd=1, gets=both, wire=100),
        _pull("proxy-cache", "warm", cache_warm, rnd=1, wire=5, cache={"hit": 3}),
        _pull("loopback", "cold", 0.25),
        _pull("loopback", "warm", 0.2),
    ]


def test_summarize_gives_ratios_to_loopback_and_proxy() -> None:
    rows = {r["config"]: r for r in summarize(_pulls())}
    assert list(rows) == ["direct", "proxy", "proxy-cache", "loopback"]
    pc = rows["proxy-cache"]
    assert pc["warm_vs_loopback"] == pytest.approx(0.22 / 0.2)
    assert pc["cold_vs_proxy"] == pytest.approx(1.0)
    assert pc["warm_cache"] == {"hit": 6}
    assert pc["cold_upstream"]["blob_get"] == 2
    assert pc["warm_upstream"]["blob_get"] == 0
    assert rows["direct"]["peak_rss_mb"] is None
    assert rows["loopback"]["warm_vs_loopback"] == pytest.approx(1.0)


def test_store_use_counts_blob_gets_per_store() -> None:
    pcs = [p for p in _pulls(refetch=True) if p["pull"]["config"] == "proxy-cache"]
    assert store_use(pcs) == [
        {"round": 0, "pulls": 2, "blob_gets": 3, "distinct_blobs": 2, "max_gets_per_blob": 2, "wire_bytes": 105},
        {"round": 1, "pulls": 2, "blob_gets": 2, "distinct_blobs": 2, "max_gets_per_blob": 1, "wire_bytes": 105},
    ]


def _goals(rows: list[dict[str, Any]], manifest_gets: int = 1, cached_mb_s: float = 900.0) -> dict[str, Goal]:
    manifests = {"https-basic": {"proxy-cache": {"pulls": 100, "manifest_get": manifest_gets, "manifest_head": 99}}}
    blob = [
        {"config": "proxy", "phase": "uncached", "mb_s": 600.0, "rss_growth_mb": 0.0, "upstream_blob_gets": 1},
        {"config": "proxy-cache", "phase": "fill", "mb_s": 500.0, "rss_growth_mb": 2.0, "upstream_blob_gets": 1},
        {
            "config": "proxy-cache",
            "phase": "cached",
            "mb_s": cached_mb_s,
            "rss_growth_mb": 3.0,
            "upstream_blob_gets": 0,
        },
    ]
    goals = check_targets(rows, manifests, blob, 100, 2)
    return {g.what.split(":")[1].strip() if g.what.startswith("RTT") else g.what: g for g in goals}


def test_targets_met() -> None:
    goals = _goals(summarize(_pulls()))
    assert all(g.met for g in goals.values()), [g.line() for g in goals.values()]
    assert goals["warm pull, proxy-cache vs loopback <= 1.2x"].text == "1.10x (0.22s)"
    assert (
        goals["https-basic: upstream manifest GETs per 100 pulls of an unchanged tag through proxy-cache == 1"]
        .line()
        .startswith("  met ")
    )


def test_targets_missed() -> None:
    goals = _goals(summarize(_pulls(cache_warm=0.3, cache_cold=1.2, refetch=True)), manifest_gets=100, cached_mb_s=300)
    missed = {k for k, g in goals.items() if g.met is False}
    assert missed == {
        "warm pull, proxy-cache vs loopback <= 1.2x",
        "cold pull, proxy-cache vs proxy <= 1.1x",
        "upstream blob GETs per blob per store == 1 (2 blobs, 2 stores)",
        "https-basic: upstream manifest GETs per 100 pulls of an unchanged tag through proxy-cache == 1",
        "cached blob GET through proxy-cache vs the uncached proxy >= 1.0x",
    }
    assert goals["cold pull, proxy-cache vs proxy <= 1.1x"].line().startswith("  MISS  ")


def test_targets_without_figures_are_not_applicable() -> None:
    rows = summarize([p for p in _pulls() if p["pull"]["config"] != "loopback"])
    goals = check_targets(rows, {}, [], 100, 2)
    warm = next(g for g in goals if "loopback" in g.what)
    assert warm.met is None and warm.line().startswith("  n/a ")


def test_settings_quick_full_and_overrides() -> None:
    quick = cachebench.settings(True)
    assert (quick.rtts_ms, quick.clients, quick.rounds, quick.warm, quick.blob_mib) == (
        (20, 100),
        ("skopeo", "ctr"),
        2,
        1,
        256,
    )
    full = cachebench.settings(False)
    assert full.clients == ("skopeo", "ctr", "docker") and full.blob_mib == 1024
    narrowed = cachebench.settings(True, rtts="100", kinds="https-basic", rounds=0)
    assert narrowed.rtts_ms == (100,) and narrowed.kinds == ("https-basic",) and narrowed.rounds == 1
    with pytest.raises(ValueError, match="podman"):
        cachebench.settings(True, clients="podman")
