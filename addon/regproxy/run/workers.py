"""`./run.sh --workers N`: N proxy processes behind HAProxy on one machine.

One mitmproxy process uses one core. With N workers, HAProxy listens on the configured
address and balances client connections round-robin (TCP mode, so TLS detection and the
client's Host stay with the workers) over N workers on loopback ports, health-checked with
`GET /readyz` (200 once a worker has a valid configuration loaded). The workers share one
secret key, so a token issued by one is accepted by all; without a configured key one is
generated for the whole group, which then still survives no restart.

The workers also share one `PROMETHEUS_MULTIPROC_DIR` (a temporary directory made before they
start and removed at exit), so `/metrics` through any worker reports the whole group. Each
worker answers `/healthz`, `/readyz` and `/metrics` on its own port; a separate operations
listener (`registryproxy_ops_listen`) cannot be shared by N processes and is refused here.

The supervisor stops everything it started when it is signalled or when any child exits.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import SECRET_KEY_ENV, Config
from ..ops.listener import LISTEN_OPTION
from ..ops.metrics import MULTIPROC_ENV, reset_multiprocess_dir
from .launch import free_port, mitm_args

WORKER_TIMEOUT = 30.0
HEALTH_PATH = "/readyz"


def haproxy_config(listen_addr: str, port: int, worker_ports: Sequence[int]) -> str:
    bind = f"[{listen_addr}]:{port}" if ":" in listen_addr else f"{listen_addr}:{port}"
    servers = "\n".join(
        f"    server w{i} 127.0.0.1:{p} check inter 2s fall 2 rise 1" for i, p in enumerate(worker_ports)
    )
    return f"""global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    option redispatch 1
    retries 2

frontend registryproxy
    bind {bind}
    default_backend workers

backend workers
    balance roundrobin
    option httpchk GET {HEALTH_PATH}
    http-check expect status 200
{servers}
"""


def sets_option(args: Sequence[str], name: str) -> bool:
    """Whether mitmproxy arguments set option `name` (`--set NAME=V` or `--set=NAME=V`)."""
    values = [v for flag, v in itertools.pairwise(args) if flag == "--set"]
    values += [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    return any(v.partition("=")[0] == name for v in values)


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WORKER_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {WORKER_TIMEOUT:.0f}s")


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_workers(
    n: int, config: Config, config_path: str, worker_argv: list[str], extra: list[str], script: bool
) -> int:
    """Start `n` workers (`worker_argv` + mitm args per port) and HAProxy; supervise until stopped."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        print(
            "registryproxy: --workers needs HAProxy: apt-get install haproxy",
            file=sys.stderr,
        )
        return 1
    if sets_option(extra, LISTEN_OPTION):
        print(
            f"registryproxy: --workers: {LISTEN_OPTION} is not supported (N workers cannot share one ops "
            "address); each worker answers /healthz, /readyz and /metrics on the proxy port",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    if config.generated_key and not env.get(SECRET_KEY_ENV):
        # One key for the whole group, so a token from one worker is accepted by all.
        env[SECRET_KEY_ENV] = config.secretkeys[0].hex()
        print(
            "registryproxy: no secret key configured: using a random one for this process group; tokens will "
            "not survive a restart (set secretkey or $REGISTRYPROXY_SECRETKEY)",
            file=sys.stderr,
            flush=True,
        )
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="registryproxy-workers-") as tmp:
        try:
            # One metrics directory for the group: /metrics through any worker reports all of them.
            metrics_dir = Path(tmp) / "metrics"
            reset_multiprocess_dir(str(metrics_dir))
            env[MULTIPROC_ENV] = str(metrics_dir)
            ports = [free_port() for _ in range(n)]
            for i, port in enumerate(ports):
                argv = [*worker_argv, *mitm_args(config_path, "127.0.0.1", port, script=script), *extra]
                procs.append(subprocess.Popen(argv, env=env))
                _wait_port(port, procs[-1], f"worker {i}")
            cfg = Path(tmp) / "haproxy.cfg"
            cfg.write_text(haproxy_config(config.listen_addr, config.port, ports))
            procs.append(subprocess.Popen([haproxy, "-W", "-db", "-f", str(cfg)]))
            print(
                f"registryproxy: {n} workers on 127.0.0.1:{','.join(map(str, ports))} behind HAProxy at "
                f"{config.listen_addr}:{config.port}",
                flush=True,
            )
            while not stopping:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    print(f"registryproxy: a process exited (code {dead[0].returncode}); stopping", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            return 0
        except RuntimeError as e:
            print(f"registryproxy: {e}", file=sys.stderr)
            return 1
        finally:
            _stop(procs)
