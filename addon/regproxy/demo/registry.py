"""The demo's upstream: a sample image built offline, and a password-protected registry holding it.

`build_image` writes an OCI image layout with the standard library alone (one layer holding
/hello.txt) and `read_hello` reads that file back from a pulled copy. `start_registry` runs
`docker-registry` on a free loopback port behind htpasswd (user `demo`, a random password) and
`push` copies the image there with skopeo. `http` is one request that ignores any proxy settings.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import io
import json
import platform
import re
import secrets
import tarfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from ..run.launch import LOOPBACK, free_port
from .session import Child, DemoError, Session

USER = "demo"
TAG = "v1"
HELLO = b"hello from the registryproxy demo\n"

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
