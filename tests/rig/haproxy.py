"""A real HAProxy (Debian's 2.6) in HTTP mode in front of proxy replicas, with its admin socket.

Round-robin per request, `option httpchk GET /readyz` with `http-check expect status 200`, a
one-second check interval, `retries` and `option redispatch 1` (a request whose server refuses the
connection is retried on another at once); `forwardfor` adds X-Forwarded-For with the client's
address. The admin socket (`command`, `stats`, `status`) says which servers HAProxy counts up or
down and how often it retried.

`start_haproxy` returns once HAProxy listens on its (free) port, its admin socket answers, and it
reports every server UP; HAProxy binds its port and creates the socket in that order, each a moment
after the other, so each is waited for.
"""

from __future__ import annotations

import csv
import socket
from dataclasses import dataclass
from pathlib import Path

from .procs import LOOPBACK, Proc, clean_env, with_free_port

HAPROXY = "/usr/sbin/haproxy"
BACKEND = "replicas"
ADMIN_TIMEOUT = 5.0


def haproxy_config(port: int, stats_socket: Path, servers: list[int], forwardfor: bool = False) -> str:
    lines = "\n".join(f"    server r{i} {LOOPBACK}:{p}" for i, p in enumerate(servers))
    # X-Forwarded-For with the client's address (test_limits_live.py trusts it from HAProxy).
    forward = "    option forwardfor\n" if forwardfor else ""
    return f"""global
    stats socket {stats_socket} mode 600 level admin
    maxconn 512

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
{forward}
frontend registry
    bind {LOOPBACK}:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1
{lines}
"""


@dataclass
class HAProxy:
    proc: Proc
    port: int
    stats_socket: Path

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket; its answer (OSError while the socket is not there)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(ADMIN_TIMEOUT)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` for the backend's servers: server name -> column -> value."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] not in ("BACKEND", "FRONTEND")}

    def redispatches(self, server: str) -> int:
        return int(self.stats()[server]["wredis"] or 0)

    def status(self) -> dict[str, str]:
        """server name -> "UP" / "DOWN" / … (the first word of the status column)."""
        return {name: row["status"].split()[0] for name, row in self.stats().items()}

    def admin_answers(self) -> bool:
        """Whether the admin socket answers `show info` (raises while it does not exist yet)."""
        return "Name: HAProxy" in self.command("show info")

    def wait_admin(self, timeout: float = 15.0) -> None:
        """Until the admin socket exists and answers; the socket's absence is "not yet", not a failure."""
        self.proc.wait_ready(self.admin_answers, timeout, f"to answer on its admin socket {self.stats_socket}")

    def wait_status(self, want: dict[str, str], timeout: float = 15.0) -> None:
        """Until HAProxy reports each server of `want` in its state; a socket not answering yet (or an
        answer cut short) is "not yet"."""
        self.proc.wait_ready(
            lambda: all(self.status().get(k) == v for k, v in want.items()),
            timeout,
            f"to report {want}",
        )

    def stop(self) -> int | None:
        return self.proc.stop()


def start_haproxy(tmp: Path, servers: list[int], forwardfor: bool = False, timeout: float = 15.0) -> HAProxy:
    """HAProxy on a free port in front of `servers` (ports on 127.0.0.1), every one of them UP."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "haproxy.sock"
    cfg = tmp / "haproxy.cfg"

    def start(port: int) -> HAProxy:
        cfg.write_text(haproxy_config(port, sock, servers, forwardfor))
        proc = Proc("haproxy").start([HAPROXY, "-db", "-f", str(cfg)], env=clean_env(), cwd=tmp)
        hp = HAProxy(proc, port, sock)
        try:
            # HAProxy exits when its port is taken ("cannot bind socket"): with_free_port tries another.
            proc.wait_for_port(LOOPBACK, port, timeout)
            hp.wait_admin(timeout)
            hp.wait_status({f"r{i}": "UP" for i in range(len(servers))}, timeout)
        except BaseException:
            proc.stop()
            raise
        return hp

    return with_free_port(start)


__all__ = ["BACKEND", "HAPROXY", "HAProxy", "haproxy_config", "start_haproxy"]
