"""Test images built by hand as OCI image layouts (offline, deterministic), pushed with skopeo.

A layer is a gzip'd tar holding one file of pseudo-random bytes derived from `seed`; the same
arguments always give the same bytes and digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from .procs import RigError, run_checked
from .registry import Upstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
# The Accept types skopeo/podman/dockerd send, one header line each.
MANIFEST_TYPES = (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    DOCKER_V1_SIGNED,
    DOCKER_V1,
)
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class ImageInfo:
    digest: str  # of the manifest, as written in the layout
    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    architecture: str
    os: str


@dataclass(frozen=True)
class IndexInfo:
    digest: str
    index: bytes
    images: tuple[ImageInfo, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return Blob(media_type, digest, len(data))


def _init_layout(layout: Path) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = layout / "index.json"
    if not index.exists():
        index.write_text(json.dumps({"schemaVersion": 2, "manifests": []}))


def _tag_in_layout(layout: Path, tag: str, blob: Blob) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    manifests = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append({**blob.descriptor(), "annotations": {REF_NAME: tag}})
    index["manifests"] = manifests
    index_path.write_text(json.dumps(index, indent=2))


def layout_digest(layout: Path, tag: str) -> str | None:
    """The digest index.json of an OCI layout names for `tag` (None if absent)."""
    index_path = layout / "index.json"
    if not index_path.exists():
        return None
    for m in json.loads(index_path.read_text()).get("manifests", []):
        if m.get("annotations", {}).get(REF_NAME) == tag:
            digest: str = m["digest"]
            return digest
    return None


def layer_tar(size: int, seed: str) -> bytes:
    """An uncompressed tar with one file of `size` pseudo-random bytes (deterministic)."""
    data = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"rig/{hashlib.sha256(seed.encode()).hexdigest()[:16]}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_image(layout: Path, layers: Sequence[int], arch: str, os_name: str, seed: str) -> ImageInfo:
    blobs: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layers):
        tar = layer_tar(size, f"{seed}/{arch}/{i}")
        diff_ids.append(sha256_digest(tar))
        blobs.append(_write_blob(layout, gzip.compress(tar, compresslevel=6, mtime=0), OCI_LAYER_GZIP))
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"rig.seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"rig layer {i}"} for i in range(len(layers))],
    }
    config_blob = _write_blob(layout, json.dumps(config).encode(), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    raw = json.dumps(manifest, indent=2).encode()
    m_blob = _write_blob(layout, raw, OCI_MANIFEST)
    return ImageInfo(m_blob.digest, raw, config_blob, tuple(blobs), tuple(diff_ids), arch, os_name)


def build_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[int] = (1024, 2048),
    arch: str = "amd64",
    os_name: str = "linux",
    seed: str | int = 0,
) -> ImageInfo:
    """Write a single-arch OCI image into the layout at `layout_dir` (created if needed) as `tag`."""
    _init_layout(layout_dir)
    info = _write_image(layout_dir, layers, arch, os_name, str(seed))
    _tag_in_layout(layout_dir, tag, Blob(OCI_MANIFEST, info.digest, len(info.manifest)))
    return info


def build_index(
    layout_dir: Path,
    tag: str,
    layers: Sequence[int] = (1024, 2048),
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    seed: str | int = 0,
) -> IndexInfo:
    """Write a multi-arch OCI index (one image per (os, arch), distinct layers) as `tag`."""
    _init_layout(layout_dir)
    images = [_write_image(layout_dir, layers, arch, os_name, f"{seed}/index") for os_name, arch in platforms]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": img.digest,
                "size": len(img.manifest),
                "platform": {"architecture": img.architecture, "os": img.os},
            }
            for img in images
        ],
    }
    raw = json.dumps(index, indent=2).encode()
    blob = _write_blob(layout_dir, raw, OCI_INDEX)
    _tag_in_layout(layout_dir, tag, blob)
    return IndexInfo(blob.digest, raw, tuple(images))


def push(
    layout_dir: Path,
    src_tag: str,
    upstream: Upstream,
    name: str,
    tag: str | None = None,
    *,
    all: bool = False,
    format: str | None = None,
    timeout: float = 60.0,
) -> str:
    """`skopeo copy oci:DIR:SRC_TAG docker://HOST/NAME:TAG`; returns the digest skopeo pushed."""
    with tempfile.TemporaryDirectory(prefix="rig-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        auth_file = Path(tmp) / "auth.json"
        auth_file.write_text("{}")
        argv = [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--digestfile",
            str(digestfile),
        ]
        if upstream.push_creds is not None:
            argv += ["--dest-creds", upstream.push_creds]
        if all:
            argv.append("--all")
        if format is not None:
            argv += ["--format", format]
        argv += [
            f"oci:{layout_dir}:{src_tag}",
            f"docker://{upstream.host}/{name}:{tag or src_tag}",
        ]
        run_checked(argv, timeout=timeout, env_extra={"REGISTRY_AUTH_FILE": str(auth_file)})
        return digestfile.read_text().strip()


def _client(upstream: Upstream) -> httpx.Client:
    return httpx.Client(timeout=30, trust_env=False, follow_redirects=False, verify=upstream.httpx_verify())


def _accept_headers(accept: Sequence[str]) -> list[tuple[str, str]]:
    return [("Accept", a) for a in accept]


def get_manifest(
    upstream: Upstream, name: str, ref: str, accept: Sequence[str] = MANIFEST_TYPES
) -> tuple[bytes, str, str]:
    """(body, content type, Docker-Content-Digest) of a manifest, read directly from upstream."""
    headers = _accept_headers(accept) + list(upstream.auth_headers([f"repository:{name}:pull"]).items())
    with _client(upstream) as c:
        r = c.get(f"{upstream.url}/v2/{name}/manifests/{ref}", headers=headers)
    if r.status_code != 200:
        raise RigError(f"GET manifest {name}:{ref} on {upstream.kind}: {r.status_code} {r.text}")
    return (
        r.content,
        r.headers.get("content-type", ""),
        r.headers.get("docker-content-digest", ""),
    )


def add_tags(upstream: Upstream, name: str, source_tag: str, tags: Collection[str]) -> str:
    """PUT the manifest of `source_tag` under every tag in `tags`; returns its digest."""
    body, content_type, digest = get_manifest(upstream, name, source_tag)
    headers = {
        "Content-Type": content_type,
        **upstream.auth_headers([f"repository:{name}:pull,push"]),
    }
    with _client(upstream) as c:
        for tag in tags:
            r = c.put(
                f"{upstream.url}/v2/{name}/manifests/{tag}",
                content=body,
                headers=headers,
            )
            if r.status_code != 201:
                raise RigError(f"PUT manifest {name}:{tag} on {upstream.kind}: {r.status_code} {r.text}")
    return digest


def manifest_digest(upstream: Upstream, name: str, ref: str, accept: Sequence[str] = MANIFEST_TYPES) -> str:
    """The Docker-Content-Digest upstream answers to HEAD on the manifest (credentials as needed)."""
    headers = _accept_headers(accept) + list(upstream.auth_headers([f"repository:{name}:pull"]).items())
    with _client(upstream) as c:
        r = c.head(f"{upstream.url}/v2/{name}/manifests/{ref}", headers=headers)
    digest: str | None = r.headers.get("docker-content-digest")
    if r.status_code != 200 or not digest:
        raise RigError(f"HEAD manifest {name}:{ref} on {upstream.kind}: {r.status_code} {dict(r.headers)}")
    return digest


def add_repos(
    upstream: Upstream,
    source_name: str,
    source_tag: str,
    names: Collection[str],
    tag: str = "latest",
) -> str:
    """Copy `source_name:source_tag` (a single-arch manifest) into each repository in `names`.

    Blobs are cross-repository mounted (`POST …/blobs/uploads/?mount=D&from=SOURCE`), then the
    manifest is PUT as `tag`. Returns the manifest digest. Cheap way to fill `_catalog`.
    """
    body, content_type, digest = get_manifest(upstream, source_name, source_tag)
    manifest = json.loads(body)
    if "layers" not in manifest:
        raise RigError(f"{source_name}:{source_tag} is not a single-arch image manifest")
    blob_digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
    scopes = [f"repository:{source_name}:pull"] + [f"repository:{n}:pull,push" for n in names]
    auth = upstream.auth_headers(scopes)  # one token for all of them
    with _client(upstream) as c:
        for name in names:
            for d in blob_digests:
                r = c.post(
                    f"{upstream.url}/v2/{name}/blobs/uploads/",
                    params={"mount": d, "from": source_name},
                    headers=auth,
                )
                if r.status_code != 201:
                    raise RigError(f"mount {d} into {name} on {upstream.kind}: {r.status_code} {r.text}")
            r = c.put(
                f"{upstream.url}/v2/{name}/manifests/{tag}",
                content=body,
                headers={**auth, "Content-Type": content_type},
            )
            if r.status_code != 201:
                raise RigError(f"PUT manifest {name}:{tag} on {upstream.kind}: {r.status_code} {r.text}")
    return digest


def push_blob(upstream: Upstream, name: str, size: int) -> str:
    """Upload one blob of `size` bytes (a repeating 1 MiB pattern, streamed: memory flat)
    into `name` on `upstream` by the upload API; returns its digest."""
    chunk = bytes(range(256)) * 4096
    assert size % len(chunk) == 0, "size: a whole number of MiB"
    h = hashlib.sha256()
    for _ in range(size // len(chunk)):
        h.update(chunk)
    digest = f"sha256:{h.hexdigest()}"
    with _client(upstream) as c:
        start = c.post(f"{upstream.url}/v2/{name}/blobs/uploads/", headers=upstream.auth_headers())
        assert start.status_code == 202, start.text
        loc = urljoin(upstream.url, start.headers["location"])
        sep = "&" if "?" in loc else "?"
        put = c.put(
            f"{loc}{sep}digest={digest}",
            content=(chunk for _ in range(size // len(chunk))),
            headers={"Content-Type": "application/octet-stream", **upstream.auth_headers()},
            timeout=300,
        )
        assert put.status_code == 201, put.text
    return digest
