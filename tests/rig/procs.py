"""Subprocesses, bounded commands and waiting, for the end-to-end rig (in-process servers: httpserver.py).

Every subprocess runs in its own session (process group) and is stopped through that group
by pid, never by name. Every wait is bounded and fails with the captured output.

Waiting: `wait_until(predicate, ...)` polls until the predicate is true. Whatever the predicate
raises counts as "not there yet" (a refused connection, a socket file not created yet, partial
output that does not parse, a command that timed out), except `StopWaiting`, which a predicate
raises when what it waits for can no longer happen (its process exited). `Proc.wait_ready` is
wait_until that stops at once when the process exits. Ports: `with_free_port(start)` runs
`start(port)` again on another port when something took the one picked before it was bound.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

LOOPBACK = "127.0.0.1"
ADDRESS_IN_USE = "address already in use"  # EADDRINUSE as every program here reports it (any case)
T = TypeVar("T")


class RigError(RuntimeError):
    """A rig component failed to start or did not reach the expected state in time."""


class StopWaiting(RigError):
    """Raised by a wait's predicate when what it waits for can no longer happen (e.g. the process exited)."""


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


def with_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """`start(port)` on a port that is free right now. Only what `start` runs binds it, so something
    else may take it first: when `start` raises a RigError that says the address is in use (its message
    carries the process's output), `start` runs again on another port. `start` stops what it started
    before it raises."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        try:
            return start(port)
        except RigError as e:
            if attempt == attempts or ADDRESS_IN_USE not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until it is true; raise RigError (with `details()`) after `timeout` s.

    An exception from `predicate` means "not yet": polling goes on, and the last one is named in the
    timeout's message (and chained to it). A `StopWaiting` from it ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    polls = 0
    while True:
        polls += 1
        try:
            if predicate():
                return
        except StopWaiting:
            raise
        except Exception as e:  # noqa: BLE001 - "not there yet"; reported if it lasts
            last = e
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.1f}s ({polls} checks) waiting for {what}"
            if last is not None:
                message += f"\nlast error from the check: {type(last).__name__}: {last}"
            extra = _safe_details(details)
            raise RigError(message + (f"\n{extra}" if extra else "")) from last
        time.sleep(interval)


def wait_quiet(size: Callable[[], int], quiet: float, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Wait until `size()` (how long a growing log is) has not changed for `quiet` s; True then, False
    when it still grew after `timeout` s (not an error: some logs never stop). What a fixed sleep did
    for "lines that may still come", except that it waits for as long as they still come."""
    deadline = time.monotonic() + timeout
    last, since = size(), time.monotonic()
    while True:
        time.sleep(interval)
        now_size, now = size(), time.monotonic()
        if now_size != last:
            last, since = now_size, now
        elif now - since >= quiet:
            return True
        if now >= deadline:
            return False


def _safe_details(details: Callable[[], str]) -> str:
    """`details()`, or why it could not be had: a timeout's message must not be lost to it."""
    try:
        return details()
    except Exception as e:  # noqa: BLE001 - the details are a courtesy
        return f"(no details: {type(e).__name__}: {e})"


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
    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
        """`wait_until(check)` for "NAME WHAT", ended at once (StopWaiting, with the output) when the
        process exits first. `check` may raise while the process is not ready (see wait_until)."""

        def ready() -> bool:
            if self._popen is None:
                raise StopWaiting(f"{self.name}: not started")
            if self._popen.poll() is not None:
                raise StopWaiting(f"{self.name} exited (waiting for it {what})\n{self.describe()}")
            return check()

        wait_until(ready, timeout, f"{self.name} {what}", self.describe, interval)

    def wait_quiet(self, quiet: float = 0.2, timeout: float = 10.0) -> bool:
        """Until the output has not grown for `quiet` s (see the module's wait_quiet)."""
        return wait_quiet(lambda: len(self.output()), quiet, timeout)

    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        self.wait_ready(lambda: port_open(host, port), timeout, f"to listen on {host}:{port}", interval=0.02)

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
