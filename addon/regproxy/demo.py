"""`./run.sh demo`: the proxy working end to end on this machine, offline.

The demo builds a small image with the standard library alone (an OCI image layout holding
/hello.txt), starts a password-protected upstream `docker-registry` on a free loopback port,
pushes the image there as `library/hello:v1` and `private/hello:v1`, and starts the proxy
(`mitmdump`, or `mitmweb` with `--web`) with two mappings: the namespace `demo/` and a
capability URL `<128 random bits>/hello`, both holding the registry's credentials. It then pulls
through both with skopeo (and docker, when a daemon answers), without credentials, and shows which
mapping served each pull, that the digest is the upstream's, and that an almost-right capability
key gets `NAME_UNKNOWN`.

Everything it starts runs in its own process group and is stopped by process group id; all its
files live in one temporary directory, removed at the end. SIGINT, SIGTERM and SIGHUP at any point
stop everything it started and remove that directory.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import FrameType
from typing import Any

from .cli import mitm_args, new_capability
from .config import ConfigError, load_file

LOOPBACK = "127.0.0.1"
USER = "demo"
TAG = "v1"
HELLO = b"hello from the registryproxy demo\n"
NAMESPACE_KEY = "demo/"
UPSTREAM_PUBLIC = "library/hello"
UPSTREAM_PRIVATE = "private/hello"
# Debian package -> the command the demo needs from it.
PACKAGES = {"docker-registry": "docker-registry", "skopeo": "skopeo", "apache2-utils": "htpasswd"}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPES = (
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# platform.machine() -> the OCI architecture name, so docker takes the image as this host's.
ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}

PROXY_LISTENING = re.compile(r"listening at 127\.0\.0\.1:(?P<port>\d+)")
WEB_LISTENING = re.compile(r"Web server listening at (?P<url>http://\S+)")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


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


# -- the sample image ---------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = _digest(data)
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(HELLO), 0o644, 1704067200
        tar.addfile(info, io.BytesIO(HELLO))
    return buf.getvalue()


def build_image(layout: Path) -> str:
    """Write an OCI image layout with one image tagged TAG (one layer: /hello.txt); its digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tar = _layer_tar()
    layer = _put_blob(layout, gzip.compress(tar, mtime=0), OCI_LAYER)
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": ARCHITECTURES.get(platform.machine().lower(), "amd64"),
        "os": "linux",
        "config": {"Cmd": ["/hello.txt"], "Labels": {"org.opencontainers.image.title": "registryproxy demo"}},
        "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "registryproxy demo: /hello.txt"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _put_blob(layout, json.dumps(config).encode(), OCI_CONFIG),
        "layers": [layer],
    }
    desc = _put_blob(layout, json.dumps(manifest, indent=2).encode(), OCI_MANIFEST)
    desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return str(desc["digest"])


def read_hello(layout: Path) -> str:
    """/hello.txt from the image an `oci:` copy left in `layout`."""

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(manifest["layers"][0]["digest"])))) as tar:
        member = tar.extractfile("hello.txt")
        return "" if member is None else member.read().decode(errors="replace").strip()


# -- HTTP ---------------------------------------------------------------------------------------


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, headers: Mapping[str, str], method: str = "GET") -> tuple[int, Message, bytes]:
    """(status, headers, body) of one request, without following any proxy settings."""
    req = urllib.request.Request(url, headers=dict(headers), method=method)
    try:
        with _opener().open(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except OSError as e:
        raise DemoError(f"{method} {url}: {e}") from None


# -- the upstream registry ----------------------------------------------------------------------


@dataclass
class Registry:
    child: Child
    port: int
    password: str

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def creds(self) -> str:
        return f"{USER}:{self.password}"

    def manifest_digest(self, name: str) -> str:
        """The Docker-Content-Digest the registry itself serves for NAME:TAG."""
        auth = "Basic " + base64.b64encode(self.creds.encode()).decode()
        url = f"http://{self.host}/v2/{name}/manifests/{TAG}"
        status, headers, _ = http(url, {"Accept": ", ".join(MANIFEST_TYPES), "Authorization": auth}, "HEAD")
        digest = headers.get("Docker-Content-Digest")
        if status != 200 or not digest:
            raise DemoError(f"HEAD {url} on the upstream registry: {status}")
        return str(digest)


def _registry_config(storage: Path, htpasswd: Path, port: int) -> str:
    return f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
http:
  addr: {LOOPBACK}:{port}
  secret: {secrets.token_hex(16)}
auth:
  htpasswd:
    realm: registryproxy-demo
    path: {htpasswd}
"""


def start_registry(session: Session) -> Registry:
    """`docker-registry serve` on a free loopback port, behind htpasswd (user demo, random password)."""
    base = session.dir / "registry"
    (base / "storage").mkdir(parents=True)
    password = secrets.token_urlsafe(18)
    htpasswd = base / "htpasswd"
    htpasswd.write_text(session.check(["htpasswd", "-Bin", USER], 30, stdin=password + "\n"))
    for attempt in range(3):
        port = free_port()
        config = base / "config.yml"
        config.write_text(_registry_config(base / "storage", htpasswd, port))
        child = session.spawn("docker-registry", ["docker-registry", "serve", str(config)])
        try:
            child.wait_for(re.compile(rf"listening on {re.escape(LOOPBACK)}:{port}\b"), 20)
            return Registry(child, port, password)
        except DemoError:
            taken = "address already in use" in child.output()
            session.stop(child)
            if attempt == 2 or not taken:
                raise
    raise AssertionError("not reached")


def push(session: Session, layout: Path, registry: Registry, name: str) -> None:
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", registry.creds]
    session.check([*argv, f"oci:{layout}:{TAG}", f"docker://{registry.host}/{name}:{TAG}"], 120)


# -- the proxy ----------------------------------------------------------------------------------


@dataclass
class Proxy:
    child: Child
    port: int
    tool: str
    web_url: str | None
    labels: dict[str, str]  # mapping key -> the label the proxy logs for it

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def write_config(session: Session, registry: Registry, capability: str) -> Path:
    """The demo's registryproxy config (JSON, which is YAML): the two mappings, a random key."""
    creds = {"registry": f"http://{registry.host}", "username": USER, "password": registry.password}
    config = {
        "secretkey": secrets.token_hex(32),
        "proxies": {
            NAMESPACE_KEY: {**creds, "remote": UPSTREAM_PUBLIC.split("/")[0]},
            f"{capability}/hello": {**creds, "remote": UPSTREAM_PRIVATE},
        },
    }
    path = session.dir / "registryproxy.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_proxy(session: Session, config_path: Path, web: bool) -> Proxy:
    """mitmdump (or mitmweb) with the addon on a free loopback port; waits for it to listen."""
    try:
        labels = {m.key: m.label for m in load_file(config_path).mappings}
    except ConfigError as e:
        raise DemoError(f"the demo's config was refused: {e}") from None
    tool = "mitmweb" if web else "mitmdump"
    binary = Path(sys.executable).parent / tool
    base = [str(binary), *mitm_args(str(config_path), LOOPBACK, 0), "--set", "flow_detail=0"]
    base += ["--set", f"confdir={session.dir / 'mitmproxy'}"]  # its CA stays in the temp dir
    for attempt in range(3):
        argv = list(base)
        if web:
            argv += ["--set", "web_open_browser=false", "--set", f"web_host={LOOPBACK}"]
            argv += ["--set", f"web_port={free_port()}"]
        child = session.spawn(tool, argv)
        try:
            port = int(child.wait_for(PROXY_LISTENING, 60)["port"])
            web_url = child.wait_for(WEB_LISTENING, 30)["url"] if web else None
            return Proxy(child, port, tool, web_url, labels)
        except DemoError:
            taken = "already in use" in child.output()
            session.stop(child)
            if attempt == 2 or not taken:
                raise
    raise AssertionError("not reached")


def served_by(proxy: Proxy, log_name: str, start: int) -> str:
    """The proxy's log line for the manifest request of LOG_NAME:TAG written after offset `start`."""
    pattern = re.compile(rf"(?:GET|HEAD) {re.escape(log_name)}/manifests/{TAG} mapping=\S+ status=\d+.*$", re.MULTILINE)
    return proxy.child.wait_for(pattern, 10, start).group(0)


def _mapping_of(line: str) -> str:
    m = re.search(r"mapping=(\S+)", line)
    return m.group(1) if m else "?"


# -- the pulls ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A name to pull through the proxy and what should serve it."""

    local: str  # the name a client asks for
    log_name: str  # how the proxy logs it
    key: str  # the mapping that serves it
    upstream: str  # the upstream repository
    expected: str  # the upstream's digest


def pull_skopeo(session: Session, proxy: Proxy, target: Target, index: int) -> None:
    ref = f"docker://{proxy.host}/{target.local}:{TAG}"
    say(f"  $ skopeo copy --src-tls-verify=false {ref} oci:pull{index}:{TAG}")
    dest = session.dir / f"pull{index}"
    digestfile = session.dir / f"pull{index}.digest"
    start = len(proxy.child.output())
    argv = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--digestfile", str(digestfile)]
    session.check([*argv, ref, f"oci:{dest}:{TAG}"], 120)
    line = served_by(proxy, target.log_name, start)
    _report(target, line, digestfile.read_text().strip())
    say(f"    /hello.txt in the pulled image: {read_hello(dest)!r}")


def _report(target: Target, line: str, digest: str) -> None:
    say(f"    served by mapping {_mapping_of(line)} ({target.key} -> upstream {target.upstream})")
    say(f"    proxy log: {line}")
    if digest != target.expected:
        raise DemoError(f"digest {digest} differs from the upstream's {target.expected}")
    say(f"    digest {digest}: same digest as upstream {target.upstream}:{TAG}")


def almost(capability: str) -> str:
    """The capability key with its last hex digit changed."""
    last = capability[-1]
    return capability[:-1] + ("0" if last != "0" else "1")


def show_refusal(session: Session, proxy: Proxy, capability: str) -> None:
    wrong = f"{almost(capability)}/hello"
    ref = f"docker://{proxy.host}/{wrong}:{TAG}"
    say(f"  $ skopeo copy --src-tls-verify=false {ref} oci:refused:{TAG}   (last digit of the key changed)")
    start = len(proxy.child.output())
    res = session.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{session.dir}/refused"], 60)
    if res.returncode == 0:
        raise DemoError("the proxy served an almost-right capability key")
    say(f"    skopeo failed as it should: {_skopeo_error(res.stderr)}")
    line = served_by(proxy, "<capability?>/hello", start)
    say(f"    proxy log: {line}")
    say(f"    the proxy's answer: {refusal_code(proxy, wrong)} (the same answer as for any name it does not serve)")


def _skopeo_error(stderr: str) -> str:
    """The message of skopeo's last log line (`time=… level=fatal msg="…"`)."""
    lines = stderr.strip().splitlines() or ["(no message)"]
    m = re.search(r'msg="(.*)"\s*$', lines[-1])
    return m.group(1).replace('\\"', '"') if m else lines[-1]


def refusal_code(proxy: Proxy, name: str) -> str:
    """The registry error code the proxy answers for NAME:TAG, asked with a token of its own."""
    query = urllib.parse.urlencode({"service": proxy.host, "scope": f"repository:{name}:pull"})
    status, _, body = http(f"http://{proxy.host}/token?{query}", {})
    token = json.loads(body).get("token", "") if status == 200 else ""
    headers = {"Accept": ", ".join(MANIFEST_TYPES), "Authorization": f"Bearer {token}"}
    status, _, body = http(f"http://{proxy.host}/v2/{name}/manifests/{TAG}", headers)
    try:
        code = json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        code = "?"
    return f"{status} {code}"


def docker_reachable(session: Session) -> str | None:
    """None when a docker daemon answers within a few seconds, else why docker is skipped."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        res = session.run(["docker", "info", "--format", "{{.ServerVersion}}"], 8)
    except DemoError:
        return "`docker info` got no answer within 8s"
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()
        return f"no docker daemon reachable ({why[-1] if why else f'docker info exited {res.returncode}'})"
    return None


def pull_docker(session: Session, proxy: Proxy, target: Target) -> None:
    ref = f"{proxy.host}/{target.local}:{TAG}"
    say(f"  $ docker pull {ref}")
    start = len(proxy.child.output())
    session.check(["docker", "pull", "--quiet", ref], 180)
    try:
        line = served_by(proxy, target.log_name, start)
        fmt = "{{range .RepoDigests}}{{println .}}{{end}}"
        repo_digests = session.check(["docker", "image", "inspect", "--format", fmt, ref], 30).split()
        digest = next((d.split("@", 1)[1] for d in repo_digests if "@" in d), "?")
        _report(target, line, digest)
    finally:
        session.run(["docker", "image", "rm", "--force", ref], 60)  # leave nothing behind in docker either


# -- the demo -----------------------------------------------------------------------------------


def run_demo(session: Session, web: bool) -> Proxy:
    """Every step up to and including the pulls; returns the running proxy."""
    tmp = session.open()
    say(f"[1/5] prerequisites: {', '.join(PACKAGES.values())} found; working in {tmp}")
    digest = build_image(tmp / "image")
    say(f"[2/5] built a sample image (one layer holding /hello.txt) as an OCI layout: {digest}")

    registry = start_registry(session)
    for name in (UPSTREAM_PUBLIC, UPSTREAM_PRIVATE):
        push(session, tmp / "image", registry, name)
    expected = {name: registry.manifest_digest(name) for name in (UPSTREAM_PUBLIC, UPSTREAM_PRIVATE)}
    say(f"[3/5] upstream: docker-registry (pid {registry.child.pid}) at http://{registry.host}, password-protected")
    say(f"      (user {USER}, a random password); pushed {UPSTREAM_PUBLIC}:{TAG} and {UPSTREAM_PRIVATE}:{TAG}")

    capability = new_capability()
    proxy = start_proxy(session, write_config(session, registry, capability), web)
    cap_key = f"{capability}/hello"
    say(f"[4/5] proxy: {proxy.tool} (pid {proxy.child.pid}) listening at {proxy.host}, two mappings:")
    say(f"      {NAMESPACE_KEY:<44} -> {registry.host}/{UPSTREAM_PUBLIC.split('/')[0]}/…  (with the credentials)")
    say(f"      {cap_key:<44} -> {registry.host}/{UPSTREAM_PRIVATE}  (capability URL)")

    namespace_name = f"{NAMESPACE_KEY}hello"
    targets = [
        Target(namespace_name, namespace_name, NAMESPACE_KEY, UPSTREAM_PUBLIC, expected[UPSTREAM_PUBLIC]),
        Target(cap_key, f"<{proxy.labels[cap_key]}>", cap_key, UPSTREAM_PRIVATE, expected[UPSTREAM_PRIVATE]),
    ]
    say("[5/5] pulls through the proxy; the clients have no credentials, the proxy has them:")
    for i, target in enumerate(targets):
        pull_skopeo(session, proxy, target, i)
    show_refusal(session, proxy, capability)
    why_not = docker_reachable(session)
    if why_not is not None:
        say(f"  docker: skipped: {why_not}")
    else:
        for target in targets:
            pull_docker(session, proxy, target)
    return proxy


def wait_web(proxy: Proxy) -> None:
    """Print the mitmweb URL and a pull to try, then wait for a signal (Interrupted)."""
    say()
    say(f"mitmweb: {proxy.web_url}")
    say("  every request of the pulls above is there, with the mapping that served it in its comment")
    say("try a pull, then watch it appear in mitmweb:")
    say(f"  skopeo inspect --tls-verify=false docker://{proxy.host}/{NAMESPACE_KEY}hello:{TAG}")
    say("Press Ctrl-C to stop the proxy and the registry.")
    while proxy.child.alive():
        time.sleep(0.5)
    raise DemoError(f"{proxy.tool} exited; its output:\n{proxy.child.tail()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh demo", description="Show the proxy working end to end, offline.")
    parser.add_argument("--web", action="store_true", help="run the proxy under mitmweb and wait for Ctrl-C")
    args = parser.parse_args(argv)

    guard = Guard()
    guard.install()
    session = Session(guard)
    status = 0
    waiting = False
    try:
        say("registryproxy demo: a local registry, the proxy in front of it, pulls through it (offline)")
        ensure_packages(guard)
        proxy = run_demo(session, args.web)
        if args.web:
            waiting = True
            wait_web(proxy)
    except Interrupted as e:
        say(f"\n{e.args[0]}: stopping")
        status = 0 if waiting else 130
    except DemoError as e:
        say(f"demo failed: {e}")
        status = 1
    finally:
        stopped = session.close()
    if stopped:
        say(f"stopped {', '.join(stopped)}")
    if session.tmp is not None:
        say(f"removed {session.tmp}")
    if status == 0 and not waiting:
        say("demo done: both mappings served the upstream's image, and the wrong key was refused")
    return status


if __name__ == "__main__":
    sys.exit(main())
