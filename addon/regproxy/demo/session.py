"""The demo's processes and files: signals, child processes in their own groups, one temporary directory.

A `Session` owns everything the demo starts: each child runs in its own process group and is
stopped by process group id, and all files live in one temporary directory that `close()` removes.
`Guard` turns SIGINT, SIGTERM and SIGHUP into `Interrupted`, never between starting a child and
recording it, so a signal at any point still stops everything that was started. The demo's
prerequisites (Debian packages) are checked, and installed when root, here too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# Debian package -> the command the demo needs from it.
PACKAGES = {"docker-registry": "docker-registry", "skopeo": "skopeo", "apache2-utils": "htpasswd"}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(Exception):
    """A step failed; the message says which and why."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(text: str = "") -> None:
    print(text, flush=True)


# -- signals and child processes ----------------------------------------------------------------


class Guard:
    """Turns SIGINT/SIGTERM/SIGHUP into `Interrupted`, deferred while a shielded section runs
    (starting a child and recording it) and ignored once clean-up has begun."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self.closing = False

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.closing:
            return
        if self._depth:
            self._pending = self._pending or signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None and not self.closing:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _has_exited(pid: int, timeout: float) -> bool:
    """Whether `pid` exited within `timeout` s, leaving it unreaped (so its group id stays ours)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_group(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after `timeout` s, then reap the child."""
    if proc.returncode is not None:
        return  # already reaped: its pid and group id may belong to someone else by now
    _signal_group(proc.pid, signal.SIGTERM)
    if not _has_exited(proc.pid, timeout):
        _signal_group(proc.pid, signal.SIGKILL)
        _has_exited(proc.pid, timeout)
    _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


@dataclass
class Child:
    """A long-running child whose output goes to a log file in the session's directory."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return not _has_exited(self.pid, 0)

    def wait_for(self, pattern: re.Pattern[str], timeout: float, start: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the output from `start` on, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.output(), start)
            if m is not None:
                return m
            if not self.alive():
                raise DemoError(f"{self.name} exited unexpectedly; its output:\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise DemoError(f"{self.name}: no {pattern.pattern!r} within {timeout:.0f}s; output:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 20) -> str:
        return "\n".join("    " + line for line in self.output().splitlines()[-lines:])


@dataclass
class Session:
    """The demo's temporary directory and every process it started; `close()` undoes it all."""

    guard: Guard
    tmp: Path | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def open(self) -> Path:
        with self.guard.shield():
            self.tmp = Path(tempfile.mkdtemp(prefix="regproxy-demo-"))
        (self.tmp / "tmp").mkdir()
        (self.tmp / "auth.json").write_text("{}")  # clients start with no stored credentials
        return self.tmp

    @property
    def dir(self) -> Path:
        if self.tmp is None:
            raise RuntimeError("session not open")
        return self.tmp

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The children's environment: no *_proxy (all traffic is loopback), files kept in `dir`.

        REGISTRY_* variables are left out: docker-registry reads them as configuration."""
        env = {
            k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("REGISTRY_")
        }
        env.pop("AWS_CA_BUNDLE", None)  # docker-registry's s3 driver panics on it
        env.update(TMPDIR=str(self.dir / "tmp"), PYTHONUNBUFFERED="1")
        env.update(extra or {})
        return env

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        """Start a long-running child in its own process group, its output to NAME.log."""
        log = self.dir / f"{name}.log"
        with self.guard.shield(), log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.dir,
                start_new_session=True,
            )
            self.procs.append(proc)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        stop_group(child.proc)
        self.procs.remove(child.proc)
        self.children.remove(child)

    def run(
        self, argv: Sequence[str], timeout: float, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in its own process group, bounded by `timeout` s."""
        with self.guard.shield():
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.env({"REGISTRY_AUTH_FILE": str(self.dir / "auth.json"), **(env or {})}),
                cwd=self.dir,
                start_new_session=True,
            )
            self.procs.append(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(f"`{' '.join(argv[:2])}` did not finish within {timeout:.0f}s") from None
        finally:
            stop_group(proc, timeout=2)
            self.procs.remove(proc)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def check(self, argv: Sequence[str], timeout: float, stdin: str | None = None) -> str:
        """`run`, raising DemoError with the command's output unless it exits 0; returns stdout."""
        res = self.run(argv, timeout, stdin)
        if res.returncode != 0:
            raise DemoError(f"`{' '.join(argv[:2])}` failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
        return res.stdout

    def close(self) -> list[str]:
        """Stop every process (newest first) and remove the directory; returns what was stopped."""
        self.guard.closing = True
        stopped = [f"{c.name} (pid {c.pid})" for c in reversed(self.children)]
        for proc in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()
        self.children.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return stopped


# -- prerequisites ------------------------------------------------------------------------------


def missing_packages() -> list[str]:
    return [pkg for pkg, command in PACKAGES.items() if shutil.which(command) is None]


def ensure_packages(guard: Guard) -> None:
    """Install the missing Debian packages when root; otherwise say how and exit 1.

    apt-get stays in the demo's process group, so Ctrl-C reaches it and it stops itself cleanly;
    the demo's own reaction to the signal waits until apt-get has ended."""
    missing = missing_packages()
    if not missing:
        return
    names = " ".join(missing)
    if os.geteuid() != 0:
        say(f"The demo needs these Debian packages: {names}. Install them with:")
        say(f"  sudo apt-get install -y --no-install-recommends {names}")
        raise SystemExit(1)
    say(f"Installing the Debian packages the demo needs: {names} (apt-get install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        try:
            with guard.shield():
                res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise DemoError(f"`{' '.join(argv[:2])}` did not finish within 900s") from None
        if res.returncode != 0:
            raise DemoError(f"`{' '.join(argv)}` failed ({res.returncode}):\n{res.stderr or res.stdout}")
    if missing_packages():
        raise DemoError(f"still missing after apt-get install: {' '.join(missing_packages())}")
