"""podman (4.3.1) isolated from the machine's configuration, and a wire probe for the proxy's clients.

`Podman(base)` runs `podman --storage-driver vfs --root R --runroot RR --events-backend none
--cgroup-manager cgroupfs --tmpdir T --network-config-dir N` with everything under `base` and an
environment that names its own files: `REGISTRY_AUTH_FILE` (`{}`), `CONTAINERS_REGISTRIES_CONF`
(no search registries, short names disabled), `CONTAINERS_CONF` (empty), `CONTAINERS_STORAGE_CONF`
(vfs under `base`), `TMPDIR` (where pulls stage blobs; /var/tmp otherwise) and, on every pull,
`--signature-policy` with insecureAcceptAnything. What still touches the machine (seen with 4.3.1):
the shared blob-info cache `/var/lib/containers/cache/blob-info-cache-v1.boltdb` (skopeo writes it
too; there is no flag for it as root) and reads of `/etc/containers/registries.conf.d` and
`/etc/containers/registries.d` (absent names are harmless here: every reference is fully qualified).

What podman records (seen with 4.3.1, storage driver vfs):
- `.Digest` is the digest of the manifest the reference named: for a tag of a single-arch image
  that manifest's digest; for a multi-arch index (by tag or by digest) the INDEX digest, while
  `RepoDigests` holds both `NAME@INDEX` and `NAME@INSTANCE` (the linux/<host arch> instance it
  pulled) and the image ID is that instance's config digest.
- A Docker v2 schema 2 manifest is stored as it is (no conversion): `.Digest` is its upstream digest.
- With `--tls-verify=false` podman still tries HTTPS first; mitmproxy auto-detects TLS on its port and
  answers with its own certificate, so a "plain HTTP" pull through mitmdump is in fact HTTPS.

`probe_script(dir)` writes a mitmproxy script that loads `Probe` (below) BEFORE the project's addon,
so a test can see what a client really sent: the ALPN protocols offered in its ClientHello, the
protocol negotiated, and each request (method, path, http version, TLS or not, Accept lines,
Content-Length, whether Authorization was sent) as the client sent it, before the addon rewrites it.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pki
from .procs import RigError, RunResult, run

PODMAN_TIMEOUT = 90.0
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

REGISTRIES_CONF = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def host_goarch() -> str:
    """The Go architecture name podman picks an index instance for (amd64 on x86_64)."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


def cert_dir(directory: Path, ca_cert: Path) -> Path:
    """A directory holding `ca.crt` (a copy of `ca_cert`): what `--cert-dir`/`--src-cert-dir` take."""
    return pki.cert_dir(ca_cert, directory)


@dataclass(frozen=True)
class PulledImage:
    """What `podman image inspect` says about a pulled image."""

    id: str  # "sha256:…" of the config, like a digest
    digest: str
    repo_digests: tuple[str, ...]
    repo_tags: tuple[str, ...]


class Podman:
    """podman with storage, state, temp files and configuration all under `base`."""

    def __init__(self, base: Path, *, command: Sequence[str] = ("podman",), containers_conf: str = "") -> None:
        self.base = base
        self.command = list(command)
        base.mkdir(parents=True, exist_ok=True)
        self.root = base / "root"
        # podman refuses a runroot longer than 50 characters: run state goes to a short /tmp dir.
        self.short = Path(tempfile.mkdtemp(prefix="rig-podman-", dir="/tmp"))
        self.runroot = self.short / "run"
        self.tmpdir = self.short / "tmp"
        self.image_tmp = base / "image-tmp"
        self.network_dir = base / "networks"
        self.auth_file = base / "auth.json"
        self.registries_conf = base / "registries.conf"
        self.containers_conf = base / "containers.conf"
        self.storage_conf = base / "storage.conf"
        self.policy = base / "policy.json"
        for d in (self.image_tmp, self.network_dir):
            d.mkdir(exist_ok=True)
        self.auth_file.write_text("{}")
        self.registries_conf.write_text(REGISTRIES_CONF)
        self.containers_conf.write_text(containers_conf)
        self.storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\ngraphroot = "{self.root}"\n'
        )
        self.policy.write_text(json.dumps(POLICY))

    def env(self) -> dict[str, str]:
        return {
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "TMPDIR": str(self.image_tmp),
        }

    def argv(self, *args: str) -> list[str]:
        return [
            *self.command,
            "--storage-driver",
            "vfs",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            "--tmpdir",
            str(self.tmpdir),
            "--network-config-dir",
            str(self.network_dir),
            *args,
        ]

    def run(self, *args: str, timeout: float = PODMAN_TIMEOUT) -> RunResult:
        """`podman GLOBALS ARGS`, bounded by `timeout` (RigError when it is exceeded)."""
        return run(self.argv(*args), timeout=timeout, env_extra=self.env())

    def pull(self, ref: str, *, tls_verify: bool, cert_dir: Path | None = None) -> RunResult:
        """`podman pull -q` of `ref` ("HOST/NAME:TAG" or "HOST/NAME@DIGEST"); never raises on failure."""
        args = ["pull", "-q", "--signature-policy", str(self.policy), f"--tls-verify={str(tls_verify).lower()}"]
        if cert_dir is not None:
            args += ["--cert-dir", str(cert_dir)]
        return self.run(*args, ref)

    def inspect(self, ref: str) -> PulledImage:
        res = self.run("image", "inspect", "--format", "json", ref, timeout=30)
        if res.returncode != 0:
            raise RigError(f"podman image inspect failed\n{res.describe()}")
        data: list[dict[str, Any]] = json.loads(res.stdout)
        img = data[0]
        image_id = str(img["Id"])
        return PulledImage(
            id=image_id if image_id.startswith("sha256:") else f"sha256:{image_id}",
            digest=str(img["Digest"]),
            repo_digests=tuple(img.get("RepoDigests") or ()),
            repo_tags=tuple(img.get("RepoTags") or ()),
        )

    def images(self) -> list[str]:
        res = self.run("images", "-a", "--format", "{{.ID}}", timeout=30)
        if res.returncode != 0:
            raise RigError(f"podman images failed\n{res.describe()}")
        return res.stdout.split()

    def reset(self) -> None:
        """Forget every image: `podman rmi -af`, then remove storage and state outright."""
        if self.root.exists():
            self.run("rmi", "-af", timeout=60)
        for d in (self.root, self.runroot, self.tmpdir, self.image_tmp):
            shutil.rmtree(d, ignore_errors=True)
        self.image_tmp.mkdir()

    def close(self) -> None:
        """reset(), and remove the run-state directory under /tmp."""
        self.reset()
        shutil.rmtree(self.short, ignore_errors=True)


# --- the wire probe ---------------------------------------------------------------------------

PROBE_MARK = "RIGPROBE "
_PROBE_LINE = re.compile(rf"{PROBE_MARK}(\{{.*\}})\s*$", re.MULTILINE)
_log = logging.getLogger("rig.probe")
_TESTS_DIR = Path(__file__).resolve().parents[1]
_ADDON_DIR = _TESTS_DIR.parent / "addon"


@dataclass(frozen=True)
class ProbeHello:
    conn: str
    alpn_offers: tuple[str, ...]


@dataclass(frozen=True)
class ProbeTls:
    conn: str
    alpn: str  # "" when none was negotiated


@dataclass(frozen=True)
class ProbeRequest:
    conn: str
    tls: bool
    http_version: str
    method: str
    path: str
    accept: tuple[str, ...]
    content_length: str | None
    transfer_encoding: str | None
    authorization: str | None  # the scheme only ("Bearer", "Basic"), never the credential


@dataclass(frozen=True)
class ProbeLog:
    hellos: list[ProbeHello]
    tls: list[ProbeTls]
    requests: list[ProbeRequest]


class Probe:
    """mitmproxy hooks that log what the client sent, one `RIGPROBE {json}` line per event."""

    def _emit(self, **fields: Any) -> None:
        _log.info("%s%s", PROBE_MARK, json.dumps(fields, sort_keys=True))

    def tls_clienthello(self, data: Any) -> None:
        offers = [a.decode("ascii", "replace") for a in data.client_hello.alpn_protocols]
        self._emit(ev="hello", conn=str(data.context.client.id), alpn=offers)

    def tls_established_client(self, data: Any) -> None:
        alpn: bytes | None = data.conn.alpn
        self._emit(ev="tls", conn=str(data.conn.id), alpn=(alpn or b"").decode("ascii", "replace"))

    def requestheaders(self, flow: Any) -> None:
        req = flow.request
        auth: str | None = req.headers.get("authorization")
        self._emit(
            ev="request",
            conn=str(flow.client_conn.id),
            tls=bool(flow.client_conn.tls_established),
            http_version=str(req.http_version),
            method=str(req.method),
            path=str(req.path),
            accept=list(req.headers.get_all("accept")),
            content_length=req.headers.get("content-length"),
            transfer_encoding=req.headers.get("transfer-encoding"),
            authorization=auth.split(" ", 1)[0] if auth else None,
        )


def probe_script(directory: Path) -> Path:
    """A mitmproxy script (for `start_proxy(script=…)`): Probe first, then the project's addon."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "probe_and_registryproxy.py"
    path.write_text(
        "import sys\n"
        f"for _p in ({str(_ADDON_DIR)!r}, {str(_TESTS_DIR)!r}):\n"
        "    if _p not in sys.path:\n"
        "        sys.path.insert(0, _p)\n"
        "from regproxy import chain\n"
        "from rig.podman import Probe\n"
        "addons = [Probe(), chain.proxy()]\n"
    )
    return path


def parse_probe(output: str) -> ProbeLog:
    log = ProbeLog([], [], [])
    for m in _PROBE_LINE.finditer(output):
        ev: dict[str, Any] = json.loads(m.group(1))
        if ev["ev"] == "hello":
            log.hellos.append(ProbeHello(ev["conn"], tuple(ev["alpn"])))
        elif ev["ev"] == "tls":
            log.tls.append(ProbeTls(ev["conn"], ev["alpn"]))
        elif ev["ev"] == "request":
            log.requests.append(
                ProbeRequest(
                    conn=ev["conn"],
                    tls=ev["tls"],
                    http_version=ev["http_version"],
                    method=ev["method"],
                    path=ev["path"],
                    accept=tuple(ev["accept"]),
                    content_length=ev["content_length"],
                    transfer_encoding=ev["transfer_encoding"],
                    authorization=ev["authorization"],
                )
            )
    return log
