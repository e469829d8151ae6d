"""Subprocesses and in-process servers for the end-to-end rig.

Every subprocess runs in its own session (process group) and is stopped through that group
by pid, never by name. Every wait is bounded and fails with the captured output.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


class RigError(RuntimeError):
    """A rig component failed to start or did not reach the expected state in time."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until it is true; raise RigError (with `details()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            extra = details()
            raise RigError(f"timed out after {timeout:.1f}s waiting for {what}" + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


class Proc:
    """A subprocess in its own session whose stdout+stderr are drained into memory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._popen: subprocess.Popen[bytes] | None = None
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reader: threading.Thread | None = None
        self.argv: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------
    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Proc:
        if self._popen is not None:
            raise RigError(f"{self.name}: already started")
        self.argv = [str(a) for a in argv]
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _drain(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        stream = self._popen.stdout
        while True:
            data = os.read(stream.fileno(), 65536)
            if not data:
                break
            with self._changed:
                self._chunks.append(data.decode("utf-8", errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RigError(f"{self.name}: not started")
        return self._popen.pid

    def returncode(self) -> int | None:
        """None while running, else the exit status."""
        return None if self._popen is None else self._popen.poll()

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        with self._lock:
            return "".join(self._chunks)

    def describe(self) -> str:
        rc = self.returncode()
        state = "running" if rc is None else f"exited with {rc}"
        return f"--- {self.name} ({state}): {' '.join(self.argv)}\n--- output:\n{self.output()}"

    # -- waiting ------------------------------------------------------------------------------
    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self._popen is not None and self._popen.poll() is not None:
                raise RigError(f"{self.name} exited before listening on {host}:{port}\n{self.describe()}")
            return port_open(host, port)

        wait_until(ready, timeout, f"{self.name} to listen on {host}:{port}", self.describe)

    def wait_for_output(self, regex: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """Wait until the output matches `regex` (searched over the whole output, MULTILINE)."""
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                m = pattern.search("".join(self._chunks))
                if m:
                    return m
                exited = self._popen is not None and self._popen.poll() is not None
                reader_done = self._reader is None or not self._reader.is_alive()
                if exited and reader_done:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
        why = "exited" if self.returncode() is not None else f"timed out after {timeout:.1f}s"
        raise RigError(f"{self.name} {why} before its output matched {pattern.pattern!r}\n{self.describe()}")

    # -- stopping -----------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout` s; returns the exit status.

        The leader is not reaped until the whole group got its SIGKILL, so its pid (= the
        process group id) cannot have been reused by then.
        """
        p = self._popen
        if p is None:
            return None
        if p.returncode is None:
            _signal_group(p.pid, signal.SIGTERM)
            if not _wait_exit_noreap(p.pid, timeout):
                _signal_group(p.pid, signal.SIGKILL)
                _wait_exit_noreap(p.pid, timeout)
            # Children that outlived the leader still belong to the group.
            _signal_group(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise RigError(f"{self.name} (pid {p.pid}) did not die\n{self.describe()}") from e
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        if p.stdout is not None:
            p.stdout.close()
        return p.returncode


def _wait_exit_noreap(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (left as a zombie, not reaped), False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


TLS_HANDSHAKE_TIMEOUT = 30.0


class TLSThreadingHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that speaks TLS: each connection's handshake runs on its own handler
    thread (never on the accepting one), bounded by TLS_HANDSHAKE_TIMEOUT."""

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        self.tls_context = context
        super().__init__(server_address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            # wrap_socket detaches `request` (shutdown_request then finds it closed) and closes
            # the connection itself when the handshake fails.
            conn = self.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return
        try:
            conn.settimeout(None)
            super().finish_request(conn, client_address)
        except OSError:
            pass
        finally:
            conn.close()


def http_server(
    host: str, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer on (host, a kernel-chosen port), speaking TLS with `tls` when given."""
    if tls is not None:
        return TLSThreadingHTTPServer((host, 0), handler, tls)
    return ThreadingHTTPServer((host, 0), handler)


class ServerThread:
    """Runs a ThreadingHTTPServer on a daemon thread; `stop()` shuts it down and closes it."""

    def __init__(self, server: ThreadingHTTPServer, name: str) -> None:
        self.server = server
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name)
        self._thread.daemon = True
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


class RunResult:
    """What a bounded one-shot command did."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit status {self.returncode}\n"
            f"--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"
        )


def clean_env(env_extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without *_proxy variables (loopback only here), plus `env_extra`."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(env_extra or {})
    return env


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env_extra: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> RunResult:
    """Run a command in its own session; on timeout SIGKILL its group and raise RigError."""
    p = subprocess.Popen(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(env_extra),
        cwd=str(cwd) if cwd is not None else None,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        res = RunResult(argv, -9, out.decode(errors="replace"), err.decode(errors="replace"))
        raise RigError(f"timed out after {timeout:.1f}s\n{res.describe()}") from None
    return RunResult(argv, p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def run_checked(
    argv: Sequence[str],
    *,
    timeout: float,
    env_extra: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> RunResult:
    """run(), raising RigError with the command's output unless it exits 0."""
    res = run(argv, timeout=timeout, env_extra=env_extra, cwd=cwd)
    if res.returncode != 0:
        raise RigError(f"command failed\n{res.describe()}")
    return res
