"""The configurations the benchmark compares, each started fresh and stopped by its process group.

- direct: the registry's own port (no proxy);
- nginx / nginx-256k: `proxy_pass` to the registry, `proxy_buffering off` (defaults, or
  `proxy_buffer_size 256k`), one worker process, keep-alive to the upstream;
- mitmdump: stock mitmdump in reverse mode to the registry, no addon;
- rp-s: registryproxy under stock `mitmdump -s addon/registryproxy.py` (rig.proxy.start_proxy);
- rp-run: registryproxy as `./run.sh` starts it (`python -m regproxy.run.cli run --`, whatever that execs);
- rp-workers2: `./run.sh --workers 2` (HAProxy in front of two workers), once that option exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from rig import proxy as rig_proxy
from rig.procs import LOOPBACK, Proc, clean_env, free_port

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "6b" * 16 + "e1" * 16
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Short names, in table order, with what each one is.
DESCRIPTIONS = {
    "direct": "the registry's own port, no proxy",
    "nginx": "nginx proxy_pass, proxy_buffering off, defaults, 1 worker",
    "nginx-256k": "the same with proxy_buffer_size 256k (proxy_buffers 4 256k)",
    "mitmdump": "stock mitmdump --mode reverse, no addon",
    "rp-s": "registryproxy under stock mitmdump -s addon/registryproxy.py",
    "rp-run": "registryproxy as ./run.sh starts it (python -m regproxy.run.cli run)",
    "rp-workers2": "./run.sh --workers 2 (HAProxy + 2 workers)",
}
REGISTRYPROXY = ("rp-s", "rp-run", "rp-workers2")


# --- process statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    pid: int
    comm: str
    cpu_s: float  # utime + stime
    hwm_kb: int  # VmHWM: peak resident set


def _read_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, process group, CPU seconds) of `pid`, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    comm = raw[lpar + 1 : rpar]
    rest = raw[rpar + 2 :].split()
    # rest[0] = state (field 3), rest[2] = pgrp (5), rest[11] = utime (14), rest[12] = stime (15)
    return comm, int(rest[2]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_kb(pgid: int) -> int:
    """The resident set of process group `pgid` now (VmRSS summed over its live processes)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _read_stat(int(entry.name))
            if st is not None and st[1] == pgid:
                total += _rss_kb(int(entry.name))
    return total


class RssWatch:
    """Samples a process group's resident set every `interval` s in a thread while in the `with` block:
    `before_mb` (at entry), `max_mb` (the largest sample) and `growth_mb` (max - before): whether memory
    stays flat while something streams through."""

    def __init__(self, pgid: int | None, interval: float = 0.02) -> None:
        self.pgid = pgid
        self.interval = interval
        self.before_kb = 0
        self.max_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.pgid is not None:
            self.before_kb = self.max_kb = group_rss_kb(self.pgid)
            self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self.pgid is not None
        while not self._stop.wait(self.interval):
            self.max_kb = max(self.max_kb, group_rss_kb(self.pgid))
            self.samples += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self.max_kb = max(self.max_kb, group_rss_kb(self.pgid)) if self.pgid is not None else 0

    @property
    def before_mb(self) -> float:
        return self.before_kb / 1024

    @property
    def max_mb(self) -> float:
        return self.max_kb / 1024

    @property
    def growth_mb(self) -> float:
        return (self.max_kb - self.before_kb) / 1024


def group_samples(pgid: int) -> dict[int, ProcSample]:
    """Every live process of process group `pgid`."""
    out: dict[int, ProcSample] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = _read_stat(pid)
        if st is None or st[1] != pgid:
            continue
        out[pid] = ProcSample(pid, st[0], st[2], _hwm_kb(pid))
    return out


@dataclass(frozen=True)
class Usage:
    """What a process group used between two samples."""

    cpu_s: float
    peak_rss_max_mb: float  # the largest VmHWM of one process in the group
    peak_rss_sum_mb: float  # VmHWM summed over the group (workers)
    processes: int


def usage_between(before: Mapping[int, ProcSample], after: Mapping[int, ProcSample]) -> Usage:
    cpu = sum(s.cpu_s - (before[p].cpu_s if p in before else 0.0) for p, s in after.items())
    hwm = [s.hwm_kb for s in after.values()] or [0]
    return Usage(cpu, max(hwm) / 1024, sum(hwm) / 1024, len(after))


# --- configurations ----------------------------------------------------------------------------


@dataclass
class Target:
    """One running configuration: where to send requests, how to name things, how to stop it."""

    name: str
    port: int
    pgid: int | None  # the process group to measure (None: nothing of its own)
    registryproxy: bool
    proc: Proc | None = None
    stop_fn: Callable[[], object] | None = None
    output_fn: Callable[[], str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def local_name(self, upstream_name: str, mapping: str = "anon") -> str:
        """The repository name a client uses here for `upstream_name` (platform/X) of a mapping."""
        if not self.registryproxy:
            return upstream_name
        return f"{mapping}/" + upstream_name.removeprefix("platform/")

    def token(self, *names: str, timeout: float = 30.0) -> str | None:
        """A pull token from the proxy's token endpoint for `names` (None for non-registryproxy)."""
        if not self.registryproxy:
            return None
        params: list[tuple[str, str | int | float | bool | None]] = [("service", f"{LOOPBACK}:{self.port}")]
        params += [("scope", f"repository:{n}:pull") for n in names]
        r = httpx.get(
            f"{self.url}/token",
            params=params,
            timeout=timeout,
            trust_env=False,
        )
        r.raise_for_status()
        tok: str = r.json()["token"]
        return tok

    def sample(self) -> dict[int, ProcSample]:
        return group_samples(self.pgid) if self.pgid is not None else {}

    def output(self) -> str:
        return self.output_fn() if self.output_fn is not None else ""

    def stop(self) -> None:
        if self.stop_fn is not None:
            self.stop_fn()
            self.stop_fn = None


def registryproxy_config(mappings: Mapping[str, str], creds: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """A registryproxy config: namespace `KEY/` -> upstream URL's `platform/`, with credentials where given."""
    proxies: dict[str, Any] = {}
    for key, url in mappings.items():
        m: dict[str, Any] = {"registry": url, "remote": "platform"}
        if key in creds:
            m["username"], m["password"] = creds[key]
        proxies[f"{key}/"] = m
    return {"secretkey": SECRET_KEY, "proxies": proxies}


def workers_available() -> bool:
    """Whether `./run.sh --workers N` exists (the run command's --help mentions it)."""
    try:
        r = subprocess.run(
            [sys.executable, "-m", "regproxy.run.cli", "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env({"PYTHONPATH": str(REPO / "addon")}),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in r.stdout + r.stderr


def _wait_registryproxy(url: str, proc: Proc, timeout: float, consecutive: int = 4) -> None:
    """Until GET /v2/ answers the proxy's own 401 `consecutive` times in a row (every worker is up)."""
    ok = 0

    def ready() -> bool:
        nonlocal ok
        try:
            r = httpx.get(f"{url}/v2/", timeout=2, trust_env=False)
            good = r.status_code == 401 and "docker-distribution-api-version" in r.headers
        except httpx.HTTPError:
            good = False
        ok = ok + 1 if good else 0
        return ok >= consecutive

    proc.wait_ready(ready, timeout, "to answer /v2/", interval=0.05)


def start_direct(registry_port: int, registry_pgid: int) -> Target:
    return Target("direct", registry_port, registry_pgid, registryproxy=False)


def start_nginx(name: str, registry_port: int, workdir: Path, *, buffer_256k: bool, timeout: float = 20.0) -> Target:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    # proxy_busy_buffers_size must cover proxy_buffer_size and stay below all proxy_buffers but one: nginx
    # refuses to start otherwise (with proxy_buffering off only proxy_buffer_size is used).
    buffers = (
        "      proxy_buffer_size 256k;\n      proxy_buffers 4 256k;\n      proxy_busy_buffers_size 256k;\n"
        if buffer_256k
        else ""
    )
    temp = "".join(
        f"  {kind}_temp_path {workdir / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "  access_log off;\n"
        f"{temp}"
        f"  upstream registry {{ server {LOOPBACK}:{registry_port}; keepalive 32; }}\n"
        "  server {\n"
        f"    listen {LOOPBACK}:{port};\n"
        "    location / {\n"
        "      proxy_pass http://registry;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        "      proxy_set_header Host $http_host;\n"
        "      proxy_buffering off;\n"
        f"{buffers}"
        "    }\n"
        "  }\n"
        "}\n"
    )
    argv = ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    proc = Proc(name).start(argv, env=clean_env(), cwd=workdir)
    try:
        proc.wait_for_port(LOOPBACK, port, timeout)
    except BaseException:
        proc.stop()
        raise
    return Target(
        name,
        port,
        proc.pid,
        registryproxy=False,
        proc=proc,
        stop_fn=proc.stop,
        output_fn=proc.output,
        info={"config": conf.read_text()},
    )


def start_mitmdump(name: str, registry_port: int, workdir: Path, extra: tuple[str, ...] = ()) -> Target:
    """Stock mitmdump in reverse mode to the registry (plus `extra` arguments, e.g. `-s SCRIPT`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mitmproxy-conf"
    conf.mkdir(exist_ok=True)
    argv = [
        str(rig_proxy.mitmdump_binary()),
        "--mode",
        f"reverse:http://{LOOPBACK}:{registry_port}@{LOOPBACK}:0",
        "--set",
        "flow_detail=0",
        "--set",
        f"confdir={conf}",
        *extra,
    ]
    proc = Proc(name).start(argv, env=clean_env(), cwd=workdir)
    try:
        m = proc.wait_for_output(rig_proxy.LISTENING, 30)
    except BaseException:
        proc.stop()
        raise
    port = int(m.group("port"))
    return Target(name, port, proc.pid, False, proc, proc.stop, proc.output, {"argv": argv})


def start_rp_s(config: Mapping[str, Any], workdir: Path) -> Target:
    p = rig_proxy.start_proxy(config, workdir)
    t = Target("rp-s", p.port, p.proc.pid, True, p.proc, p.stop, p.output, {"argv": p.proc.argv})
    _wait_registryproxy(t.url, p.proc, 30, consecutive=1)
    return t


def _config_file(config: Mapping[str, Any], workdir: Path, port: int) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "registryproxy.yaml"
    path.write_text(yaml.safe_dump({"listen_addr": LOOPBACK, "port": port, **config}, sort_keys=False))
    return path


def start_rp_run(
    config: Mapping[str, Any],
    workdir: Path,
    timeout: float = 40.0,
    *,
    extra: Sequence[str] = (),
    name: str = "rp-run",
) -> Target:
    """`python -m regproxy.run.cli run -- EXTRA…` with REGISTRYPROXY_CONFIG, as ./run.sh runs it (`./run.sh EXTRA…`)."""
    port = free_port()
    path = _config_file(config, workdir, port)
    env = clean_env({"REGISTRYPROXY_CONFIG": str(path), "PYTHONPATH": str(REPO / "addon")})
    argv = [sys.executable, "-m", "regproxy.run.cli", "run", "--", *extra]
    proc = Proc(name).start(argv, env=env, cwd=workdir)
    try:
        proc.wait_for_port(LOOPBACK, port, timeout)
        _wait_registryproxy(f"http://{LOOPBACK}:{port}", proc, timeout, consecutive=1)
    except BaseException:
        proc.stop()
        raise
    return Target(name, port, proc.pid, True, proc, proc.stop, proc.output, {"argv": argv})


def start_rp_workers(config: Mapping[str, Any], workdir: Path, workers: int = 2, timeout: float = 60.0) -> Target:
    """`./run.sh --workers N` with REGISTRYPROXY_CONFIG (HAProxy and the workers share its process group)."""
    port = free_port()
    path = _config_file(config, workdir, port)
    env = clean_env({"REGISTRYPROXY_CONFIG": str(path)})
    argv = ["bash", str(REPO / "run.sh"), "--workers", str(workers)]
    proc = Proc(f"rp-workers{workers}").start(argv, env=env, cwd=REPO)
    try:
        proc.wait_for_port(LOOPBACK, port, timeout)
        _wait_registryproxy(f"http://{LOOPBACK}:{port}", proc, timeout, consecutive=2 * workers + 2)
    except BaseException:
        proc.stop()
        raise
    return Target(f"rp-workers{workers}", port, proc.pid, True, proc, proc.stop, proc.output, {"argv": argv})


def settle(seconds: float = 0.3) -> None:
    """A short pause between configurations, so that one's tail does not land on the next."""
    time.sleep(seconds)
