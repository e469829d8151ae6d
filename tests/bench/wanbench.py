"""The benchmark's WAN section: whole pulls from distant HTTPS upstreams, directly and through the proxy.

Upstreams (tests/rig/https_upstream.py), HTTPS from a test CA, each server behind a delay relay that
counts the connections it accepts:
  https-redirect  token auth, the token service on its own server, blobs 307 to a blob store on another
                  (as Docker Hub, ghcr.io); the client fetches the blobs itself, the proxy never sees them
  https-basic     Basic auth, blobs answered by the registry: their bytes cross the proxy
Image: rig/wan.py's 8 layers x 4 MiB (incompressible). Clients: skopeo (`copy` to a fresh OCI layout),
containerd (`ctr content fetch` into a fresh namespace, content sharing isolated), dockerd (`docker pull`,
then every image pruned). Every pull transfers all the bytes.

Configurations, alternating pull by pull:
  direct    the client straight to the upstream (verifying it with the test CA)
  pool-off  through the proxy as ./run.sh starts it (lean master), `--set registryproxy_upstream_pool=false`:
            mitmproxy's own one upstream connection per client connection (the behaviour before the pool)
  pool-on   the same with the pool (the default)
  haproxy   the alternative the pool was chosen over, measured beside it: the proxy with the pool off, its
            mapping's registry an HAProxy on loopback that does the upstream TLS and keeps the upstream
            connections (`http-reuse always`), an egress engine of its own (not in --quick)
The proxy trusts the upstream through the configuration's `ca_file`; clients reach the proxy on loopback as
the rest of the benchmark does (skopeo and docker over TLS without verifying the proxy's certificate,
ctr in plain HTTP).

For each round-trip time, upstream kind and client: fresh proxies, one cold pull per configuration (the
proxies' first: no upstream connection, token or challenge known), then N warm pulls per configuration.
Measured per pull: wall time of the client process, the connections each upstream server (registry,
token, blobs) accepted during it, the proxy's CPU and the blob bytes it logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import measure, targets
from rig import daemons, tls, wan
from rig.https_upstream import HttpsUpstream, start_https_upstream
from rig.procs import LOOPBACK, Proc, RigError, clean_env, free_port

KINDS = ("https-redirect", "https-basic")
CONFIGS = ("direct", "pool-off", "pool-on", "haproxy")
CLIENTS = ("skopeo", "ctr", "docker")
SERVERS = ("registry", "token", "blobs")
MAPPING = {"https-redirect": "redir", "https-basic": "basic"}
POOL_OPTION = "registryproxy_upstream_pool"
KIND_LABEL = {
    "https-redirect": "token auth, token service on its own server, blobs 307 to a blob store",
    "https-basic": "Basic auth, blobs through the proxy",
}
CONFIG_LABEL = {
    "direct": "the client straight to the upstream",
    "pool-off": f"./run.sh --set {POOL_OPTION}=false (one upstream connection per client connection)",
    "pool-on": "./run.sh (upstream connections pooled across client connections)",
    "haproxy": f"./run.sh --set {POOL_OPTION}=false, the registry through HAProxy on loopback (upstream TLS, http-reuse always)",
}
# Targets of the issue "Production upstreams" (pool-on, warm pulls, ratio of medians to direct).
MAX_WARM_CONNECTIONS = 1
MAX_RATIO = {"skopeo": 0.8, "ctr": 1.0, "docker": 1.0}


@dataclass(frozen=True)
class WanSettings:
    rtts_ms: tuple[int, ...]
    warm: int
    clients: tuple[str, ...]
    kinds: tuple[str, ...]
    configs: tuple[str, ...] = CONFIGS


def settings(quick: bool, rtts: str | None, warm: int | None, clients: str | None, kinds: str | None) -> WanSettings:
    """The full run: RTT 20 and 100 ms, 3 warm pulls, every client. --quick: RTT 100 ms, 1 warm pull, no docker."""
    s = (
        WanSettings((100,), 1, ("skopeo", "ctr"), KINDS, CONFIGS[:3])
        if quick
        else WanSettings((20, 100), 3, CLIENTS, KINDS, CONFIGS)
    )
    if rtts is not None:
        s = dataclasses.replace(s, rtts_ms=tuple(int(x) for x in _split(rtts)))
    if warm is not None:
        s = dataclasses.replace(s, warm=max(1, warm))
    if clients is not None:
        s = dataclasses.replace(s, clients=tuple(_split(clients)))
    if kinds is not None:
        s = dataclasses.replace(s, kinds=tuple(_split(kinds)))
    bad = [c for c in s.clients if c not in CLIENTS] + [k for k in s.kinds if k not in KINDS]
    if bad or not s.rtts_ms or any(r < 0 for r in s.rtts_ms):
        raise ValueError(f"WAN settings: unknown or bad {', '.join(bad) or 'round-trip times'}")
    return s


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --- the rig: upstreams, image, daemons ------------------------------------------------------------


@dataclass
class WanRig:
    workdir: Path
    ca: tls.TestCA
    upstreams: dict[str, HttpsUpstream]
    digest: str  # of the WAN image's manifest, the same on every upstream
    image_bytes: int
    containerd: daemons.Containerd | None
    dockerd: daemons.Dockerd | None
    notes: list[str] = field(default_factory=list)
    image: wan.WanImage | None = None  # to push it elsewhere (the cache section's loopback registry)

    def proxy_config(self) -> dict[str, Any]:
        """redir/ and basic/ -> the upstreams' platform/, with the operator's credentials; the test CA as ca_file."""
        cfg = targets.registryproxy_config(
            {MAPPING[k]: u.url for k, u in self.upstreams.items()},
            {MAPPING[k]: (u.username or "", u.password or "") for k, u in self.upstreams.items() if u.username},
        )
        cfg["ca_file"] = str(self.ca.ca_cert)
        return cfg

    def set_rtt(self, rtt_ms: int) -> None:
        for u in self.upstreams.values():
            u.set_delay(rtt_ms / 2000)


@contextlib.contextmanager
def started_rig(kinds: Sequence[str], clients: Sequence[str], prefix: str = "registryproxy-wan-") -> Iterator[WanRig]:
    """The HTTPS upstreams of `kinds` (delay relays at 0 ms) holding the WAN image, with containerd and
    dockerd when `clients` need them (docker skipped, with a note, when dockerd cannot start)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    ups: dict[str, HttpsUpstream] = {}
    containerd: daemons.Containerd | None = None
    dockerd: daemons.Dockerd | None = None
    notes: list[str] = []
    try:
        t0 = time.perf_counter()
        ca = tls.make_ca(workdir / "ca")
        for kind in kinds:
            ups[kind] = start_https_upstream(kind, workdir / kind, delay=0.0, ca=ca)
        image = wan.WanImage(workdir / "layout")
        for u in ups.values():
            if image.ensure(u) != image.digest:
                raise RigError(f"{u.kind}: the pushed WAN image has another digest")
            u.clear_logs()
        if "ctr" in clients or "docker" in clients:
            containerd = daemons.start_containerd(workdir / "containerd")
        if "docker" in clients:
            assert containerd is not None
            if os.geteuid() != 0:
                notes.append("docker: skipped (dockerd needs root)")
            else:
                try:
                    dockerd = daemons.start_dockerd(workdir / "dockerd", containerd)
                except RigError as e:
                    notes.append(f"docker: skipped (dockerd did not start: {str(e).splitlines()[0]})")
        for n in notes:
            print(n)
        print(
            f"WAN upstreams ready in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{k} {u.url}" for k, u in ups.items())
            + f"; image {wan.WAN_NAME}:{wan.WAN_TAG} {image.digest[:19]}… ({image.size / 1e6:.1f} MB)",
            flush=True,
        )
        yield WanRig(workdir, ca, ups, image.digest, image.size, containerd, dockerd, notes, image)
    finally:
        if dockerd is not None:
            dockerd.stop()
        if containerd is not None:
            containerd.stop()
        for u in ups.values():
            u.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- one pull ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pull:
    rtt_ms: int
    kind: str
    client: str
    config: str
    phase: str  # "cold" or "warm"
    index: int  # 0 for the cold pull, 1..N for the warm ones
    seconds: float
    connections: dict[str, int]  # upstream server -> connections it accepted during the pull
    proxy_cpu_s: float | None
    proxy_blob_bytes: int | None  # blob bytes the proxy's log lines report (None: direct)
    idle_s: float | None  # seconds since the previous pull through this proxy ended (None: direct, or cold)


class Block:
    """One (RTT, upstream kind, client): its fresh proxies, and how each configuration pulls."""

    def __init__(self, rig: WanRig, rtt_ms: int, kind: str, client: str, workdir: Path) -> None:
        self.rig = rig
        self.rtt_ms = rtt_ms
        self.kind = kind
        self.client = client
        self.up = rig.upstreams[kind]
        self.workdir = workdir
        self.proxies: dict[str, targets.Target] = {}
        self.egress: Proc | None = None  # HAProxy of the "haproxy" configuration
        self.last_end: dict[str, float] = {}
        self.logged_in = False

    def start_proxies(self, configs: Sequence[str]) -> None:
        for config in ("pool-off", "pool-on"):
            if config in configs:
                extra = ("--set", f"{POOL_OPTION}={'false' if config == 'pool-off' else 'true'}")
                self.proxies[config] = targets.start_rp_run(
                    self.rig.proxy_config(), self.workdir / config, extra=extra, name=config
                )
        if "haproxy" in configs:
            port = free_port()
            self.egress = start_haproxy_egress(self.up, self.rig.ca.ca_cert, port, self.workdir / "haproxy")
            config_ = self.rig.proxy_config()
            mapping = config_["proxies"][f"{MAPPING[self.kind]}/"]
            mapping["registry"] = f"http://{LOOPBACK}:{port}"
            if self.up.token_realm:  # on another server: the realm policy allows it by name only
                realm = urlsplit(self.up.token_realm)
                mapping["token_realms"] = [f"{realm.scheme}://{realm.netloc}"]
            self.proxies["haproxy"] = targets.start_rp_run(
                config_, self.workdir / "haproxy-rp", extra=("--set", f"{POOL_OPTION}=false"), name="haproxy"
            )

    def stop(self) -> None:
        for t in self.proxies.values():
            t.stop()
        self.proxies.clear()
        if self.egress is not None:
            self.egress.stop()
            self.egress = None

    def sample(self, config: str) -> dict[int, targets.ProcSample]:
        """CPU and memory of the configuration's processes (the proxy, and HAProxy for "haproxy")."""
        out = self.proxies[config].sample()
        if config == "haproxy" and self.egress is not None:
            out.update(targets.group_samples(self.egress.pid))
        return out

    def ref(self, config: str) -> str:
        name = f"{wan.WAN_NAME}:{wan.WAN_TAG}"
        if config == "direct":
            return f"{self.up.host}/{name}"
        t = self.proxies[config]
        return f"{LOOPBACK}:{t.port}/{t.local_name(name, MAPPING[self.kind])}"

    def pull(self, config: str, phase: str, index: int) -> Pull:
        t = self.proxies.get(config)
        before = self.sample(config) if t is not None else {}
        out_before = len(t.output()) if t is not None else 0
        idle = time.perf_counter() - self.last_end[config] if t is not None and config in self.last_end else None
        seconds, conns = self._pull(config)
        if t is not None:
            self.last_end[config] = time.perf_counter()
            cpu: float | None = targets.usage_between(before, self.sample(config)).cpu_s
            time.sleep(0.05)  # the last log line is written right after the answer
            blob: int | None = measure.logged_bytes(t.output()[out_before:])[0]
        else:
            cpu = blob = None
        conns = {k: conns.get(k, 0) for k in SERVERS if k in self.up.relays}
        return Pull(self.rtt_ms, self.kind, self.client, config, phase, index, seconds, conns, cpu, blob, idle)

    def _pull(self, config: str) -> tuple[float, dict[str, int]]:
        direct = config == "direct"
        ref = self.ref(config)
        creds = self.up.push_creds if direct else None
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.workdir) as tmp:
            if self.client == "skopeo":
                cert_dir = self.up.cert_dir if direct else None
                p = wan.skopeo_pull(ref, Path(tmp) / "layout", creds=creds, cert_dir=cert_dir, counter=self.up)
            elif self.client == "ctr":
                assert self.rig.containerd is not None
                hosts = self.up.ctr_hosts_dir(Path(tmp) / "hosts") if direct else None
                p = wan.ctr_pull(
                    self.rig.containerd, ref, hosts_dir=hosts, plain_http=not direct, creds=creds, counter=self.up
                )
            else:
                return self._docker_pull(ref, direct)
        p.check()
        if p.digest != self.rig.digest:
            raise RigError(f"{p.client} pulled {p.digest} from {ref}, the upstream has {self.rig.digest}")
        return p.seconds, p.connections

    def _docker_pull(self, ref: str, direct: bool) -> tuple[float, dict[str, int]]:
        d = self.rig.dockerd
        assert d is not None
        if direct and not self.logged_in and self.up.username is not None:
            d.docker_checked("login", "-u", self.up.username, "-p", self.up.password or "", self.up.host)
            self.logged_in = True
        d.clear_images()
        self.up.reset_connections()
        t0 = time.perf_counter()
        res = d.docker("pull", "-q", ref, timeout=600)
        seconds = time.perf_counter() - t0
        conns = dict(self.up.connections())
        try:
            if res.returncode != 0:
                raise RigError(f"docker pull {ref} failed\n{res.describe()}\n{d.output_tail()}")
            repo = ref.rsplit(":", 1)[0]
            if f"{repo}@{self.rig.digest}" not in d.repo_digests(ref):
                raise RigError(f"docker pulled {d.repo_digests(ref)} from {ref}, the upstream has {self.rig.digest}")
        finally:
            d.clear_images()
        return seconds, conns


def start_haproxy_egress(up: HttpsUpstream, ca_file: Path, port: int, workdir: Path) -> Proc:
    """HAProxy on loopback:`port` in front of `up`'s registry: plain HTTP in, TLS out (verified with
    `ca_file`, SNI and host name checked), idle upstream connections kept and shared by every request
    (`http-reuse always`, purged after 30 s idle like the pool's)."""
    host = urlsplit(up.url)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            global
              maxconn 1000
            defaults
              mode http
              timeout connect 10s
              timeout client 120s
              timeout server 120s
              timeout http-keep-alive 60s
              option http-keep-alive
              http-reuse always
            frontend egress
              bind {LOOPBACK}:{port}
              default_backend upstream
            backend upstream
              server up {host.hostname}:{host.port} ssl verify required ca-file {ca_file} sni str({host.hostname}) verifyhost {host.hostname} pool-purge-delay 30s
            """
        )
    )
    proc = Proc("haproxy-egress").start(["haproxy", "-db", "-f", str(cfg)], env=clean_env(), cwd=workdir)
    try:
        proc.wait_for_port(LOOPBACK, port, 20)
    except BaseException:
        proc.stop()
        raise
    return proc


def run_block(rig: WanRig, rtt_ms: int, kind: str, client: str, warm: int, order: Sequence[str]) -> list[Pull]:
    """Fresh proxies; one cold pull per configuration, then `warm` rounds, each configuration in `order`."""
    block = Block(rig, rtt_ms, kind, client, rig.workdir / f"{rtt_ms}ms-{kind}-{client}")
    pulls: list[Pull] = []
    try:
        block.start_proxies(order)
        for index in range(warm + 1):
            for config in order:
                p = block.pull(config, "cold" if index == 0 else "warm", index)
                pulls.append(p)
                print("  " + describe(p), flush=True)
    finally:
        block.stop()
    return pulls


def describe(p: Pull) -> str:
    conns = " ".join(f"{k} {v}" for k, v in p.connections.items())
    extra = ""
    if p.proxy_cpu_s is not None:
        extra = f"  proxy CPU {p.proxy_cpu_s:5.2f}s  blob MB via proxy {(p.proxy_blob_bytes or 0) / 1e6:5.1f}"
        if p.idle_s is not None:
            extra += f"  idle before {p.idle_s:4.1f}s"
    return (
        f"{p.rtt_ms:>3} ms {p.kind:<14} {p.client:<6} {p.config:<8} {p.phase} {p.index}  {p.seconds:6.2f}s  "
        f"new connections: {conns}{extra}"
    )


# --- the section -----------------------------------------------------------------------------------


def run(s: WanSettings) -> dict[str, Any]:
    """Run the WAN section; returns its part of bench.json (summary, targets, every pull, failures)."""
    t0 = time.perf_counter()
    pulls: list[Pull] = []
    failures: list[str] = []
    notes: list[str] = []
    clients_run: list[str] = []
    with started_rig(s.kinds, s.clients) as rig:
        notes += rig.notes
        clients_run = [c for c in s.clients if c != "docker" or rig.dockerd is not None]
        if "ctr" in clients_run and rig.containerd is None:
            clients_run.remove("ctr")
        n = 0
        for rtt in s.rtts_ms:
            rig.set_rtt(rtt)
            for kind in s.kinds:
                for client in clients_run:
                    k = n % len(s.configs)
                    order = s.configs[k:] + s.configs[:k]  # each block starts with another configuration
                    n += 1
                    print(f"\nW. RTT {rtt} ms, {kind}, {client}: {' '.join(order)}", flush=True)
                    try:
                        pulls += run_block(rig, rtt, kind, client, s.warm, order)
                    except (RigError, OSError, ValueError, KeyError) as e:
                        failures.append(f"WAN {rtt} ms {kind} {client}: {type(e).__name__}: {e}")
                        print(f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        rig.set_rtt(0)
        image_bytes = rig.image_bytes
    rows = summarize(pulls, s, clients_run)
    goals = check_targets(rows)
    return {
        "settings": asdict(s),
        "clients": clients_run,
        "upstreams": {k: KIND_LABEL[k] for k in s.kinds},
        "configurations": {c: CONFIG_LABEL[c] for c in s.configs},
        "image": {"name": f"{wan.WAN_NAME}:{wan.WAN_TAG}", "layers": len(wan.WAN_LAYERS), "bytes": image_bytes},
        "summary": rows,
        "targets": goals,
        "notes": notes,
        "failures": failures,
        "pulls": [asdict(p) for p in pulls],
        "seconds": time.perf_counter() - t0,
    }


# --- summary, tables, targets ------------------------------------------------------------------------


def summarize(pulls: Sequence[Pull], s: WanSettings, clients: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (RTT, kind, client, configuration): cold time, warm median/min/max, ratio, connections."""
    rows: list[dict[str, Any]] = []
    for rtt in s.rtts_ms:
        for kind in s.kinds:
            for client in clients:
                direct_med: float | None = None
                for config in CONFIGS:
                    mine = [p for p in pulls if (p.rtt_ms, p.kind, p.client, p.config) == (rtt, kind, client, config)]
                    if not mine:
                        continue
                    cold = [p for p in mine if p.phase == "cold"]
                    warm = [p for p in mine if p.phase == "warm"]
                    times = [p.seconds for p in warm]
                    med = statistics.median(times) if times else None
                    if config == "direct":
                        direct_med = med
                    servers = list(mine[0].connections)
                    rows.append(
                        {
                            "rtt_ms": rtt,
                            "kind": kind,
                            "client": client,
                            "config": config,
                            "cold_s": cold[0].seconds if cold else None,
                            "warm_s": {
                                "median": med,
                                "min": min(times) if times else None,
                                "max": max(times) if times else None,
                                "samples": times,
                            },
                            "vs_direct": med / direct_med if med is not None and direct_med else None,
                            "cold_connections": dict(cold[0].connections) if cold else {},
                            "warm_connections": {
                                k: {
                                    "mean": statistics.fmean(p.connections[k] for p in warm),
                                    "median": statistics.median(p.connections[k] for p in warm),
                                    "max": max(p.connections[k] for p in warm),
                                    "samples": [p.connections[k] for p in warm],
                                }
                                for k in servers
                                if warm
                            },
                            "warm_proxy_cpu_s": _median([p.proxy_cpu_s for p in warm]),
                            "warm_proxy_blob_mb": _median(
                                [p.proxy_blob_bytes / 1e6 if p.proxy_blob_bytes is not None else None for p in warm]
                            ),
                        }
                    )
    return rows


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if float(v).is_integer() and digits == 0 else f"{v:.{digits}f}"


def _conns(c: Mapping[str, Any], key: str | None = "mean") -> str:
    """registry/token/blobs as "r/t/b" ("-" for a server the upstream does not have)."""
    out = []
    for server in SERVERS:
        v = c.get(server)
        if v is None:
            out.append("-")
            continue
        x = v[key] if key is not None else v
        out.append(f"{round(x, 1):g}")
    return "/".join(out)


def format_tables(doc: Mapping[str, Any]) -> str:
    rows: list[dict[str, Any]] = doc["summary"]
    s = doc["settings"]
    img = doc["image"]
    lines = [
        (
            f"W. WAN pulls: {img['name']} ({img['layers']} layers, {img['bytes'] / 1e6:.1f} MB), HTTPS upstreams "
            f"behind delay relays; cold = the proxies' first pull, warm = median of {s['warm']} [min-max]; "
            "x direct = warm medians"
        ),
        "   new upstream connections per pull, registry/token/blobs (- = no such server); warm = mean;",
        "   blobs behind a 307 are fetched by the client itself, with or without the proxy",
    ]
    for rtt in s["rtts_ms"]:
        for kind in s["kinds"]:
            mine = [r for r in rows if r["rtt_ms"] == rtt and r["kind"] == kind]
            if not mine:
                continue
            lines.append("")
            lines.append(f"  RTT {rtt} ms, {kind} ({KIND_LABEL[kind]})")
            lines.append(
                f"    {'client':<7} {'configuration':<13} {'cold s':>7} {'warm s':>7} {'[min-max]':>13} {'x direct':>9} "
                f"{'conns cold':>11} {'conns warm':>11} {'proxy CPU s':>11} {'blob MB via proxy':>17}"
            )
            for r in mine:
                w = r["warm_s"]
                span = f"[{_num(w['min'])}-{_num(w['max'])}]" if w["min"] is not None else "-"
                ratio = f"{r['vs_direct']:.2f}x" if r["vs_direct"] is not None else "-"
                lines.append(
                    f"    {r['client']:<7} {r['config']:<13} {_num(r['cold_s']):>7} {_num(w['median']):>7} {span:>13} "
                    f"{ratio:>9} {_conns(r['cold_connections'], None):>11} {_conns(r['warm_connections']):>11} "
                    f"{_num(r['warm_proxy_cpu_s']):>11} {_num(r['warm_proxy_blob_mb'], 1):>17}"
                )
    return "\n".join(lines)


def check_targets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's targets for the proxy as shipped (pool-on), from the warm pulls."""
    lines: list[str] = []
    for r in rows:
        if r["config"] != "pool-on":
            continue
        where = f"RTT {r['rtt_ms']} ms {r['kind']} {r['client']}"
        warm = r["warm_connections"]
        # The blob store behind a 307 is the client's business (it follows the redirect): not counted.
        proxied = {k: v for k, v in warm.items() if not (k == "blobs" and r["kind"] == "https-redirect")}
        if proxied:
            ok = all(v["mean"] <= MAX_WARM_CONNECTIONS for v in proxied.values())
            text = ", ".join(f"{k} {round(v['mean'], 2):g} (max {v['max']})" for k, v in proxied.items())
            lines.append(
                f"  {'met ' if ok else 'MISS'}  {where}: new upstream connections per warm pull <= "
                f"{MAX_WARM_CONNECTIONS} per upstream server the proxy talks to (mean over warm pulls): {text}"
            )
        limit = MAX_RATIO[r["client"]]
        if r["vs_direct"] is not None:
            ok = r["vs_direct"] <= limit
            lines.append(
                f"  {'met ' if ok else 'MISS'}  {where}: warm pull through the proxy <= {limit:.1f}x direct: "
                f"{r['vs_direct']:.2f}x ({r['warm_s']['median']:.2f}s)"
            )
        else:
            lines.append(f"  n/a   {where}: no direct and proxied warm pulls to compare")
    return lines


def markdown_table(doc: Mapping[str, Any]) -> str:
    """The README's WAN table (warm medians, ratios, connections), one row per RTT, upstream and client."""
    rows: list[dict[str, Any]] = doc["summary"]
    by = {(r["rtt_ms"], r["kind"], r["client"], r["config"]): r for r in rows}
    out = [
        (
            "| RTT | upstream | client | direct, s | pool off, s | pool on, s | pool on, cold, s | HAProxy egress, s "
            "| new upstream connections per warm pull (registry/token/blobs): direct · pool off · pool on · HAProxy |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen: list[tuple[int, str, str]] = []
    for r in rows:
        key = (r["rtt_ms"], r["kind"], r["client"])
        if key not in seen:
            seen.append(key)

    def cell(key: tuple[int, str, str], config: str, ratio: bool = True) -> str:
        r = by.get((*key, config))
        if r is None or r["warm_s"]["median"] is None:
            return ""
        w = r["warm_s"]
        text = f"{w['median']:.2f} ({w['min']:.2f}–{w['max']:.2f})"
        if ratio and r["vs_direct"] is not None and config != "direct":
            text += f", {r['vs_direct']:.2f}×"
        return text

    def conns(key: tuple[int, str, str]) -> str:
        parts = []
        for config in CONFIGS:
            r = by.get((*key, config))
            parts.append(_conns(r["warm_connections"]) if r is not None and r["warm_connections"] else "")
        return " · ".join(parts)

    for key in seen:
        rtt, kind, client = key
        cold = by.get((*key, "pool-on"))
        cold_s = f"{cold['cold_s']:.2f}" if cold is not None and cold["cold_s"] is not None else ""
        out.append(
            f"| {rtt} ms | {kind.removeprefix('https-')} | {client} | {cell(key, 'direct')} | {cell(key, 'pool-off')} "
            f"| {cell(key, 'pool-on')} | {cold_s} | {cell(key, 'haproxy')} | {conns(key)} |"
        )
    return "\n".join(out)


def print_report(doc: Mapping[str, Any], print_fn: Callable[[str], None] = print) -> None:
    print_fn("\n" + format_tables(doc))
    print_fn("\nWAN targets (issue 'Production upstreams', pool-on, warm pulls):")
    print_fn("\n".join(doc["targets"]) or "  (no pulls)")
    for n in doc["notes"]:
        print_fn(f"  note: {n}")
    if doc["failures"]:
        print_fn("\nWAN failures:")
        for f in doc["failures"]:
            print_fn(f"  {f}")
