"""A small HTTP/1.1 load generator for the benchmark (stdlib only, run as its own process).

Why not wrk or ab: wrk 4.1 (Debian) never completes a HEAD response that carries a Content-Length (it
waits for a body that never comes), and ab speaks HTTP/1.0, whose keep-alive mitmproxy does not honour
(it closes after each answer and ab aborts). This one keeps every connection alive, understands HEAD,
and reports its own CPU time so that its cost stays visible (the benchmark also runs it against the
registry directly).

    python loadgen.py --port P --path /v2/... [--method HEAD] [--header 'K: V']... \
        [--connections 16] [--count N] [--duration S] [--warmup N]

Prints one JSON object: requests, statuses, elapsed_s, rps, p50_ms, p90_ms, p99_ms, mean_ms, cpu_s,
reconnects, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class Run:
    """Shared state of one run: when to stop, and what was measured."""

    def __init__(self, count: int | None, duration: float | None, warmup: int) -> None:
        self.count = count
        self.duration = duration
        self.warmup = warmup
        self.issued = 0
        self.completed = 0
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.reconnects = 0
        self.started: float | None = None  # after the warm-up
        self.deadline: float | None = None
        self.finished_at: float | None = None
        self.done = asyncio.Event()
        self.open_connections = 0

    def may_issue(self) -> bool:
        if self.errors:
            return False
        if self.count is not None and self.issued >= self.count + self.warmup:
            return False
        return self.deadline is None or time.perf_counter() < self.deadline

    def record(self, status: int, latency: float) -> None:
        self.completed += 1
        now = time.perf_counter()
        if self.completed <= self.warmup:
            if self.completed == self.warmup:
                self.start_clock(now)
            return
        if self.started is None:
            self.start_clock(now)
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.finished_at = now

    def start_clock(self, now: float) -> None:
        self.started = now
        if self.duration is not None:
            self.deadline = now + self.duration


class Conn(asyncio.Protocol):
    def __init__(self, run: Run, request: bytes, head: bool) -> None:
        self.run = run
        self.request = request
        self.head = head
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.waiting = False
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.run.open_connections += 1
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        if not self.run.may_issue():
            self.transport.close()
            return
        self.run.issued += 1
        self.waiting = True
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.waiting:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self.fail(f"bad status line {lines[0]!r}")
                return
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding":
                    self.fail("chunked answers are not supported by this load generator")
                    return
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if self.head or status in (204, 304) or 100 <= status < 200:
                length = 0
            total = end + 4 + length
            if len(self.buf) < total:
                return
            del self.buf[:total]
            self.waiting = False
            self.run.record(status, time.perf_counter() - self.sent_at)
            if close:
                assert self.transport is not None
                self.transport.close()
                return
            self.send_next()

    def fail(self, why: str) -> None:
        self.run.errors.append(why)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.open_connections -= 1
        if self.waiting:
            # The server closed while we waited: count it, retry on a new connection.
            self.run.issued -= 1
            self.run.reconnects += 1
        self.closed.set()


async def drive_connection(run: Run, host: str, port: int, request: bytes, head: bool) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, proto = await loop.create_connection(lambda: Conn(run, request, head), host, port)
        except OSError as e:
            run.errors.append(f"connect: {e}")
            return
        await proto.closed.wait()
        if not run.may_issue() or run.reconnects > 1000:
            return


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    head = args.method == "HEAD"
    lines = [f"{args.method} {args.path} HTTP/1.1", f"Host: {args.host_header or f'{args.host}:{args.port}'}"]
    lines += args.header
    lines += ["User-Agent: registryproxy-bench-loadgen", "", ""]
    request = "\r\n".join(lines).encode("latin-1")
    run = Run(args.count, args.duration, args.warmup)
    cpu0 = os.times()
    t0 = time.perf_counter()
    if args.warmup == 0:
        run.start_clock(t0)
    tasks = [
        asyncio.create_task(drive_connection(run, args.host, args.port, request, head)) for _ in range(args.connections)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
    except TimeoutError:
        run.errors.append(f"timed out after {args.timeout}s")
    cpu1 = os.times()
    end = run.finished_at or time.perf_counter()
    start = run.started or t0
    elapsed = max(end - start, 1e-9)
    lat = sorted(x * 1000 for x in run.latencies)
    n = len(lat)
    return {
        "requests": n,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "elapsed_s": elapsed,
        "rps": n / elapsed if n else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / n if n else 0.0,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "reconnects": run.reconnects,
        "errors": run.errors[:5],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default=None)
    p.add_argument("--path", required=True)
    p.add_argument("--method", default="GET", choices=["GET", "HEAD"])
    p.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--count", type=int, default=None, help="stop after this many measured requests")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds of measuring")
    p.add_argument("--warmup", type=int, default=0, help="requests answered before measuring starts")
    p.add_argument("--timeout", type=float, default=120.0, help="hard bound on the whole run")
    args = p.parse_args()
    if args.count is None and args.duration is None:
        p.error("give --count or --duration (or both)")
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
