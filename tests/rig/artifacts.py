"""OCI artifacts pushed and pulled with oras-py (the PyPI package `oras`, pinned in tests/requirements.txt).

`Oras(host, ...)` is an `oras.provider.Registry` for one registry (an upstream or the proxy): plain HTTP
or HTTPS trusting a CA file, with Basic credentials for the rig's basic and token upstreams (oras-py
answers the token challenge itself). What it pushes and fetches goes through oras-py's own requests
(`upload_blob`, `do_request`, `pull`), so the proxy sees a real client's requests, auth flow included.

`push_artifact` pushes an OCI 1.1 artifact manifest (`artifactType`, a `subject`, a config of a
non-image media type, several layers of other media types) as exact bytes, and, because the
registries here (distribution 2.8) have no referrers API, also what the OCI distribution spec asks a
client to push then: the referrers tag schema, an image index tagged `sha256-<subject hex>` listing the
artifact's descriptor (with its `artifactType` and annotations). `discover` is the lookup a client does
(oras `discover`): `GET /v2/<name>/referrers/<digest>` first, and on 404 the tag schema.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.provider  # type: ignore[import-untyped]

from .procs import RigError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"
TITLE = "org.opencontainers.image.title"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


@dataclass(frozen=True)
class Artifact:
    manifest: bytes
    digest: str
    config: bytes
    layers: tuple[tuple[str, bytes, str], ...]  # (file name, bytes, media type)
    referrers_index: bytes  # the tag schema's index, tagged `sha256-<subject hex>`


class Oras:
    """oras-py's registry client for `host` ("127.0.0.1:PORT")."""

    def __init__(
        self, host: str, *, https: bool = False, ca_file: Path | None = None, creds: tuple[str, str] | None = None
    ) -> None:
        self.host = host
        verify: bool | str = str(ca_file) if ca_file is not None else False
        self.client = oras.provider.Registry(hostname=host, insecure=not https, tls_verify=verify)
        if creds is not None:
            self.client.auth.set_basic_auth(*creds)
        self.prefix = "https" if https else "http"

    def url(self, name: str, suffix: str) -> str:
        return f"{self.prefix}://{self.host}/v2/{name}/{suffix}"

    def request(self, method: str, name: str, suffix: str, **kw: Any) -> Any:
        """oras-py's `do_request` (its 401 → token → retry flow); a requests.Response."""
        return self.client.do_request(self.url(name, suffix), method, **kw)

    def push_blob(self, name: str, data: bytes, media_type: str) -> None:
        with tempfile.TemporaryDirectory(prefix="rig-oras-") as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            layer = descriptor(media_type, data)
            r = self.client.upload_blob(str(path), f"{self.host}/{name}", layer)
        if r.status_code not in (200, 201, 202):
            raise RigError(f"oras upload_blob {name}: {r.status_code} {r.text}")

    def put_manifest(self, name: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.request("PUT", name, f"manifests/{ref}", data=body, headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise RigError(f"PUT manifest {name}:{ref}: {r.status_code} {r.text}")
        return str(r.headers.get("Docker-Content-Digest", ""))

    def get_manifest(self, name: str, ref: str) -> Any:
        """The GET of a manifest (raw requests.Response: bytes and headers)."""
        return self.request("GET", name, f"manifests/{ref}", headers={"Accept": ACCEPT})

    def pull(self, name: str, ref: str, outdir: Path) -> list[Path]:
        """oras-py's `pull`: the manifest, then each layer saved under its title."""
        files: list[str] = self.client.pull(target=f"{self.host}/{name}:{ref}", outdir=str(outdir))
        return [Path(f) for f in files]

    def discover(self, name: str, subject: str, artifact_type: str | None = None) -> tuple[int, dict[str, Any]]:
        """The referrers of `subject`: (status of the referrers API, the index found); the tag schema on 404."""
        query = f"?artifactType={artifact_type}" if artifact_type else ""
        r = self.request("GET", name, f"referrers/{subject}{query}", headers={"Accept": OCI_INDEX})
        if r.status_code == 200:
            return 200, dict(r.json())
        if r.status_code != 404:
            raise RigError(f"referrers of {name}@{subject}: {r.status_code} {r.text}")
        fallback = self.get_manifest(name, subject.replace(":", "-", 1))
        if fallback.status_code != 200:
            raise RigError(f"tag schema of {name}@{subject}: {fallback.status_code} {fallback.text}")
        index: dict[str, Any] = fallback.json()
        if artifact_type:
            index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") == artifact_type]
        return 404, index


def build_artifact(subject: dict[str, Any], artifact_type: str, seed: str) -> Artifact:
    """An OCI 1.1 artifact about `subject` (a descriptor): a non-image config, three layers of other types."""
    config = json.dumps({"tool": "rig", "seed": seed}).encode()
    layers = (
        ("sbom.spdx.json", json.dumps({"spdxVersion": "SPDX-2.3", "name": seed}).encode(), "application/spdx+json"),
        ("notes.txt", f"release notes {seed}\n".encode(), "text/plain"),
        ("data.bin", hashlib.sha512(seed.encode()).digest() * 64, "application/vnd.example.data.v1"),
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor("application/vnd.example.config.v1+json", config),
        "layers": [descriptor(mt, data, annotations={TITLE: fname}) for fname, data, mt in layers],
        "subject": subject,
        "annotations": {"org.opencontainers.image.created": "2026-12-07T00:00:00Z", "rig.seed": seed},
    }
    body = json.dumps(manifest, indent=2).encode()
    entry = descriptor(OCI_MANIFEST, body, artifactType=artifact_type, annotations=manifest["annotations"])
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}, indent=2).encode()
    return Artifact(body, sha256(body), config, layers, index)


def push_artifact(client: Oras, name: str, tag: str, art: Artifact) -> None:
    """Push `art` (its blobs, its manifest under `tag`) and the tag schema's index for its subject."""
    client.push_blob(name, art.config, "application/vnd.example.config.v1+json")
    for _, data, mt in art.layers:
        client.push_blob(name, data, mt)
    if client.put_manifest(name, tag, art.manifest, OCI_MANIFEST) != art.digest:
        raise RigError("the registry stored the artifact under another digest")
    subject = json.loads(art.manifest)["subject"]["digest"]
    client.put_manifest(name, subject.replace(":", "-", 1), art.referrers_index, OCI_INDEX)
