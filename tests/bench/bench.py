"""registryproxy benchmark: `./run.sh bench [--quick] [--rounds N] [--configs a,b] [--lead1] [--wan | --no-wan]`.

Against real `docker-registry` upstreams it starts (tests/rig), each configuration in turn, alternating
within each round, several rounds, all in one run:

  direct       the registry's own port
  nginx        proxy_pass, proxy_buffering off (defaults; nginx-256k: proxy_buffer_size 256k)
  mitmdump     stock mitmdump --mode reverse, no addon
  rp-s         registryproxy under stock `mitmdump -s addon/registryproxy.py`
  rp-run       registryproxy as `./run.sh` starts it
  rp-workers2  `./run.sh --workers 2`, when that option exists

Measurements: 1. one blob GET (1 GiB; 256 MiB with --quick): MB/s, proxy CPU and peak RSS; 2. manifest HEADs
with a valid token, sequential on one connection and 16 concurrent; 3. the token endpoint, and the cost of
checking a token; 4. `skopeo copy` of a 5-layer image from a token-auth upstream and from one that redirects
blobs, with the blob bytes the proxy carried; 5. upstream token requests and manifest GETs per 100 pulls;
W. (wanbench.py) pulls of an 8 x 4 MiB image from distant HTTPS upstreams (delay relays, 20 and 100 ms round
trip) with skopeo, containerd and docker: directly, through the proxy with its upstream pool off and on.
`--wan` runs only that section (its results replace the "wan" part of an existing bench.json). `--cache` runs only
the pull-through cache section (cachebench.py: direct, proxy, proxy with cache, distribution's pull-through
cache and a loopback registry side by side; results in cache.json and cache.md), `--limits` only limits_bench.py.

Prints the tables (median, min/max, ratio to direct and to stock mitmdump) and writes
tests/bench/results/bench.json and bench.png. `--lead1` instead runs the experiment on issue 6's lead (1):
how turning on response streaming changes a 1 GiB stream through mitmdump.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script: `bench` must name this directory (a package under tests/, which run.sh puts on
    # PYTHONPATH), not this file, which Python would otherwise find first in the script's own directory.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    if str(_HERE.parent) not in sys.path:
        sys.path.insert(0, str(_HERE.parent))
    if str(_HERE.parents[1] / "addon") not in sys.path:
        sys.path.insert(0, str(_HERE.parents[1] / "addon"))

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from bench import measure, report, targets, wanbench
from rig import images, registry
from rig.procs import LOOPBACK, RigError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_CONFIGS = ("direct", "nginx", "nginx-256k", "mitmdump", "rp-s", "rp-run", "rp-workers2")
BIG = "platform/big"
PULL_CONFIGS = ("direct", "rp-s", "rp-run", "rp-workers2")
PULL_LAYERS = (1 * measure.MIB, 2 * measure.MIB, 3 * measure.MIB, 4 * measure.MIB, 2 * measure.MIB)


@dataclass(frozen=True)
class Settings:
    rounds: int
    blob_mib: int
    head_seq_count: int
    conc_duration: float
    token_seq_count: int
    ping_count: int
    pulls_per_round: int
    load_pulls: int
    quick: bool


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(1, 256, 200, 1.0, 100, 150, 1, 20, True)
    else:
        s = Settings(3, 1024, 1000, 3.0, 500, 500, 2, 100, False)
    if args.rounds is not None:
        s = dataclasses.replace(s, rounds=max(1, args.rounds))
    if args.blob_mib is not None:
        s = dataclasses.replace(s, blob_mib=max(1, args.blob_mib))
    return s


# --- the upstreams and their content -------------------------------------------------------------


@dataclass
class Rig:
    workdir: Path
    anon: registry.Upstream  # the big blob and the small manifest; token endpoint measurements
    tok: registry.Upstream  # token auth: whole pulls, and upstream load (through its tap)
    redir: registry.Upstream  # token auth, blobs 307 to a blob server: whole pulls
    blob_digest: str  # of platform/big's blob
    blob_size: int
    pull_digest: dict[str, str]  # kind -> manifest digest of platform/pull:latest
    registry_target: targets.Target  # the anonymous registry's process group, for its CPU

    def rp_config(self) -> dict[str, Any]:
        """anon/, tok/, redir/ on the registries' own ports; tap/ on the token upstream's tap (for counting)."""
        creds = {k: (u.username or "", u.password or "") for k, u in (("tok", self.tok), ("redir", self.redir))}
        creds["tap"] = (self.tok.username or "", self.tok.password or "")
        return targets.registryproxy_config(
            {
                "anon": measure.local_url(self.anon.registry_port),
                "tok": measure.local_url(self.tok.registry_port),
                "redir": measure.local_url(self.redir.registry_port),
                "tap": self.tok.url,
            },
            creds,
        )


@contextlib.contextmanager
def started_rig(settings: Settings) -> Iterator[Rig]:
    workdir = Path(tempfile.mkdtemp(prefix="registryproxy-bench-"))
    ups: list[registry.Upstream] = []
    try:
        t0 = time.perf_counter()
        for kind in ("anonymous", "token", "redirect"):
            ups.append(registry.start_upstream(kind, workdir / kind))
        anon, tok, redir = ups
        layout = workdir / "layout"
        images.build_image(layout, "pull", layers=PULL_LAYERS, seed="bench-pull")
        images.build_image(layout, "small", layers=(2048, 1024), seed="bench-small")
        digests = {}
        for up in (tok, redir):
            digests[up.kind] = images.push(layout, "pull", up, "platform/pull", "latest", timeout=120)
        images.push(layout, "small", tok, "platform/app", "latest")
        images.push(layout, "small", anon, "platform/app", "latest")
        size = settings.blob_mib * measure.MIB
        digest = measure.push_blob(measure.local_url(anon.registry_port), BIG, size)
        for up in ups:
            up.clear_access_log()
            if up.token_issuer is not None:
                up.token_issuer.clear()
        reg = targets.Target("registry", anon.registry_port, anon.proc.pid, registryproxy=False)
        print(f"upstreams ready in {time.perf_counter() - t0:.1f}s (blob {settings.blob_mib} MiB {digest[:19]}…)")
        yield Rig(workdir, anon, tok, redir, digest, size, digests, reg)
    finally:
        for up in ups:
            up.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- configurations ------------------------------------------------------------------------------


def start_target(name: str, rig: Rig, workdir: Path) -> targets.Target:
    port = rig.anon.registry_port
    if name == "direct":
        return targets.start_direct(port, rig.anon.proc.pid)
    if name in ("nginx", "nginx-256k"):
        return targets.start_nginx(name, port, workdir, buffer_256k=name == "nginx-256k")
    if name == "mitmdump":
        return targets.start_mitmdump(name, port, workdir)
    if name == "rp-s":
        return targets.start_rp_s(rig.rp_config(), workdir)
    if name == "rp-run":
        return targets.start_rp_run(rig.rp_config(), workdir)
    if name == "rp-workers2":
        return targets.start_rp_workers(rig.rp_config(), workdir, 2)
    raise ValueError(name)


def measure_target(t: targets.Target, rig: Rig, s: Settings, res: report.Results, rnd: int, blob2: bool) -> None:
    name = t.name
    gib = rig.blob_size / (1024**3)

    # 1. the blob
    b = measure.blob_get(t, rig.registry_target, BIG, rig.blob_digest, rig.blob_size)
    tr = b.transfers[0]
    res.add("blob_mb_s", name, tr.mb_s)
    res.add("blob_ttfb_ms", name, tr.ttfb_s * 1000)
    res.add("blob_registry_cpu_s_per_gib", name, b.registry.cpu_s / gib)
    if name != "direct":
        res.add("blob_proxy_cpu_s_per_gib", name, b.proxy.cpu_s / gib)
        res.add("blob_peak_rss_mb", name, b.proxy.peak_rss_max_mb)
        res.add("blob_peak_rss_sum_mb", name, b.proxy.peak_rss_sum_mb)
    res.note(
        round=rnd, config=name, what="blob", transfer=asdict(tr), proxy=asdict(b.proxy), registry=asdict(b.registry)
    )
    print(
        f"  {name:<12} blob {tr.mb_s:7.0f} MB/s  ttfb {tr.ttfb_s * 1000:7.1f} ms  proxy CPU {b.proxy.cpu_s:5.2f}s  "
        f"peak RSS {b.proxy.peak_rss_max_mb:6.0f} MB (sum {b.proxy.peak_rss_sum_mb:.0f})  "
        f"registry CPU {b.registry.cpu_s:5.2f}s",
        flush=True,
    )
    if blob2:
        b2 = measure.blob_get(t, rig.registry_target, BIG, rig.blob_digest, rig.blob_size, parallel=2)
        res.add("blob2_mb_s", name, b2.aggregate_mb_s)
        print(f"  {name:<12} 2 blobs at once {b2.aggregate_mb_s:7.0f} MB/s aggregate, proxy CPU {b2.proxy.cpu_s:.2f}s")

    # 2. manifest HEADs
    manifest = f"/v2/{t.local_name('platform/app')}/manifests/latest"
    tok = t.token(t.local_name("platform/app"), t.local_name("platform/big"))
    hdrs = measure.manifest_headers(tok)
    seq = measure.loadgen(t, manifest, method="HEAD", headers=hdrs, count=s.head_seq_count, warmup=30)
    conc = measure.loadgen(
        t, manifest, method="HEAD", headers=hdrs, connections=16, duration=s.conc_duration, warmup=64
    )
    res.add("head_seq_p50_ms", name, seq["p50_ms"])
    res.add("head_seq_p99_ms", name, seq["p99_ms"])
    res.add("head_seq_rps", name, seq["rps"])
    if name != "direct":
        res.add("head_seq_server_cpu_ms", name, 1000 * seq["server_cpu_s"] / max(1, seq["requests"] + 30))
    res.add("head_seq_loadgen_cpu_ms", name, 1000 * seq["cpu_s"] / max(1, seq["requests"] + 30))
    res.add("head_conc_rps", name, conc["rps"])
    res.add("head_conc_p50_ms", name, conc["p50_ms"])
    res.add("head_conc_p99_ms", name, conc["p99_ms"])
    res.add("head_conc_loadgen_cpu_ms", name, 1000 * conc["cpu_s"] / max(1, conc["requests"] + 64))
    res.note(round=rnd, config=name, what="head", sequential=seq, concurrent=conc)
    print(
        f"  {name:<12} HEAD seq p50 {seq['p50_ms']:6.2f} p99 {seq['p99_ms']:6.2f} ms ({seq['rps']:5.0f}/s)   "
        f"16 conc {conc['rps']:6.0f}/s p50 {conc['p50_ms']:6.1f} p99 {conc['p99_ms']:6.1f} ms",
        flush=True,
    )

    # 3. token endpoint, and the cost of a token check (ping answered by the proxy, with and without)
    if t.registryproxy:
        scope = [("Accept", "application/json")]
        token_path = f"/token?service={LOOPBACK}%3A{t.port}&scope=repository%3A{t.local_name('platform/app')}%3Apull"
        ts = measure.loadgen(t, token_path, headers=scope, count=s.token_seq_count, warmup=20)
        tc = measure.loadgen(t, token_path, headers=scope, connections=16, duration=s.conc_duration, warmup=64)
        with_tok = measure.loadgen(
            t, "/v2/", headers=[("Authorization", f"Bearer {tok}")], count=s.ping_count, warmup=20
        )
        without = measure.loadgen(t, "/v2/", count=s.ping_count, warmup=20, expect=(401,))
        res.add("token_seq_rps", name, ts["rps"])
        res.add("token_seq_p50_ms", name, ts["p50_ms"])
        res.add("token_seq_p99_ms", name, ts["p99_ms"])
        res.add("token_conc_rps", name, tc["rps"])
        res.add("token_conc_p50_ms", name, tc["p50_ms"])
        res.add("token_conc_p99_ms", name, tc["p99_ms"])
        res.add("ping_token_p50_ms", name, with_tok["p50_ms"])
        res.add("ping_none_p50_ms", name, without["p50_ms"])
        res.add("ping_check_ms", name, with_tok["p50_ms"] - without["p50_ms"])
        res.note(round=rnd, config=name, what="token", sequential=ts, concurrent=tc, ping_token=with_tok, ping=without)
        print(
            f"  {name:<12} token seq {ts['rps']:5.0f}/s p50 {ts['p50_ms']:6.2f} p99 {ts['p99_ms']:6.2f} ms   "
            f"16 conc {tc['rps']:5.0f}/s p50 {tc['p50_ms']:6.1f} ms   /v2/ p50 with token {with_tok['p50_ms']:.2f} "
            f"vs without {without['p50_ms']:.2f} ms",
            flush=True,
        )

    # 4. whole pulls
    if name in PULL_CONFIGS:
        for up, key in ((rig.tok, "token"), (rig.redir, "redirect")):
            for _ in range(s.pulls_per_round):
                blobstore_before = up.blob_server.count() if up.blob_server is not None else 0
                if name == "direct":
                    host, repo, creds = f"{LOOPBACK}:{up.registry_port}", "platform/pull", up.push_creds
                else:
                    mapping = "tok" if key == "token" else "redir"
                    host, repo, creds = t.url.removeprefix("http://"), t.local_name("platform/pull", mapping), None
                p = measure.skopeo_pull(t, host, repo, creds, rig.pull_digest[up.kind])
                blobstore = (up.blob_server.count() - blobstore_before) if up.blob_server is not None else None
                res.add(f"pull_{key}_s", name, p.seconds)
                if p.blob_bytes_logged is not None:
                    res.add(f"pull_{key}_blob_mb", name, p.blob_bytes_logged / 1e6)
                res.note(round=rnd, config=name, what=f"pull_{key}", blobstore_requests=blobstore, **asdict(p))
                carried = "-" if p.blob_bytes_logged is None else f"{p.blob_bytes_logged:,}"
                print(
                    f"  {name:<12} pull ({key:<8}) {p.seconds:5.2f}s  blob bytes through the proxy {carried}"
                    + (f"  (blob store served {blobstore} requests)" if blobstore is not None else ""),
                    flush=True,
                )


# --- 5. upstream load -------------------------------------------------------------------------------


def upstream_load(t: targets.Target, rig: Rig, pulls: int) -> dict[str, Any]:
    """`pulls` client pulls (ping, token, manifest, config, layers) of tap/app through `t`, counted upstream."""
    issuer = rig.tok.token_issuer
    assert issuer is not None
    issuer.clear()
    rig.tok.clear_access_log()
    t0 = time.perf_counter()
    received = 0
    with httpx.Client(timeout=60, trust_env=False) as c:
        for _ in range(pulls):
            received += measure.pull_sequence(c, t.url, t.local_name("platform/app", "tap"))
    seconds = time.perf_counter() - t0
    log = rig.tok.access_log()
    return {
        "client_pulls": pulls,
        "client_token_requests": pulls,
        "upstream_token_requests": issuer.count(),
        "upstream_manifest_gets": sum(1 for e in log if e.method == "GET" and "/manifests/" in e.path),
        "upstream_blob_gets": sum(1 for e in log if e.method == "GET" and "/blobs/" in e.path),
        "upstream_pings": sum(1 for e in log if e.path.split("?")[0] == "/v2/"),
        "upstream_requests": len(log),
        "seconds": seconds,
        "bytes_received": received,
    }


def token_check_inprocess() -> dict[str, float]:
    """µs per token check in-process, for a token without and with an upstream token (~900 bytes) inside.

    `decrypt`: the full check (PASETO decryption and claims; TokenCodec._read_access where a cache of decrypted
    tokens sits in front of it, else read_access); `cached`: read_access on a token it has seen before.
    """
    from regproxy.tokens.paseto import Grant, TokenCodec

    codec = TokenCodec((bytes.fromhex(targets.SECRET_KEY),))
    full: Callable[[str, str], object] = getattr(codec, "_read_access", codec.read_access)
    aud = "http://127.0.0.1:5000"
    out: dict[str, float] = {}
    for label, upstream in (("no_upstream_token", None), ("with_upstream_token", "e" * 900)):
        tok = codec.issue_access(aud, (Grant("anon/", ("anon/app",), upstream),), 300)
        out[f"{label}_token_bytes"] = len(tok)
        for how, fn in (("decrypt", full), ("cached", codec.read_access)):
            n = 1000 if how == "decrypt" else 20000

            def read(tok: str = tok, fn: Callable[[str, str], object] = fn) -> None:
                fn(tok, aud)

            secs = min(timeit.repeat(read, number=n, repeat=3))
            out[f"{label}_{how}_us"] = secs / n * 1e6
    return out


# --- lead (1): how streaming is turned on -----------------------------------------------------------

LEAD1_STREAM_ADDON = """\
from mitmproxy import http


class StreamAll:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.response.stream = True


addons = [StreamAll()]
"""

LEAD1_NOOP_ADDON = """\
from mitmproxy import http


class Noop:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pass


addons = [Noop()]
"""


def run_lead1(rig: Rig, s: Settings, out_dir: Path) -> dict[str, Any]:
    """The blob GET through stock mitmdump four ways, alternating, `s.rounds` rounds (fresh processes)."""
    work = rig.workdir / "lead1"
    work.mkdir(parents=True, exist_ok=True)
    stream_py, noop_py = work / "stream_addon.py", work / "noop_addon.py"
    stream_py.write_text(LEAD1_STREAM_ADDON)
    noop_py.write_text(LEAD1_NOOP_ADDON)
    variants: dict[str, tuple[str, ...]] = {
        "stock (buffers)": (),
        "noop responseheaders addon (buffers)": ("-s", str(noop_py)),
        "stream_large_bodies=1": ("--set", "stream_large_bodies=1"),
        "addon sets stream=True": ("-s", str(stream_py)),
    }
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    gib = rig.blob_size / 1024**3
    for rnd in range(s.rounds):
        order = list(variants)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]
        print(f"lead (1) round {rnd + 1}/{s.rounds}")
        for label in order:
            t = targets.start_mitmdump(
                "lead1", rig.anon.registry_port, work / f"r{rnd}-{len(samples[label])}", variants[label]
            )
            try:
                b = measure.blob_get(t, rig.registry_target, BIG, rig.blob_digest, rig.blob_size)
            finally:
                t.stop()
            tr = b.transfers[0]
            row = {
                "mb_s": tr.mb_s,
                "cpu_s_per_gib": b.proxy.cpu_s / gib,
                "peak_rss_mb": b.proxy.peak_rss_max_mb,
                "ttfb_ms": tr.ttfb_s * 1000,
            }
            samples[label].append(row)
            print(
                f"  {label:<38} {row['mb_s']:6.0f} MB/s  {row['cpu_s_per_gib']:5.2f} CPU-s/GiB  "
                f"peak RSS {row['peak_rss_mb']:6.0f} MB  ttfb {row['ttfb_ms']:8.1f} ms",
                flush=True,
            )
            targets.settle()
    summary: dict[str, dict[str, float]] = {}
    print("\nlead (1): 1 blob GET through mitmdump, medians over rounds (fresh process each time)")
    print(f"  {'variant':<38} {'MB/s':>7} {'CPU-s/GiB':>10} {'peak RSS MB':>12} {'ttfb ms':>9} {'x stock':>8}")
    stock = statistics.median(r["mb_s"] for r in samples["stock (buffers)"])
    for label, rows in samples.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[label] = med
        print(
            f"  {label:<38} {med['mb_s']:7.0f} {med['cpu_s_per_gib']:10.2f} {med['peak_rss_mb']:12.0f} "
            f"{med['ttfb_ms']:9.1f} {med['mb_s'] / stock:7.2f}x"
        )
    doc = {"blob_bytes": rig.blob_size, "rounds": s.rounds, "samples": samples, "medians": summary}
    report.write_json(out_dir / "lead1.json", doc)
    return doc


# --- targets of issue 6 ---------------------------------------------------------------------------


def check_targets(res: report.Results, load: dict[str, dict[str, Any]]) -> list[str]:
    lines = []

    def line(what: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> None:
        if value is None:
            lines.append(f"  n/a   {what}")
            return
        lines.append(f"  {'met ' if ok(value) else 'MISS'}  {what}: {fmt.format(value)}")

    stock_mb = res.median("blob_mb_s", "mitmdump")
    stock_p50 = res.median("head_seq_p50_ms", "mitmdump")
    for rp in targets.REGISTRYPROXY:
        mb = res.median("blob_mb_s", rp)
        if mb is None:
            continue
        line(
            f"{rp} blob throughput vs stock mitmdump >= 0.95x",
            mb / stock_mb if stock_mb else None,
            lambda v: v >= 0.95,
            "{:.2f}x",
        )
        p50 = res.median("head_seq_p50_ms", rp)
        if p50 is not None and stock_p50 is not None:
            line(f"{rp} added HEAD p50 vs stock mitmdump <= 0.3 ms", p50 - stock_p50, lambda v: v <= 0.3, "{:+.2f} ms")
            line(f"{rp} HEAD p50 vs stock mitmdump <= 0.6x", p50 / stock_p50, lambda v: v <= 0.6, "{:.2f}x")
            direct_p50 = res.median("head_seq_p50_ms", "direct")
            if direct_p50 is not None and stock_p50 > direct_p50:
                line(
                    f"{rp} HEAD p50 added over direct vs stock mitmdump's (the registry's own time taken out) <= 0.6x",
                    (p50 - direct_p50) / (stock_p50 - direct_p50),
                    lambda v: v <= 0.6,
                    "{:.2f}x",
                )
            cpu, stock_cpu = res.median("head_seq_server_cpu_ms", rp), res.median("head_seq_server_cpu_ms", "mitmdump")
            if cpu is not None and stock_cpu:
                line(
                    f"{rp} proxy CPU per HEAD vs stock mitmdump <= 0.6x", cpu / stock_cpu, lambda v: v <= 0.6, "{:.2f}x"
                )
        line(
            f"{rp} peak RSS streaming the blob < 150 MB",
            res.median("blob_peak_rss_mb", rp),
            lambda v: v < 150,
            "{:.0f} MB",
        )
        if rp in load:
            n = load[rp]
            line(
                f"{rp} upstream token requests per {n['client_pulls']} pulls (client made {n['client_token_requests']}) <= 10",
                n["upstream_token_requests"],
                lambda v: v <= 10,
                "{:.0f}",
            )
    for key, label in (
        ("blob2_mb_s", "2 parallel blob GETs"),
        ("head_conc_rps", "16-connection HEAD req/s (capped by the registry)"),
        ("token_conc_rps", "16-connection token req/s (answered by the proxy)"),
    ):
        w, one = res.median(key, "rp-workers2"), res.median(key, "rp-run")
        if w is not None and one:
            line(f"rp-workers2 vs rp-run, {label} >= 1.8x", w / one, lambda v: v >= 1.8, "{:.2f}x")
    return lines


# --- W. the WAN section alone ------------------------------------------------------------------------


def run_wan_only(ws: wanbench.WanSettings, machine: dict[str, Any], out: Path, started: float) -> int:
    """`--wan`: the WAN section; its results replace the "wan" part of out/bench.json (the rest is kept)."""
    missing = [c for c in ("ctr", "containerd") if "ctr" in ws.clients and shutil.which(c) is None]
    if missing:
        print(f"bench: {', '.join(missing)} missing (./run.sh bench installs containerd)", file=sys.stderr)
        return 1
    print(f"W. WAN pulls: {asdict(ws)}", flush=True)
    doc = wanbench.run(ws)
    machine["loadavg_end"] = os.getloadavg()
    doc["machine"] = machine
    print("\n" + "=" * 100)
    print(
        report.machine_line(machine) + f", load average at end {' '.join(f'{x:.2f}' for x in machine['loadavg_end'])}"
    )
    wanbench.print_report(doc)
    path = out / "bench.json"
    try:
        whole: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        whole = {}
    whole = whole or {"machine": machine}
    whole["wan"] = doc
    report.write_json(path, whole)
    write_wan_markdown(out / "wan.md", doc, machine)
    print(f'\ntotal time {time.perf_counter() - started:.0f}s; wrote {path} ("wan") and {out / "wan.md"}')
    return 1 if doc["failures"] else 0


def write_wan_markdown(path: Path, doc: dict[str, Any], machine: dict[str, Any]) -> None:
    """The README's WAN table, with the machine and the date, ready to paste."""
    load = machine.get("loadavg_end") or machine["loadavg_start"]
    text = (
        f"Measured {time.strftime('%Y-%m-%d')} (commit {machine['commit']}): {machine['nproc']} vCPUs "
        f"({machine['cpu_model']}), {machine['memory_gib']} GiB RAM, Linux {machine['kernel']}, Python "
        f"{machine['python']}, mitmproxy {machine['mitmproxy']}, {machine['skopeo']}; load average "
        f"{' '.join(f'{x:.2f}' for x in machine['loadavg_start'])} at the start, "
        f"{' '.join(f'{x:.2f}' for x in load)} at the end; {doc['settings']['warm']} warm pulls per configuration.\n\n"
        + wanbench.markdown_table(doc)
        + "\n\nTargets:\n\n"
        + "\n".join(f"- {line.strip()}" for line in doc["targets"])
        + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run.sh bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, 256 MiB blob, fewer requests")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--blob-mib", type=int, default=None, help="blob size in MiB (default 1024; 256 with --quick)")
    p.add_argument(
        "--configs", default=",".join(ALL_CONFIGS), help="comma-separated subset of: " + ", ".join(ALL_CONFIGS)
    )
    p.add_argument("--lead1", action="store_true", help="run only the lead (1) streaming experiment")
    wan_group = p.add_mutually_exclusive_group()
    wan_group.add_argument("--wan", action="store_true", help="run only the WAN section (W.)")
    wan_group.add_argument("--no-wan", action="store_true", help="skip the WAN section")
    p.add_argument(
        "--wan-rtt", default=None, metavar="MS,MS", help="WAN round-trip times in ms (default 20,100; 100 with --quick)"
    )
    p.add_argument("--wan-warm", type=int, default=None, metavar="N", help="warm WAN pulls (default 3; 1 with --quick)")
    p.add_argument(
        "--wan-clients",
        default=None,
        metavar="C,C",
        help="WAN clients among " + ", ".join(wanbench.CLIENTS) + " (default all; skopeo,ctr with --quick)",
    )
    p.add_argument("--wan-kinds", default=None, metavar="K,K", help="WAN upstreams among " + ", ".join(wanbench.KINDS))
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where bench.json and bench.png go")
    p.add_argument("--limits", action="store_true", help="run only the cost of the limits (limits_bench.py)")
    p.add_argument(
        "--cache",
        action="store_true",
        help="run only the pull-through cache section (cachebench.py; its own options: --cache --help)",
    )
    args_list = sys.argv[1:] if argv is None else argv
    if "--cache" in args_list:
        from bench import cachebench

        return cachebench.main([a for a in args_list if a != "--cache"])
    args = p.parse_args(argv)
    if args.limits:
        from bench import limits_bench

        return limits_bench.main(["--quick"] if args.quick else [])
    s = settings_from(args)
    try:
        wan_settings = wanbench.settings(args.quick, args.wan_rtt, args.wan_warm, args.wan_clients, args.wan_kinds)
    except ValueError as e:
        p.error(str(e))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown:
        p.error(f"unknown configurations: {', '.join(unknown)}")

    started = time.perf_counter()
    machine = report.machine_info(targets.REPO)
    print(report.machine_line(machine))
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (./run.sh bench installs it)", file=sys.stderr)
            return 1
    if args.lead1:
        with started_rig(s) as rig:
            run_lead1(rig, s, args.out)
        print(f"\nlead (1) done in {time.perf_counter() - started:.0f}s; results in {args.out / 'lead1.json'}")
        return 0
    if args.wan:
        return run_wan_only(wan_settings, machine, args.out, started)

    if "rp-workers2" in configs and not targets.workers_available():
        print("rp-workers2: `./run.sh --workers N` is not available yet (regproxy.cli run --help has no --workers)")
        configs.remove("rp-workers2")
    if any(c.startswith("nginx") for c in configs) and shutil.which("nginx") is None:
        print("nginx is not installed: skipping the nginx configurations")
        configs = [c for c in configs if not c.startswith("nginx")]
    workers = "rp-workers2" in configs
    print(f"settings: {asdict(s)}")
    print("configurations:")
    for c in configs:
        print(f"  {c:<12} {targets.DESCRIPTIONS[c]}")

    res = report.Results()
    load: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    with started_rig(s) as rig:
        for rnd in range(s.rounds):
            order = configs[rnd % len(configs) :] + configs[: rnd % len(configs)]
            print(f"\nround {rnd + 1}/{s.rounds}: {' '.join(order)}", flush=True)
            for name in order:
                try:
                    t = start_target(name, rig, rig.workdir / f"{name}-r{rnd}")
                except RigError as e:
                    failures.append(f"round {rnd + 1} {name}: did not start: {e}")
                    print(f"  {name:<12} did not start: {str(e).splitlines()[0]}", flush=True)
                    continue
                try:
                    blob2 = workers and name in ("direct", "rp-run", "rp-workers2")
                    measure_target(t, rig, s, res, rnd, blob2)
                except (RigError, httpx.HTTPError, OSError, ValueError, KeyError) as e:
                    failures.append(f"round {rnd + 1} {name}: {type(e).__name__}: {e}")
                    print(f"  {name:<12} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                finally:
                    t.stop()
                targets.settle()

        print(f"\n5. upstream load: {s.load_pulls} client pulls of tap/app (token-auth upstream, through its tap)")
        for name in [c for c in configs if c in targets.REGISTRYPROXY]:
            try:
                t = start_target(name, rig, rig.workdir / f"{name}-load")
            except RigError as e:
                failures.append(f"upstream load {name}: did not start: {e}")
                continue
            try:
                load[name] = upstream_load(t, rig, s.load_pulls)
                n = load[name]
                print(
                    f"  {name:<12} upstream token requests {n['upstream_token_requests']:4d}, manifest GETs "
                    f"{n['upstream_manifest_gets']:4d}, blob GETs {n['upstream_blob_gets']:4d}, /v2/ pings "
                    f"{n['upstream_pings']:4d} (client: {n['client_pulls']} pulls, {n['client_token_requests']} "
                    f"token requests) in {n['seconds']:.1f}s",
                    flush=True,
                )
            except (RigError, httpx.HTTPError, OSError, ValueError, KeyError) as e:
                failures.append(f"upstream load {name}: {type(e).__name__}: {e}")
            finally:
                t.stop()

    wan_doc: dict[str, Any] | None = None
    if not args.no_wan:
        print(f"\nW. WAN pulls: {asdict(wan_settings)}", flush=True)
        wan_doc = wanbench.run(wan_settings)
        failures += wan_doc["failures"]

    inproc = token_check_inprocess()
    elapsed = time.perf_counter() - started
    machine["loadavg_end"] = os.getloadavg()

    print("\n" + "=" * 100)
    print(
        report.machine_line(machine) + f", load average at end {' '.join(f'{x:.2f}' for x in machine['loadavg_end'])}"
    )
    print(
        f"rounds {s.rounds}, blob {s.blob_mib} MiB, MB = 10^6 bytes; median over rounds [min, max]; "
        "ratios are of medians (x direct, x stock mitmdump)"
    )
    print(report.format_tables(res, configs))
    print(
        "\n3c. Token check in-process: decrypting and checking "
        f"{inproc['no_upstream_token_decrypt_us']:.0f} µs for a {inproc['no_upstream_token_token_bytes']:.0f}-byte "
        f"token, {inproc['with_upstream_token_decrypt_us']:.0f} µs for a "
        f"{inproc['with_upstream_token_token_bytes']:.0f}-byte one (an upstream token inside); read_access on a token "
        f"seen before {inproc['no_upstream_token_cached_us']:.1f} / {inproc['with_upstream_token_cached_us']:.1f} µs"
    )
    if load:
        print(f"\n5. Upstream load per {s.load_pulls} client pulls (token-auth upstream, operator credentials)")
        print(
            f"    {'configuration':<13} {'token reqs':>10} {'manifest GETs':>14} {'blob GETs':>10} {'pings':>6} {'all':>6}"
        )
        for name, n in load.items():
            print(
                f"    {name:<13} {n['upstream_token_requests']:>10} {n['upstream_manifest_gets']:>14} "
                f"{n['upstream_blob_gets']:>10} {n['upstream_pings']:>6} {n['upstream_requests']:>6}"
            )
        print(f"    (the client made {s.load_pulls} token requests and {s.load_pulls} manifest GETs)")
    goals = check_targets(res, load)
    print("\nissue 6 targets (from this run's medians):")
    print("\n".join(goals))
    if wan_doc is not None:
        wanbench.print_report(wan_doc)
    if failures:
        print("\nfailures:")
        for f in failures:
            print(f"  {f}")
    print(f"\ntotal time {elapsed:.0f}s")

    doc = {
        "machine": machine,
        "settings": asdict(s),
        "configurations": {c: targets.DESCRIPTIONS[c] for c in configs},
        "workers_available": workers,
        "summary": res.summary(),
        "token_check_inprocess": inproc,
        "upstream_load": load,
        "targets": goals,
        "failures": failures,
        "details": res.raw,
        "seconds": elapsed,
    }
    if wan_doc is not None:
        doc["wan"] = wan_doc
        write_wan_markdown(args.out / "wan.md", wan_doc, machine)
    report.write_json(args.out / "bench.json", doc)
    title = (
        f"registryproxy bench, {time.strftime('%Y-%m-%d')}: {machine['nproc']} CPUs {machine['cpu_model']}, "
        f"Python {machine['python']}, mitmproxy {machine['mitmproxy']}, {s.rounds} rounds, blob {s.blob_mib} MiB"
    )
    charted = report.write_chart(args.out / "bench.png", res, configs, title)
    wrote = [args.out / "bench.json"] + ([args.out / "bench.png"] if charted else [])
    wrote += [args.out / "wan.md"] if wan_doc is not None else []
    print("wrote " + ", ".join(str(w) for w in wrote))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
