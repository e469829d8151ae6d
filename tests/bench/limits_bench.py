"""The cost of the limits per request: `./run.sh bench --limits` (or `python tests/bench/limits_bench.py`).

Three proxies (mitmdump with the addon) in front of one small
in-process upstream that answers every manifest GET with the same 500-byte manifest: limits off, limits
in memory, and limits in a real Redis (Debian's redis-server on a free loopback port). The limits are set
high enough never to refuse (a client bucket, the mapping's manifest window, a client byte budget), so
every request pays the full check. One keep-alive client sends N manifest GETs to each in turn, for a few
rounds; reported: the median latency per request and the proxy's CPU per request (utime + stime of its
process over the run), and the difference with limits off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "addon")]

from rig import proxy
from rig.httpserver import HandlerServer
from rig.procs import LOOPBACK
from rig.redis_server import start_redis

MANIFEST = json.dumps({"schemaVersion": 2, "pad": "x" * 440}).encode()
HIGH = {"client_requests": "100000000/1s", "manifest_gets": "100000000/1h", "client_bytes": "1TiB/1h"}


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:
        if self.path == "/v2/":
            body = b"{}"
        else:
            body = MANIFEST
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", "sha256:" + "0" * 64)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(p: proxy.ProxyProc, n: int) -> tuple[float, float]:
    """(median ms per request, proxy CPU ms per request) for n manifest GETs on one connection."""
    r = httpx.get(f"{p.url}/token", params={"scope": "repository:b/app:pull"}, timeout=30)
    r.raise_for_status()
    headers = {"Authorization": f"Bearer {r.json()['token']}", "Accept": "application/vnd.oci.image.manifest.v1+json"}
    times: list[float] = []
    with httpx.Client(timeout=30) as c:
        for _ in range(20):  # warm up
            c.get(f"{p.url}/v2/b/app/manifests/v1", headers=headers).raise_for_status()
        cpu0 = cpu_seconds(p.proc.pid)
        for _ in range(n):
            t = time.perf_counter()
            resp = c.get(f"{p.url}/v2/b/app/manifests/v1", headers=headers)
            times.append((time.perf_counter() - t) * 1000)
            if resp.status_code != 200:
                raise RuntimeError(f"unexpected {resp.status_code}: {resp.text[:200]}")
        cpu = cpu_seconds(p.proc.pid) - cpu0
    return statistics.median(times), cpu * 1000 / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run.sh bench --limits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="manifest GETs per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="300 requests, 1 round")
    args = ap.parse_args(argv)
    n, rounds = (300, 1) if args.quick else (args.requests, args.rounds)
    upstream = HandlerServer("limits-bench-upstream", Upstream).start()
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="limits-bench-") as tmp:
        try:
            redis = start_redis(Path(tmp) / "redis")
            started.append(redis)
            base = {
                "secretkey": "7a" * 32,
                "proxies": {"b/": {"registry": f"http://{LOOPBACK}:{upstream.port}", "remote": "x"}},
            }
            configs = {
                "off": base,
                "memory": {**base, "limits": HIGH},
                "redis": {**base, "limits": HIGH, "redis_url": redis.url},
            }
            proxies = {}
            for name, cfg in configs.items():
                proxies[name] = proxy.start_proxy(cfg, Path(tmp) / name)
                started.append(proxies[name])
            results: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
            for _ in range(rounds):
                for name, p in proxies.items():
                    results[name].append(run_one(p, n))
                    print(
                        f"  {name}: {results[name][-1][0]:.3f} ms median, {results[name][-1][1]:.3f} ms CPU", flush=True
                    )
            print(f"limits cost per request ({n} manifest GETs x {rounds} rounds, one keep-alive client):")
            off_lat = statistics.median(r[0] for r in results["off"])
            off_cpu = statistics.median(r[1] for r in results["off"])
            for name, rs in results.items():
                lat = statistics.median(r[0] for r in rs)
                cpu = statistics.median(r[1] for r in rs)
                print(
                    f"  {name:<7} median {lat:6.3f} ms ({lat - off_lat:+.3f})   proxy CPU {cpu:6.3f} ms/request "
                    f"({cpu - off_cpu:+.3f})"
                )
        finally:
            for s in reversed(started):
                s.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
