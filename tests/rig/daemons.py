"""containerd (1.6, `ctr`) and dockerd (20.10) for the client tests, each confined to a temp dir.

containerd: `containerd --config DIR/config.toml` with root, state, the grpc, ttrpc and debug sockets
and the `opt` plugin's directory under DIR, the CRI plugin disabled (it starts in ~0.1 s), and
`content_sharing_policy = "isolated"`: a blob already in the store under another namespace must be
fetched again by a namespace that wants it, so a fresh namespace per pull really pulls (with the
default "shared" policy containerd would skip the fetch).

dockerd: `--data-root`, `--exec-root`, `--pidfile` and the API socket (`-H unix://…`) under its DIR,
`--config-file DIR/daemon.json` (never /etc/docker/daemon.json), `--containerd` pointing at the
containerd above, no networking (`--bridge=none`, no iptables) and the vfs storage driver. The
daemon.json holds only `deprecated-key-path`: without it dockerd 20.10 writes its libtrust key to
/etc/docker/key.json. dockerd still creates /run/docker/plugins (a fixed path); `stop()` removes it
again when it did not exist before. The CLI gets `DOCKER_HOST=unix://…` and its own `DOCKER_CONFIG`.

What these daemons do on loopback (seen with the Debian packages, see test_daemon_clients.py):
- `ctr` without `--hosts-dir` talks plain HTTP to a 127.0.0.1 registry whatever `--plain-http` and
  `--tlscacert` say; for TLS write a hosts.toml (`ctr_hosts_dir`) whose `server` is https.
- dockerd treats 127.0.0.0/8 as an insecure registry: it tries https first with certificate checks
  off (InsecureSkipVerify) and falls back to http only when TLS fails; certs.d is read but cannot
  make it verify a loopback registry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Proc, RigError, RunResult, clean_env, run

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; leave room
DOCKER_CERTS_D = Path("/etc/docker/certs.d")
DOCKER_PLUGINS_DIR = Path("/run/docker/plugins")


def _socket_path(path: Path) -> Path:
    if len(str(path)) > MAX_SOCKET_PATH:
        raise RigError(f"socket path too long for a unix socket: {path}")
    return path


def _need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise RigError(f"{binary} not found (Debian packages containerd, docker.io)")
    return found


def docker_cli() -> str:
    """The docker CLI of the docker.io package (/usr/bin/docker, 20.10, the daemon's version) when
    present: another `docker` earlier on PATH (a newer static CLI) would negotiate down anyway."""
    packaged = Path("/usr/bin/docker")
    return str(packaged) if packaged.exists() else _need("docker")


# --- containerd ---------------------------------------------------------------------------------


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def containerd_config(workdir: Path) -> str:
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_str(workdir / 'root')}",
            f"state = {_toml_str(workdir / 'state')}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f"  address = {_toml_str(_socket_path(workdir / 'grpc.sock'))}",
            "[ttrpc]",
            f"  address = {_toml_str(_socket_path(workdir / 'ttrpc.sock'))}",
            "[debug]",
            f"  address = {_toml_str(_socket_path(workdir / 'debug.sock'))}",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(workdir / 'opt')}",
            '[plugins."io.containerd.metadata.v1.bolt"]',
            '  content_sharing_policy = "isolated"',
            "",
        ]
    )


@dataclass
class Containerd:
    proc: Proc
    dir: Path
    address: Path  # the grpc socket

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120.0) -> RunResult:
        """`ctr --address SOCK --namespace NS ARGS…` (bounded; never raises for ctr's failures)."""
        argv = [_need("ctr"), "--address", str(self.address), "--namespace", namespace, *args]
        return run(argv, timeout=timeout)

    def ctr_checked(self, *args: str, namespace: str = "default", timeout: float = 120.0) -> RunResult:
        res = self.ctr(*args, namespace=namespace, timeout=timeout)
        if res.returncode != 0:
            raise RigError(f"ctr failed\n{res.describe()}\n{self.proc.describe()[-4000:]}")
        return res

    def image_digest(self, namespace: str, ref: str) -> str | None:
        """The target digest containerd recorded for image `ref` (`ctr images ls`), or None."""
        out = self.ctr_checked("images", "ls", namespace=namespace).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0] == ref:
                return cols[2]
        return None

    def image_status(self, namespace: str, ref: str) -> str | None:
        """The STATUS column of `ctr images check` for `ref` (e.g. "complete (3/3)"), or None."""
        out = self.ctr_checked("images", "check", namespace=namespace).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5 and cols[0] == ref:
                return f"{cols[3]} {cols[4]}"
        return None

    def remove_namespace(self, namespace: str) -> None:
        """Delete every image of `namespace` with synchronous GC (content and snapshots go with
        them), then the namespace itself, which containerd refuses unless it is empty."""
        refs = self.ctr_checked("images", "ls", "-q", namespace=namespace).stdout.split()
        if refs:
            self.ctr_checked("images", "rm", "--sync", *refs, namespace=namespace)
        left = self.ctr_checked("content", "ls", "-q", namespace=namespace).stdout.split()
        if left:
            self.ctr_checked("content", "rm", *left, namespace=namespace)
        self.ctr_checked("namespaces", "rm", namespace)

    def stop(self) -> int | None:
        return self.proc.stop(timeout=10)


def start_containerd(workdir: Path, timeout: float = 30.0) -> Containerd:
    """Start containerd with everything under `workdir` (created if missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(containerd_config(workdir))
    address = workdir / "grpc.sock"
    proc = Proc("containerd").start([_need("containerd"), "--config", str(config)], env=clean_env(), cwd=workdir)
    daemon = Containerd(proc, workdir, address)
    try:
        proc.wait_for_output(r"containerd successfully booted", timeout)
        # A refused or hung `ctr version` (socket not there yet) is "not yet"; containerd exiting ends the wait.
        proc.wait_ready(lambda: daemon.ctr("version", timeout=10).returncode == 0, timeout, "to answer `ctr version`")
    except BaseException:
        proc.stop()
        raise
    return daemon


# --- ctr hosts directory ------------------------------------------------------------------------


def ctr_hosts_dir(directory: Path, host: str, *, ca: Path | None = None, skip_verify: bool = False) -> Path:
    """A `--hosts-dir` for ctr that makes `host` ("127.0.0.1:PORT") an https registry.

    `ca` goes into hosts.toml (else pass `--tlscacert`, which applies to this host too).
    """
    host_dir = directory / host
    host_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"server = {_toml_str('https://' + host)}",
        f"[host.{_toml_str('https://' + host)}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    if ca is not None:
        lines.append(f"  ca = {_toml_str(ca)}")
    if skip_verify:
        lines.append("  skip_verify = true")
    (host_dir / "hosts.toml").write_text("\n".join(lines) + "\n")
    return directory


# --- dockerd ------------------------------------------------------------------------------------


@dataclass
class Dockerd:
    proc: Proc
    dir: Path
    socket: Path
    cli_config: Path  # the CLI's DOCKER_CONFIG directory
    _remove_plugins_dir: bool = field(default=False, repr=False)

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.cli_config)}

    def docker(self, *args: str, timeout: float = 120.0) -> RunResult:
        """The docker CLI against this daemon (bounded; never raises for the CLI's failures)."""
        return run([docker_cli(), *args], timeout=timeout, env_extra=self.env())

    def docker_checked(self, *args: str, timeout: float = 120.0) -> RunResult:
        res = self.docker(*args, timeout=timeout)
        if res.returncode != 0:
            raise RigError(f"docker failed\n{res.describe()}\n--- dockerd output (tail):\n{self.output_tail()}")
        return res

    def output_tail(self, chars: int = 4000) -> str:
        return self.proc.output()[-chars:]

    def image_ids(self) -> list[str]:
        return self.docker_checked("images", "-aq").stdout.split()

    def clear_images(self) -> None:
        """Remove every image (and so every layer): the next pull fetches everything."""
        if self.image_ids():
            self.docker_checked("image", "prune", "-af")
        left = self.image_ids()
        if left:
            raise RigError(f"images left after prune: {left}")

    def repo_digests(self, ref: str) -> list[str]:
        out = self.docker_checked("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
        digests: list[str] = json.loads(out)
        return digests

    def cli_auths(self) -> dict[str, dict[str, str]]:
        """The `auths` of the CLI's config.json (what `docker login` stored)."""
        path = self.cli_config / "config.json"
        auths: dict[str, dict[str, str]] = json.loads(path.read_text()).get("auths", {}) if path.exists() else {}
        return auths

    def stop(self) -> int | None:
        rc = self.proc.stop(timeout=20)
        if self._remove_plugins_dir:
            for d in (DOCKER_PLUGINS_DIR, DOCKER_PLUGINS_DIR.parent):
                try:
                    d.rmdir()  # only if empty: never anything another daemon put there
                except OSError:
                    break
        return rc


def start_dockerd(workdir: Path, containerd: Containerd, timeout: float = 60.0) -> Dockerd:
    """Start dockerd with everything under `workdir`, using `containerd` for its containerd."""
    workdir.mkdir(parents=True, exist_ok=True)
    socket = _socket_path(workdir / "docker.sock")
    config_file = workdir / "daemon.json"
    config_file.write_text(json.dumps({"deprecated-key-path": str(workdir / "key.json")}))
    cli_config = workdir / "cli"
    cli_config.mkdir(exist_ok=True)
    (cli_config / "config.json").write_text("{}")
    plugins_dir_existed = DOCKER_PLUGINS_DIR.exists()
    argv = [
        _need("dockerd"),
        "--config-file",
        str(config_file),
        "--data-root",
        str(workdir / "data"),
        "--exec-root",
        str(workdir / "exec"),
        "--pidfile",
        str(workdir / "dockerd.pid"),
        "-H",
        f"unix://{socket}",
        "--containerd",
        str(containerd.address),
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--storage-driver",
        "vfs",
    ]
    proc = Proc("dockerd").start(argv, env=clean_env(), cwd=workdir)
    daemon = Dockerd(proc, workdir, socket, cli_config, _remove_plugins_dir=not plugins_dir_existed)
    try:
        proc.wait_for_output(r"API listen on ", timeout)
        proc.wait_ready(
            lambda: daemon.docker("version", timeout=10).returncode == 0, timeout, "to answer `docker version`"
        )
    except BaseException:
        daemon.stop()
        raise
    return daemon


@contextmanager
def docker_certs_d(host: str, ca_cert: Path, root: Path = DOCKER_CERTS_D) -> Iterator[Path]:
    """`ROOT/HOST/ca.crt` for dockerd (it reads it at every pull); removed afterwards with exactly
    the directories this created. Refuses a HOST directory that already exists."""
    host_dir = root / host
    if host_dir.exists():
        raise RigError(f"{host_dir} already exists; not touching it")
    created: list[Path] = []
    for d in (root.parent, root, host_dir):
        if not d.exists():
            d.mkdir()
            created.append(d)
    try:
        shutil.copyfile(ca_cert, host_dir / "ca.crt")
        yield host_dir
    finally:
        (host_dir / "ca.crt").unlink(missing_ok=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
