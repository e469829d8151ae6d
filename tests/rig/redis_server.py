"""A real Redis (Debian's `redis-server`) for the limits tests: on a free port, bound to 127.0.0.1,
nothing written to disk, stopped by pid."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .procs import LOOPBACK, Proc, RigError, clean_env, run, with_free_port

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"


def available() -> bool:
    return shutil.which(REDIS_SERVER) is not None


@dataclass
class RedisServer:
    proc: Proc
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def cli(self, *args: str) -> str:
        res = run([REDIS_CLI, "-h", LOOPBACK, "-p", str(self.port), *args], timeout=10)
        if res.returncode != 0:
            raise RigError(f"redis-cli failed\n{res.describe()}")
        return res.stdout.strip()

    def flush(self) -> None:
        self.cli("FLUSHALL")

    def running(self) -> bool:
        return self.proc.running()

    def stop(self) -> int | None:
        return self.proc.stop()


def start_redis(workdir: Path, port: int | None = None, timeout: float = 15.0) -> RedisServer:
    """Start redis-server (no persistence) on `port`, or on a free one (another when something took it
    before redis bound it); wait until it answers PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    if port is None:
        return with_free_port(lambda p: _start(workdir, p, timeout))
    return _start(workdir, port, timeout)


def _start(workdir: Path, port: int, timeout: float) -> RedisServer:
    argv = [
        REDIS_SERVER,
        "--bind", LOOPBACK,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--protected-mode", "yes",
    ]  # fmt: skip
    proc = Proc("redis-server").start(argv, env=clean_env(), cwd=workdir)
    server = RedisServer(proc, port, workdir)
    try:
        # redis-server exits at once, saying "Address already in use", when the port is taken.
        proc.wait_for_output(r"Ready to accept connections", timeout)
        proc.wait_ready(lambda: server.cli("PING") == "PONG", timeout, f"to answer PING on {LOOPBACK}:{port}")
    except BaseException:
        proc.stop()
        raise
    return server
