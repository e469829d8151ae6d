"""The benchmark's cache section: `./run.sh bench --cache [--quick]` (the pull-through cache, issue 20).

The WAN section's rig (wanbench.started_rig): HTTPS upstreams from a test CA, each server behind a delay
relay (20 and 100 ms round trip) that counts connections and the bytes its server sent back, the 8 x 4 MiB
WAN image on each:
  https-basic     Basic auth, blobs answered by the registry
  https-redirect  token auth, blobs 307 to a blob store (as a CDN): with a cache the proxy fetches them itself
Configurations, side by side, alternating pull by pull:
  direct       the client straight to the upstream (verifying it with the test CA)
  proxy        registryproxy as ./run.sh starts it, no `cache:`
  proxy-cache  the same with `cache:` on a fresh directory store each round
  anchor       distribution 2.8 (Debian's docker-registry) as a pull-through cache: `proxy: remoteurl:` with the
               upstream's credentials, filesystem storage (fresh each round), trusting the test CA through
               SSL_CERT_FILE (Go's crypto/x509 reads it)
  loopback     the client straight from a plain docker-registry on loopback holding the image (no WAN)
For each RTT, upstream kind and client, `rounds` rounds; each round starts every server fresh (an empty
store), makes one cold pull per configuration and then `warm` warm pulls each. Measured per pull: the
client's wall time, the upstream requests (the registry's tap: manifest GETs and HEADs, blob GETs; the blob
store's GETs), the bytes the upstream's relays carried back (what crossed the WAN), the proxy's (or the
anchor's, or the loopback registry's) CPU and peak RSS, and the proxy's `cache=` log fields.

Then, at the first RTT: `manifest_pulls` (100) manifest GETs by the unchanged tag through each, counting the
upstream's manifest GETs; and, straight to the https-basic upstream's TLS front (no delay relay: the proxy's
own cost, not the WAN's), a large blob (256 MiB --quick, 1 GiB) GET with curl through each: uncached, the
fill, from the cache, with MB/s, the upstream bytes, CPU and the resident set sampled every 20 ms (flat or not).

Distribution 2.8 gives `proxy: username/password` only to a bearer realm, never as Basic (distribution#3153):
for the Basic upstream the anchor's remoteurl carries them as userinfo, which Go's HTTP client sends as Basic.

Targets (issue 20): warm proxy-cache <= 1.2x loopback; cold proxy-cache <= 1.1x cold proxy; upstream manifest
GETs per 100 pulls of an unchanged tag = 1; each blob fetched upstream once per store; cached blob MB/s >= the
uncached proxy's, RSS flat. Prints the tables, writes tests/bench/results/cache.json and cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

if __name__ == "__main__":  # `python tests/bench/cachebench.py`: `bench` must be the package (see bench.py)
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path[:0] = [str(_HERE.parent), str(_HERE.parents[1] / "addon")]

import httpx
from bench import measure, report, targets, wanbench
from rig import registry, wan
from rig.https_upstream import HttpsUpstream
from rig.procs import LOOPBACK, RigError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("https-basic", "https-redirect")
CONFIGS = ("direct", "proxy", "proxy-cache", "anchor", "loopback")
CLIENTS = wanbench.CLIENTS
SERVED = ("proxy", "proxy-cache", "anchor", "loopback")  # configurations with a server process of their own
BIG = "platform/big"
CONFIG_LABEL = {
    "direct": "the client straight to the upstream",
    "proxy": "./run.sh, no cache",
    "proxy-cache": "./run.sh with cache: (a fresh directory store each round)",
    "anchor": "distribution 2.8 pull-through cache (docker-registry, proxy: remoteurl:, filesystem storage)",
    "loopback": "the client straight from a docker-registry on loopback holding the image (no WAN)",
}
CACHE_SECTION = {"max_size": "50GB", "tag_ttl": "0s", "stale_if_error": "7d"}
# The targets of issue 20.
WARM_VS_LOOPBACK = 1.2
COLD_VS_PROXY = 1.1
MANIFEST_GETS_PER_100 = 1
RSS_FLAT_MB = 64.0  # resident set growth during a cached blob GET that still counts as flat


@dataclass(frozen=True)
class Settings:
    rtts_ms: tuple[int, ...]
    kinds: tuple[str, ...]
    clients: tuple[str, ...]
    rounds: int  # cold rounds: every server fresh, an empty store
    warm: int  # warm pulls per configuration and round
    manifest_pulls: int
    blob_mib: int
    quick: bool


def settings(
    quick: bool,
    rtts: str | None = None,
    clients: str | None = None,
    kinds: str | None = None,
    rounds: int | None = None,
    warm: int | None = None,
    blob_mib: int | None = None,
) -> Settings:
    """Full: 20 and 100 ms, both upstreams, every client, 3 rounds of 1 cold + 2 warm pulls, a 1 GiB blob.
    --quick: the same RTTs and upstreams, skopeo and ctr, 2 rounds of 1 cold + 1 warm, a 256 MiB blob."""
    s = (
        Settings((20, 100), KINDS, ("skopeo", "ctr"), 2, 1, 100, 256, True)
        if quick
        else Settings((20, 100), KINDS, CLIENTS, 3, 2, 100, 1024, False)
    )
    if rtts is not None:
        s = dataclasses.replace(s, rtts_ms=tuple(int(x) for x in _split(rtts)))
    if clients is not None:
        s = dataclasses.replace(s, clients=tuple(_split(clients)))
    if kinds is not None:
        s = dataclasses.replace(s, kinds=tuple(_split(kinds)))
    if rounds is not None:
        s = dataclasses.replace(s, rounds=max(1, rounds))
    if warm is not None:
        s = dataclasses.replace(s, warm=max(1, warm))
    if blob_mib is not None:
        s = dataclasses.replace(s, blob_mib=max(1, blob_mib))
    bad = [c for c in s.clients if c not in CLIENTS] + [k for k in s.kinds if k not in KINDS]
    if bad or not s.rtts_ms or any(r < 0 for r in s.rtts_ms) or not s.kinds or not s.clients:
        raise ValueError(f"cache bench settings: unknown or bad {', '.join(bad) or 'round-trip times'}")
    return s


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --- pure parts: counting upstream requests and the proxy's cache= fields ---------------------------

_DIGEST_IN_PATH = re.compile(r"/blobs/(sha256:[0-9a-f]{64})")
_CACHE_FIELD = re.compile(r'\bcache=(?P<t>[a-z]+)\b|"cache":\s*"(?P<j>[a-z]+)"')


def classify_requests(requests: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Registry requests (method, path) by kind: manifest GETs and HEADs, blob GETs and HEADs, the rest;
    `blob_digests`: how many GETs each blob digest got."""
    out: dict[str, Any] = {"manifest_get": 0, "manifest_head": 0, "blob_get": 0, "blob_head": 0, "other": 0}
    digests: Counter[str] = Counter()
    for method, path in requests:
        bare = path.split("?", 1)[0]
        if "/manifests/" in bare and method in ("GET", "HEAD"):
            out["manifest_get" if method == "GET" else "manifest_head"] += 1
        elif "/blobs/" in bare and "/uploads" not in bare and method in ("GET", "HEAD"):
            out["blob_get" if method == "GET" else "blob_head"] += 1
            m = _DIGEST_IN_PATH.search(bare)
            if m is not None and method == "GET":
                digests[m.group(1)] += 1
        else:
            out["other"] += 1
    out["blob_digests"] = dict(digests)
    return out


def cache_fields(output: str) -> dict[str, int]:
    """How often each `cache=` value (hit, miss, fill, stale, off) appears in the proxy's access log lines,
    text (`cache=hit`) or JSON (`"cache":"hit"`)."""
    c: Counter[str] = Counter()
    for m in _CACHE_FIELD.finditer(output):
        c[m.group("t") or m.group("j")] += 1
    return dict(sorted(c.items()))


@dataclass(frozen=True)
class UpstreamMark:
    """Where the upstream's counters stood: compare with a later `upstream_since`."""

    tap: int
    blobstore: int
    tokens: int
    wire: dict[str, int]


def upstream_mark(up: HttpsUpstream) -> UpstreamMark:
    return UpstreamMark(
        len(up.access_log()),
        len(up.blob_server.requests()) if up.blob_server is not None else 0,
        up.token_issuer.count() if up.token_issuer is not None else 0,
        up.bytes_down(),
    )


def upstream_since(up: HttpsUpstream, mark: UpstreamMark) -> dict[str, Any]:
    """The upstream's requests and bytes since `mark`: the registry's (classify_requests), the blob store's
    GETs, the token requests, and the bytes every relay carried back (`wire_bytes`, TLS included)."""
    out = classify_requests((e.method, e.path) for e in up.access_log()[mark.tap :])
    store = up.blob_server.requests()[mark.blobstore :] if up.blob_server is not None else []
    out["blobstore_get"] = sum(1 for r in store if r.method == "GET")
    out["token_requests"] = (up.token_issuer.count() if up.token_issuer is not None else 0) - mark.tokens
    now = up.bytes_down()
    out["wire_bytes"] = sum(now[k] - mark.wire.get(k, 0) for k in now)
    return out


# --- the rig -----------------------------------------------------------------------------------------


@dataclass
class CacheRig:
    wan: wanbench.WanRig
    loopback: registry.Upstream  # plain docker-registry on loopback holding the WAN image and the big blob
    blob_digest: str | None  # the big blob, on the https-basic upstream and the loopback registry
    blob_size: int
    blobs: int  # blobs in the WAN image (config and layers)

    @property
    def workdir(self) -> Path:
        return self.wan.workdir


@contextlib.contextmanager
def started_rig(s: Settings) -> Iterator[CacheRig]:
    with wanbench.started_rig(s.kinds, s.clients, prefix="registryproxy-cachebench-") as w:
        t0 = time.perf_counter()
        loop = registry.start_upstream("anonymous", w.workdir / "loopback")
        try:
            assert w.image is not None
            if w.image.ensure(loop) != w.digest:
                raise RigError("loopback registry: the pushed WAN image has another digest")
            size = s.blob_mib * measure.MIB
            digest: str | None = None
            if "https-basic" in w.upstreams:
                up = w.upstreams["https-basic"]
                auth = up.basic_auth_header()
                digest = measure.push_blob(
                    up.url, BIG, size, headers={"Authorization": auth} if auth else None, verify=up.httpx_verify()
                )
                if measure.push_blob(measure.local_url(loop.registry_port), BIG, size) != digest:
                    raise RigError("loopback registry: the big blob has another digest")
                up.clear_logs()
            print(f"loopback registry and the {s.blob_mib} MiB blob ready in {time.perf_counter() - t0:.1f}s")
            yield CacheRig(w, loop, digest, size, 1 + len(w.image.info.layers))
        finally:
            loop.stop()


def proxy_config(rig: CacheRig, store: Path | None, front: str | None = None) -> dict[str, Any]:
    """The WAN section's configuration (basic/, redir/), with `cache:` on `store` when given; `front`: the
    https-basic upstream's URL without its delay relay (the blob section)."""
    cfg = rig.wan.proxy_config()
    if front is not None:
        cfg["proxies"][f"{wanbench.MAPPING['https-basic']}/"]["registry"] = front
    if store is not None:
        cfg["cache"] = {"store": str(store), **CACHE_SECTION}
    return cfg


def start_anchor(up: HttpsUpstream, workdir: Path, url: str | None = None, timeout: float = 20.0) -> targets.Target:
    """distribution's pull-through cache for `up`: `proxy: {remoteurl, username, password}`, filesystem storage
    under `workdir`, the test CA trusted through SSL_CERT_FILE (and SSL_CERT_DIR: a directory holding only it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    assert up.cert_dir is not None and up.ca_cert is not None

    def make_config(port: int) -> dict[str, Any]:
        remote = url or up.url
        proxy: dict[str, Any] = {"remoteurl": remote}
        if up.username is not None and up.token_issuer is not None:
            proxy.update(username=up.username, password=up.password)
        elif up.username is not None:
            # distribution 2.8 hands `username`/`password` only to a bearer realm, never as Basic
            # (distribution#3153); Go's HTTP client sends a URL's userinfo as Basic, and distribution builds
            # every upstream URL from remoteurl, userinfo kept.
            proxy["remoteurl"] = remote.replace("://", f"://{quote(up.username)}:{quote(up.password or '')}@", 1)
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{LOOPBACK}:{port}", "secret": "cachebench-anchor-secret"},
            "proxy": proxy,
        }

    env = {"SSL_CERT_FILE": str(up.ca_cert), "SSL_CERT_DIR": str(up.cert_dir)}
    proc, port = registry.launch_registry("anchor", workdir, workdir / "config.yml", make_config, timeout, env)
    return targets.Target("anchor", port, proc.pid, False, proc, proc.stop, proc.output, {"storage": str(storage)})


def loopback_target(rig: CacheRig) -> targets.Target:
    """The loopback registry's own port (no tap); its process group measured, never stopped here."""
    loop = rig.loopback
    return targets.Target("loopback", loop.registry_port, loop.proc.pid, False, output_fn=loop.proc.output)


def start_config(rig: CacheRig, config: str, kind: str, workdir: Path, front: bool = False) -> targets.Target:
    """`config` started fresh under `workdir` for upstream `kind`; `front`: straight to the https-basic
    upstream's TLS front (no delay relay)."""
    up = rig.wan.upstreams[kind]
    url = up.direct_url if front else None
    if config == "proxy":
        return targets.start_rp_run(proxy_config(rig, None, url), workdir / "proxy", name="proxy")
    if config == "proxy-cache":
        cfg = proxy_config(rig, workdir / "store", url)
        return targets.start_rp_run(cfg, workdir / "proxy-cache", name="proxy-cache")
    if config == "anchor":
        return start_anchor(up, workdir / "anchor", url)
    if config == "loopback":
        return loopback_target(rig)
    raise ValueError(config)


# --- whole pulls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePull:
    pull: wanbench.Pull  # wall time, new upstream connections, CPU
    round: int  # which fresh store (per RTT, kind and client)
    upstream: dict[str, Any]  # upstream_since: requests, blob digests, wire bytes
    peak_rss_mb: float | None  # the largest VmHWM of the configuration's processes after the pull
    cache: dict[str, int]  # the proxy's cache= log fields for the pull (proxy-cache)


class CacheBlock(wanbench.Block):
    """One (RTT, kind, client, round): the configurations started fresh, pulled through as wanbench does."""

    def __init__(self, rig: CacheRig, rtt_ms: int, kind: str, client: str, workdir: Path, round_: int) -> None:
        super().__init__(rig.wan, rtt_ms, kind, client, workdir)
        self.crig = rig
        self.round = round_

    def start_proxies(self, configs: Sequence[str]) -> None:
        for config in configs:
            if config in SERVED:
                self.proxies[config] = start_config(self.crig, config, self.kind, self.workdir)

    def measured_pull(self, config: str, phase: str, index: int) -> CachePull:
        t = self.proxies.get(config)
        mark = upstream_mark(self.up)
        out_before = len(t.output()) if t is not None else 0
        p = self.pull(config, phase, index)
        if t is not None and not t.registryproxy:
            p = dataclasses.replace(p, proxy_blob_bytes=None)
        time.sleep(0.05)  # the upstream's tap records a request head as it passes
        used = upstream_since(self.up, mark)
        rss = None
        if t is not None:
            hwm = [x.hwm_kb for x in t.sample().values()]
            rss = max(hwm) / 1024 if hwm else None
        cache = cache_fields(t.output()[out_before:]) if t is not None and t.registryproxy else {}
        return CachePull(p, self.round, used, rss, cache)


def describe(c: CachePull) -> str:
    u = c.upstream
    text = (
        f"{wanbench.describe(c.pull)}\n      upstream: manifest GET {u['manifest_get']} HEAD {u['manifest_head']}, "
        f"blob GET {u['blob_get']}"
        + (f" (blob store {u['blobstore_get']})" if u["blobstore_get"] else "")
        + f", {u['wire_bytes'] / 1e6:.1f} MB on the wire"
    )
    if c.peak_rss_mb is not None:
        text += f"; peak RSS {c.peak_rss_mb:.0f} MB"
    if c.cache:
        text += "; cache= " + " ".join(f"{k} {v}" for k, v in c.cache.items())
    return text


def run_block(
    rig: CacheRig, rtt: int, kind: str, client: str, s: Settings, round_: int, failures: list[str]
) -> list[CachePull]:
    """One round: every configuration fresh; one cold pull each, then `s.warm` warm ones, alternating. A pull
    that fails goes into `failures` (the others go on)."""
    k = round_ % len(CONFIGS)
    order = CONFIGS[k:] + CONFIGS[:k]  # each round starts with another configuration
    block = CacheBlock(rig, rtt, kind, client, rig.workdir / f"{rtt}ms-{kind}-{client}-r{round_}", round_)
    pulls: list[CachePull] = []
    print(f"\nC. RTT {rtt} ms, {kind}, {client}, round {round_ + 1}/{s.rounds}: {' '.join(order)}", flush=True)
    try:
        block.start_proxies(order)
        for index in range(s.warm + 1):
            for config in order:
                try:
                    c = block.measured_pull(config, "cold" if index == 0 else "warm", index)
                except (RigError, OSError) as e:
                    where = f"cache {rtt} ms {kind} {client} round {round_ + 1} {config} pull {index}"
                    failures.append(f"{where}: {type(e).__name__}: {e}")
                    print(f"  {config} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                pulls.append(c)
                print("  " + describe(c), flush=True)
    finally:
        block.stop()
        shutil.rmtree(block.workdir, ignore_errors=True)
    return pulls


# --- 100 manifest pulls of an unchanged tag ---------------------------------------------------------------


def manifest_pulls(rig: CacheRig, kind: str, rtt: int, n: int) -> dict[str, dict[str, Any]]:
    """`n` GETs of the WAN image's manifest by tag through each configuration (one keep-alive client each),
    fresh servers: the upstream's manifest GETs and HEADs, and the client's median time a GET."""
    up = rig.wan.upstreams[kind]
    out: dict[str, dict[str, Any]] = {}
    workdir = rig.workdir / f"manifests-{kind}"
    tag_ref = f"{wan.WAN_NAME}:{wan.WAN_TAG}"
    for config in ("direct", "proxy", "proxy-cache", "anchor"):
        t = start_config(rig, config, kind, workdir / config) if config != "direct" else None
        try:
            if t is None:
                base = up.url
                name = wan.WAN_NAME
                headers = measure.manifest_headers(None) + list(up.auth_headers([f"repository:{name}:pull"]).items())
                verify: Any = up.httpx_verify()
            else:
                base = t.url
                name = t.local_name(wan.WAN_NAME, wanbench.MAPPING[kind])
                headers = measure.manifest_headers(t.token(name))
                verify = True
            mark = upstream_mark(up)
            times: list[float] = []
            t0 = time.perf_counter()
            with httpx.Client(timeout=60, trust_env=False, verify=verify) as c:
                for _ in range(n):
                    start = time.perf_counter()
                    r = c.get(f"{base}/v2/{name}/manifests/{wan.WAN_TAG}", headers=headers)
                    times.append(time.perf_counter() - start)
                    if r.status_code != 200 or r.headers.get("docker-content-digest") != rig.wan.digest:
                        raise RigError(f"{config}: GET {tag_ref} answered {r.status_code} {r.text[:200]}")
            seconds = time.perf_counter() - t0
            time.sleep(0.05)
            used = upstream_since(up, mark)
            used.pop("blob_digests", None)
            out[config] = {
                "pulls": n,
                "seconds": seconds,
                "p50_ms": statistics.median(times) * 1000,
                "cache": cache_fields(t.output()) if t is not None and t.registryproxy else {},
                **used,
            }
            print(
                f"  {kind} RTT {rtt} ms {config:<12} {n} manifest GETs by tag: upstream manifest GETs "
                f"{used['manifest_get']}, HEADs {used['manifest_head']}, token requests {used['token_requests']}; "
                f"p50 {out[config]['p50_ms']:.1f} ms",
                flush=True,
            )
        finally:
            if t is not None:
                t.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return out


# --- the large blob ---------------------------------------------------------------------------------------


def blob_gets(rig: CacheRig, repeats: int) -> list[dict[str, Any]]:
    """The big blob through each configuration, straight to the https-basic upstream's TLS front (no delay
    relay: the proxy's own cost), bytes counted at the front. The servers run side by side: direct, the two
    fills (proxy-cache, anchor), then `repeats` rounds of uncached proxy / cached proxy-cache / cached anchor,
    interleaved so that load from elsewhere on the machine falls on all of them; the loopback registry last."""
    up = rig.wan.upstreams["https-basic"]
    assert rig.blob_digest is not None
    workdir = rig.workdir / "blob"
    rows: list[dict[str, Any]] = []
    started: dict[str, targets.Target] = {}
    plan = [("direct", "uncached"), ("proxy-cache", "fill"), ("anchor", "fill")]
    plan += [
        (c, p)
        for _ in range(repeats)
        for c, p in (("proxy", "uncached"), ("proxy-cache", "cached"), ("anchor", "cached"))
    ]
    plan.append(("loopback", "uncached"))
    try:
        for config in ("proxy", "proxy-cache", "anchor", "loopback"):
            started[config] = start_config(rig, config, "https-basic", workdir / config, front=True)
        for n, (config, phase) in enumerate(plan):
            t = started.get(config)
            if t is None:
                url = f"{up.direct_url}/v2/{BIG}/blobs/{rig.blob_digest}"
                auth = up.basic_auth_header()
                headers, token, cacert = ({"Authorization": auth} if auth else None), None, up.ca_cert
            else:
                name = t.local_name(BIG, "basic")
                url = f"{t.url}/v2/{name}/blobs/{rig.blob_digest}"
                headers, token, cacert = None, t.token(name), None
            mark = upstream_mark(up)
            front_before = up.front.bytes_down() if up.front is not None else 0
            out_before = len(t.output()) if t is not None else 0
            before = t.sample() if t is not None else {}
            with targets.RssWatch(t.pgid if t is not None else None) as rss:
                tr = measure.fetch_discard(url, token, headers=headers, cacert=cacert)
            after = t.sample() if t is not None else {}
            time.sleep(0.05)
            used = upstream_since(up, mark)
            wire = (up.front.bytes_down() if up.front is not None else 0) - front_before
            if tr.status != 200 or tr.bytes != rig.blob_size:
                raise RigError(f"{config}: blob GET answered {tr.status} with {tr.bytes} of {rig.blob_size} bytes")
            usage = targets.usage_between(before, after)
            row = {
                "config": config,
                "phase": phase,
                "get": n + 1,
                "mb_s": tr.mb_s,
                "seconds": tr.seconds,
                "ttfb_ms": tr.ttfb_s * 1000,
                "cpu_s": usage.cpu_s if t is not None else None,
                "rss_before_mb": rss.before_mb if t is not None else None,
                "rss_max_mb": rss.max_mb if t is not None else None,
                "rss_growth_mb": rss.growth_mb if t is not None else None,
                "upstream_blob_gets": used["blob_get"],
                "upstream_wire_mb": wire / 1e6,
                "cache": cache_fields(t.output()[out_before:]) if t is not None and t.registryproxy else {},
            }
            rows.append(row)
            print(
                f"  blob {config:<12} {phase:<8} {row['mb_s']:7.0f} MB/s  ttfb {row['ttfb_ms']:6.1f} ms  "
                + (
                    f"CPU {usage.cpu_s:5.2f}s  RSS {rss.before_mb:5.0f} -> max {rss.max_mb:5.0f} MB  "
                    if t is not None
                    else ""
                )
                + f"upstream blob GETs {used['blob_get']}, {row['upstream_wire_mb']:.0f} MB on the wire"
                + (f"  cache= {' '.join(f'{k} {v}' for k, v in row['cache'].items())}" if row["cache"] else ""),
                flush=True,
            )
    finally:
        for t in started.values():
            t.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# --- summary and targets (pure) -----------------------------------------------------------------------------


def _median(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def _span(xs: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "samples": list(xs),
    }


UPSTREAM_KEYS = ("manifest_get", "manifest_head", "blob_get", "blobstore_get", "token_requests", "wire_bytes")


def summarize(pulls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (RTT, kind, client, configuration) from CachePull dicts (asdict): cold and warm times, the
    ratios (warm to loopback's warm, cold to proxy's cold), upstream use per pull (mean), CPU, RSS."""
    keys: list[tuple[int, str, str]] = []
    for c in pulls:
        k = (c["pull"]["rtt_ms"], c["pull"]["kind"], c["pull"]["client"])
        if k not in keys:
            keys.append(k)
    rows: list[dict[str, Any]] = []
    for rtt, kind, client in keys:
        mine = [
            c for c in pulls if (c["pull"]["rtt_ms"], c["pull"]["kind"], c["pull"]["client"]) == (rtt, kind, client)
        ]
        block: dict[str, dict[str, Any]] = {}
        for config in CONFIGS:
            ps = [c for c in mine if c["pull"]["config"] == config]
            if not ps:
                continue
            row: dict[str, Any] = {"rtt_ms": rtt, "kind": kind, "client": client, "config": config}
            for phase in ("cold", "warm"):
                ph = [c for c in ps if c["pull"]["phase"] == phase]
                row[f"{phase}_s"] = _span([c["pull"]["seconds"] for c in ph])
                row[f"{phase}_upstream"] = {
                    k: statistics.fmean(c["upstream"][k] for c in ph) if ph else None for k in UPSTREAM_KEYS
                }
                row[f"{phase}_cpu_s"] = _median([c["pull"]["proxy_cpu_s"] for c in ph])
                cache: Counter[str] = Counter()
                for c in ph:
                    cache.update(c["cache"])
                row[f"{phase}_cache"] = dict(sorted(cache.items()))
            row["peak_rss_mb"] = max((c["peak_rss_mb"] for c in ps if c["peak_rss_mb"] is not None), default=None)
            row["stores"] = store_use(ps)
            block[config] = row
        loop_warm = block.get("loopback", {}).get("warm_s", {}).get("median")
        proxy_cold = block.get("proxy", {}).get("cold_s", {}).get("median")
        for row in block.values():
            w, c = row["warm_s"]["median"], row["cold_s"]["median"]
            row["warm_vs_loopback"] = w / loop_warm if w is not None and loop_warm else None
            row["cold_vs_proxy"] = c / proxy_cold if c is not None and proxy_cold else None
            rows.append(row)
    return rows


def store_use(pulls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round (one fresh store): the upstream blob GETs over all its pulls, the most any digest got, the
    distinct digests and the wire bytes."""
    out = []
    for rnd in sorted({c["round"] for c in pulls}):
        digests: Counter[str] = Counter()
        gets = wire = 0
        n = 0
        for c in pulls:
            if c["round"] != rnd:
                continue
            n += 1
            digests.update(c["upstream"]["blob_digests"])
            gets += c["upstream"]["blob_get"]
            wire += c["upstream"]["wire_bytes"]
        out.append(
            {
                "round": rnd,
                "pulls": n,
                "blob_gets": gets,
                "distinct_blobs": len(digests),
                "max_gets_per_blob": max(digests.values(), default=0),
                "wire_bytes": wire,
            }
        )
    return out


@dataclass(frozen=True)
class Goal:
    what: str
    value: float | None
    limit: float
    op: str  # "<=", ">=", "=="
    text: str  # the value as shown
    met: bool | None = field(default=None)

    def line(self) -> str:
        mark = "n/a " if self.met is None else ("met " if self.met else "MISS")
        return f"  {mark}  {self.what}: {self.text}"


def _goal(what: str, value: float | None, op: str, limit: float, fmt: str) -> Goal:
    ok: Callable[[float], bool] = {
        "<=": lambda v: v <= limit,
        ">=": lambda v: v >= limit,
        "==": lambda v: v == limit,
    }[op]
    if value is None:
        return Goal(what, None, limit, op, "no figures", None)
    return Goal(what, value, limit, op, fmt.format(value), ok(value))


def check_targets(
    rows: Sequence[Mapping[str, Any]],
    manifests: Mapping[str, Mapping[str, Mapping[str, Any]]],
    blob: Sequence[Mapping[str, Any]],
    image_bytes: int,
    blobs: int,
) -> list[Goal]:
    """Issue 20's targets from the summary rows, the manifest pulls (kind -> configuration -> counts) and
    the blob GETs."""
    goals: list[Goal] = []
    for r in rows:
        if r["config"] != "proxy-cache":
            continue
        where = f"RTT {r['rtt_ms']} ms {r['kind']} {r['client']}"
        goals.append(
            _goal(
                f"{where}: warm pull, proxy-cache vs loopback <= {WARM_VS_LOOPBACK}x",
                r["warm_vs_loopback"],
                "<=",
                WARM_VS_LOOPBACK,
                "{:.2f}x" + f" ({_fmt_s(r['warm_s']['median'])})",
            )
        )
        goals.append(
            _goal(
                f"{where}: cold pull, proxy-cache vs proxy <= {COLD_VS_PROXY}x",
                r["cold_vs_proxy"],
                "<=",
                COLD_VS_PROXY,
                "{:.2f}x" + f" ({_fmt_s(r['cold_s']['median'])})",
            )
        )
        stores = r["stores"]
        worst = max((st["max_gets_per_blob"] for st in stores), default=None)
        wire = max((st["wire_bytes"] for st in stores), default=None)
        goals.append(
            _goal(
                f"{where}: upstream blob GETs per blob per store == 1 ({blobs} blobs, {len(stores)} stores)",
                float(worst) if worst is not None else None,
                "==",
                1,
                "at most {:.0f}"
                + (
                    f"; at most {wire / 1e6:.1f} MB on the wire per store (image {image_bytes / 1e6:.1f} MB)"
                    if wire
                    else ""
                ),
            )
        )
    for kind, per in manifests.items():
        pc = per.get("proxy-cache")
        value = None
        if pc is not None and pc["pulls"]:
            value = pc["manifest_get"] * 100 / pc["pulls"]
        goals.append(
            _goal(
                f"{kind}: upstream manifest GETs per 100 pulls of an unchanged tag through proxy-cache "
                f"== {MANIFEST_GETS_PER_100}",
                value,
                "==",
                MANIFEST_GETS_PER_100,
                "{:g}" + (f" (HEADs {pc['manifest_head']})" if pc is not None else ""),
            )
        )
    uncached = _median([b["mb_s"] for b in blob if b["config"] == "proxy"])
    cached = [b for b in blob if b["config"] == "proxy-cache" and b["phase"] == "cached"]
    cached_mb = _median([b["mb_s"] for b in cached])
    goals.append(
        _goal(
            "cached blob GET through proxy-cache vs the uncached proxy >= 1.0x",
            cached_mb / uncached if cached_mb is not None and uncached else None,
            ">=",
            1.0,
            "{:.2f}x" + (f" ({cached_mb:.0f} vs {uncached:.0f} MB/s)" if cached_mb and uncached else ""),
        )
    )
    growth = max((b["rss_growth_mb"] for b in cached if b["rss_growth_mb"] is not None), default=None)
    goals.append(
        _goal(
            f"proxy-cache resident set growth during a cached blob GET <= {RSS_FLAT_MB:.0f} MB (flat)",
            growth,
            "<=",
            RSS_FLAT_MB,
            "{:.0f} MB",
        )
    )
    served = [b for b in cached if b["upstream_blob_gets"]]
    if cached:
        goals.append(
            _goal(
                "cached blob GETs that went upstream == 0",
                float(len(served)),
                "==",
                0,
                "{:.0f}" + f" of {len(cached)}",
            )
        )
    return goals


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def _n(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mb(row: Mapping[str, Any] | None) -> str:
    """Upstream MB (the relays' bytes back) per cold / warm pull, for the markdown table."""
    if row is None:
        return ""
    cold, warm = row["cold_upstream"]["wire_bytes"], row["warm_upstream"]["wire_bytes"]
    return f"{_n(cold / 1e6 if cold is not None else None, 1)} / {_n(warm / 1e6 if warm is not None else None, 1)}"


def _ups(u: Mapping[str, float | None]) -> str:
    """manifest GET/HEAD, blob GET (blob store GET), MB on the wire, as 'mG/mH/bG MB'."""
    if u.get("manifest_get") is None:
        return "-"
    bs = u.get("blobstore_get") or 0
    blob = f"{u['blob_get']:g}" + (f"+{bs:g}" if bs else "")
    return f"{u['manifest_get']:g}/{u['manifest_head']:g}/{blob} {(u['wire_bytes'] or 0) / 1e6:.1f}"


def format_tables(doc: Mapping[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        (
            f"C. Pull-through cache: {doc['image']['name']} ({doc['image']['blobs']} blobs, "
            f"{doc['image']['bytes'] / 1e6:.1f} MB) from HTTPS upstreams behind delay relays; {s['rounds']} rounds "
            f"(every server fresh, an empty store), each 1 cold + {s['warm']} warm pulls per configuration"
        ),
        "   times: median [min-max] s; x loop = warm / loopback's warm; x proxy = cold / proxy's cold",
        "   upstream per pull (mean): manifest GETs/HEADs/blob GETs(+blob store GETs) and MB the relays carried back",
    ]
    rows = doc["summary"]
    keys: list[tuple[int, str]] = []
    for r in rows:
        if (r["rtt_ms"], r["kind"]) not in keys:
            keys.append((r["rtt_ms"], r["kind"]))
    for rtt, kind in keys:
        lines += ["", f"  RTT {rtt} ms, {kind}"]
        lines.append(
            f"    {'client':<7} {'configuration':<12} {'cold s':>16} {'x proxy':>8} {'warm s':>16} {'x loop':>7} "
            f"{'upstream cold':>20} {'upstream warm':>20} {'CPU s c/w':>10} {'RSS MB':>7}  cache= (warm)"
        )
        for r in rows:
            if (r["rtt_ms"], r["kind"]) != (rtt, kind):
                continue
            c, w = r["cold_s"], r["warm_s"]
            cold = f"{_n(c['median'])} [{_n(c['min'])}-{_n(c['max'])}]" if c["median"] is not None else "-"
            warm = f"{_n(w['median'])} [{_n(w['min'])}-{_n(w['max'])}]" if w["median"] is not None else "-"
            cx = f"{r['cold_vs_proxy']:.2f}x" if r["cold_vs_proxy"] is not None else "-"
            wx = f"{r['warm_vs_loopback']:.2f}x" if r["warm_vs_loopback"] is not None else "-"
            cpu = f"{_n(r['cold_cpu_s'])}/{_n(r['warm_cpu_s'])}" if r["cold_cpu_s"] is not None else "-"
            cache = " ".join(f"{k} {v}" for k, v in r["warm_cache"].items())
            lines.append(
                f"    {r['client']:<7} {r['config']:<12} {cold:>16} {cx:>8} {warm:>16} {wx:>7} "
                f"{_ups(r['cold_upstream']):>20} {_ups(r['warm_upstream']):>20} {cpu:>10} "
                f"{_n(r['peak_rss_mb'], 0):>7}  {cache}"
            )
    for kind, per in doc["manifests"].items():
        title = (
            f"  {doc['settings']['manifest_pulls']} manifest GETs by an unchanged tag, {kind}, RTT "
            f"{doc['manifest_rtt_ms']} ms (one keep-alive client)"
        )
        lines += ["", title]
        lines.append(
            f"    {'configuration':<12} {'upstream GETs':>13} {'HEADs':>6} {'tokens':>7} {'p50 ms':>7} {'total s':>8}"
        )
        for config, m in per.items():
            lines.append(
                f"    {config:<12} {m['manifest_get']:>13} {m['manifest_head']:>6} {m['token_requests']:>7} "
                f"{m['p50_ms']:>7.1f} {m['seconds']:>8.1f}"
            )
    if doc["blob"]:
        lines += [
            "",
            f"  {doc['settings']['blob_mib']} MiB blob GET (curl -o /dev/null), https-basic, straight to its TLS front (no delay relay)",
        ]
        lines.append(
            f"    {'configuration':<12} {'phase':<8} {'MB/s':>6} {'ttfb ms':>8} {'CPU s':>6} {'RSS before':>10} "
            f"{'RSS max':>8} {'growth':>7} {'upstream blob GETs':>18} {'wire MB':>8}"
        )
        for b in doc["blob"]:
            lines.append(
                f"    {b['config']:<12} {b['phase']:<8} {b['mb_s']:>6.0f} {b['ttfb_ms']:>8.1f} {_n(b['cpu_s']):>6} "
                f"{_n(b['rss_before_mb'], 0):>10} {_n(b['rss_max_mb'], 0):>8} {_n(b['rss_growth_mb'], 0):>7} "
                f"{b['upstream_blob_gets']:>18} {b['upstream_wire_mb']:>8.0f}"
            )
    return "\n".join(lines)


def markdown(doc: Mapping[str, Any]) -> str:
    """The Cache tables for docs/performance.md and the README, with the machine."""
    m = doc["machine"]
    load = m.get("loadavg_end") or m["loadavg_start"]
    s = doc["settings"]
    out = [
        (
            f"Measured {time.strftime('%Y-%m-%d')} (commit {m['commit']}{', --quick' if s['quick'] else ''}): "
            f"{m['nproc']} vCPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}, Python "
            f"{m['python']}, mitmproxy {m['mitmproxy']}, {m['registry']}, {m['skopeo']}; load average "
            f"{' '.join(f'{x:.2f}' for x in m['loadavg_start'])} at the start, {' '.join(f'{x:.2f}' for x in load)} "
            f"at the end; {s['rounds']} rounds of 1 cold + {s['warm']} warm pulls per configuration; image "
            f"{doc['image']['bytes'] / 1e6:.1f} MB in {doc['image']['blobs']} blobs."
        ),
        "",
        "| RTT | upstream | client | direct | proxy | proxy-cache | anchor | loopback | proxy-cache: cold × proxy, warm × loopback | upstream MB per pull, cold / warm: proxy · proxy-cache · anchor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["rtt_ms"], r["kind"], r["client"], r["config"]): r for r in doc["summary"]}
    seen: list[tuple[int, str, str]] = []
    for r in doc["summary"]:
        if (r["rtt_ms"], r["kind"], r["client"]) not in seen:
            seen.append((r["rtt_ms"], r["kind"], r["client"]))

    def cell(key: tuple[int, str, str], config: str) -> str:
        r = by.get((*key, config))
        if r is None:
            return ""
        return f"{_n(r['cold_s']['median'])} / {_n(r['warm_s']['median'])}"

    for key in seen:
        pc = by.get((*key, "proxy-cache"), {})
        ratios = f"{_n(pc.get('cold_vs_proxy'))}× · {_n(pc.get('warm_vs_loopback'))}×" if pc else ""
        ups = " · ".join(_mb(by.get((*key, c))) for c in ("proxy", "proxy-cache", "anchor"))
        out.append(
            f"| {key[0]} ms | {key[1].removeprefix('https-')} | {key[2]} | "
            + " | ".join(cell(key, c) for c in CONFIGS)
            + f" | {ratios} | {ups} |"
        )
    out.append("")
    out.append("Times in seconds, cold / warm (medians).")
    if doc["manifests"]:
        out += ["", f"{s['manifest_pulls']} manifest GETs by an unchanged tag (RTT {doc['manifest_rtt_ms']} ms):", ""]
        out.append("| upstream | configuration | upstream manifest GETs | HEADs | p50, ms |")
        out.append("|---|---|---|---|---|")
        for kind, per in doc["manifests"].items():
            for config, mm in per.items():
                out.append(
                    f"| {kind.removeprefix('https-')} | {config} | {mm['manifest_get']} | {mm['manifest_head']} | "
                    f"{mm['p50_ms']:.1f} |"
                )
    if doc["blob"]:
        out += ["", f"{s['blob_mib']} MiB blob GET (curl, https-basic upstream without its delay relay):", ""]
        out.append("| configuration | phase | MB/s | CPU, s | RSS before → max, MB | upstream blob GETs |")
        out.append("|---|---|---|---|---|---|")
        for b in doc["blob"]:
            rss = f"{_n(b['rss_before_mb'], 0)} → {_n(b['rss_max_mb'], 0)}" if b["rss_max_mb"] is not None else ""
            out.append(
                f"| {b['config']} | {b['phase']} | {b['mb_s']:.0f} | {_n(b['cpu_s'])} | {rss} | {b['upstream_blob_gets']} |"
            )
    out += ["", "Targets:", ""] + [f"- {g.strip()}" for g in doc["targets"]]
    return "\n".join(out) + "\n"


# --- the section ---------------------------------------------------------------------------------------------


def run(s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    pulls: list[CachePull] = []
    failures: list[str] = []
    manifests: dict[str, dict[str, dict[str, Any]]] = {}
    blob: list[dict[str, Any]] = []
    with started_rig(s) as rig:
        notes = list(rig.wan.notes)
        clients = [c for c in s.clients if c != "docker" or rig.wan.dockerd is not None]
        for rtt in s.rtts_ms:
            rig.wan.set_rtt(rtt)
            for kind in s.kinds:
                for client in clients:
                    for rnd in range(s.rounds):
                        try:
                            pulls += run_block(rig, rtt, kind, client, s, rnd, failures)
                        except (RigError, OSError, ValueError, KeyError, httpx.HTTPError) as e:
                            failures.append(f"cache {rtt} ms {kind} {client} round {rnd + 1}: {type(e).__name__}: {e}")
                            print(f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        rtt0 = s.rtts_ms[0]
        rig.wan.set_rtt(rtt0)
        print(f"\nC. {s.manifest_pulls} manifest GETs by an unchanged tag, RTT {rtt0} ms", flush=True)
        for kind in s.kinds:
            try:
                manifests[kind] = manifest_pulls(rig, kind, rtt0, s.manifest_pulls)
            except (RigError, OSError, ValueError, KeyError, httpx.HTTPError) as e:
                failures.append(f"cache manifests {kind}: {type(e).__name__}: {e}")
                print(f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if rig.blob_digest is not None:
            print(
                f"\nC. {s.blob_mib} MiB blob GET, https-basic, straight to its TLS front (no delay relay)", flush=True
            )
            try:
                blob = blob_gets(rig, 2 if s.quick else 3)
            except (RigError, OSError, ValueError, KeyError, httpx.HTTPError) as e:
                failures.append(f"cache blob: {type(e).__name__}: {e}")
                print(f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        image: dict[str, Any] = {
            "name": f"{wan.WAN_NAME}:{wan.WAN_TAG}",
            "blobs": rig.blobs,
            "bytes": rig.wan.image_bytes,
        }
    raw = [asdict(c) for c in pulls]
    rows = summarize(raw)
    goals = check_targets(rows, manifests, blob, image["bytes"], image["blobs"])
    return {
        "settings": asdict(s),
        "clients": clients,
        "configurations": CONFIG_LABEL,
        "image": image,
        "summary": rows,
        "manifest_rtt_ms": s.rtts_ms[0],
        "manifests": manifests,
        "blob": blob,
        "targets": [g.line() for g in goals],
        "goals": [asdict(g) for g in goals],
        "notes": notes,
        "failures": failures,
        "pulls": raw,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run.sh bench --cache", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="skopeo and ctr, 2 rounds of 1 cold + 1 warm, 256 MiB blob")
    ap.add_argument("--rtt", default=None, metavar="MS,MS", help="round-trip times in ms (default 20,100)")
    ap.add_argument("--clients", default=None, metavar="C,C", help="among " + ", ".join(CLIENTS))
    ap.add_argument("--kinds", default=None, metavar="K,K", help="upstreams among " + ", ".join(KINDS))
    ap.add_argument("--rounds", type=int, default=None, help="cold rounds (fresh store each; default 3, 2 --quick)")
    ap.add_argument("--warm", type=int, default=None, help="warm pulls per round (default 2, 1 --quick)")
    ap.add_argument("--blob-mib", type=int, default=None, help="the large blob in MiB (default 1024, 256 --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where cache.json and cache.md go")
    args = ap.parse_args(argv)
    try:
        s = settings(args.quick, args.rtt, args.clients, args.kinds, args.rounds, args.warm, args.blob_mib)
    except ValueError as e:
        ap.error(str(e))
    for tool in ("docker-registry", "skopeo", "curl") + (("ctr", "containerd") if "ctr" in s.clients else ()):
        if shutil.which(tool) is None:
            print(f"bench --cache: {tool} is missing (./run.sh bench installs it)", file=sys.stderr)
            return 1
    machine = report.machine_info(targets.REPO)
    print(report.machine_line(machine))
    print(f"C. cache settings: {asdict(s)}")
    for c in CONFIGS:
        print(f"  {c:<12} {CONFIG_LABEL[c]}")
    doc = run(s)
    machine["loadavg_end"] = os.getloadavg()
    doc["machine"] = machine
    print("\n" + "=" * 100)
    print(
        report.machine_line(machine) + f", load average at end {' '.join(f'{x:.2f}' for x in machine['loadavg_end'])}"
    )
    print(format_tables(doc))
    print("\ncache targets (issue 20):")
    print("\n".join(doc["targets"]) or "  (none)")
    for n in doc["notes"]:
        print(f"  note: {n}")
    if doc["failures"]:
        print("\nfailures:")
        for f in doc["failures"]:
            print(f"  {f}")
    report.write_json(args.out / "cache.json", doc)
    (args.out / "cache.md").write_text(markdown(doc))
    print(f"\ntotal time {doc['seconds']:.0f}s; wrote {args.out / 'cache.json'} and {args.out / 'cache.md'}")
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
