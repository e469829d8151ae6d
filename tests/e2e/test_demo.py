"""`./run.sh demo`: the offline demo runs end to end and leaves nothing behind.

The demo prints what it started (`(pid N)`, the ports it listens on) and its temporary directory
(`working in DIR`); after it ends, none of those may be alive, listening or present.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RUN_SH = Path(__file__).resolve().parents[2] / "run.sh"


class Demo:
    """`./run.sh demo ARGS` in its own process group, its output collected by a thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen(
            [str(RUN_SH), "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)

    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output(), re.MULTILINE)
            if m is not None:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the demo's output:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the demo did not end within {timeout}s:\n{self.output()}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """Last resort for a failed test: SIGKILL the demo's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(demo: Demo) -> None:
    out = demo.output()
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out)}
    workdir = re.search(r"working in (\S+)", out)
    assert len(set(pids)) >= 2 and ports and workdir is not None, out
    assert f"removed {workdir.group(1)}" in out
    assert not Path(workdir.group(1)).exists()
    assert [p for p in pids if _alive(p)] == [], out
    assert [p for p in ports if _listening(p)] == [], out
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.proc.pid, 0)  # nothing is left in the demo's own process group either


def test_demo_pulls_through_both_mappings_and_cleans_up() -> None:
    demo = Demo()
    try:
        rc = demo.wait(180)
    finally:
        if demo.proc.poll() is None:
            demo.kill()
    out = demo.output()
    assert rc == 0, out
    assert "served by mapping demo/ " in out
    assert re.search(r"served by mapping cap:[0-9a-f]{10} ", out), out
    assert "GET demo/hello/manifests/v1 mapping=demo/ status=200" in out
    assert re.search(r"GET <cap:[0-9a-f]{10}>/manifests/v1 mapping=cap:[0-9a-f]{10} status=200", out), out
    docker_pulls = out.count("$ docker pull")  # 2 when a docker daemon answers, else skipped
    assert docker_pulls == 2 or (docker_pulls == 0 and "docker: skipped" in out), out
    assert out.count("same digest as upstream") == 2 + docker_pulls, out
    assert "the proxy's answer: 404 NAME_UNKNOWN" in out
    assert "hello from the registryproxy demo" in out
    assert_nothing_left(demo)


def test_demo_web_serves_mitmweb_until_ctrl_c() -> None:
    demo = Demo("--web")
    try:
        url = demo.wait_for(r"^mitmweb: (http://127\.0\.0\.1:\d+/\S*)$", 180).group(1)
        demo.wait_for(r"Press Ctrl-C", 10)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as r:
            assert r.status == 200
        assert "same digest as upstream" in demo.output()
        os.killpg(demo.proc.pid, signal.SIGINT)
        rc = demo.wait(20)
    finally:
        if demo.proc.poll() is None:
            demo.kill()
    assert rc == 0, demo.output()
    assert "SIGINT: stopping" in demo.output()
    assert_nothing_left(demo)
