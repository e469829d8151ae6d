"""OCI 1.1 artifacts through the proxy with oras-py, and the referrers API's fallback to the tag schema.

Each test runs on every `side` (e2e/artifacts_rig.py: plain-HTTP and HTTPS token upstreams, with and without
the cache). The artifact (rig/artifacts.py) has `artifactType`, a `subject` (an image on the upstream), a
config of a non-image media type and three layers of other media types; oras-py pushes it to the upstream
and pulls it through the proxy. What distribution 2.8 does with it, asserted below: it stores and serves the
manifest's bytes as pushed (its digest is the bytes'), but knows neither `subject` nor `artifactType`: it
answers no `OCI-Subject` header to the push and has no referrers API (`GET /v2/<name>/referrers/<digest>`
is 404). So a client finds the artifact through the tag schema (`sha256-<subject hex>`), which it pushed
beside it, and through the proxy it does so just the same: the proxy sends the referrers request upstream
(with `artifactType`), answers the 404 as a registry error, and the fallback tag is an ordinary manifest.
The rewrite of a referrers answer from an upstream that has the API is tested in tests/hooks/test_rewrite.py.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from e2e.artifacts_rig import Side, side
from rig import artifacts, images

pytestmark = pytest.mark.e2e
__all__ = ["side"]

SBOM_TYPE = "application/vnd.example.sbom.v1"
_seq = itertools.count()


def push_subject_and_artifact(s: Side, tmp: Path, repo: str) -> tuple[str, artifacts.Artifact]:
    """An image platform/REPO:v1 and an artifact about it (tag `sbom`): (the image's digest, the artifact)."""
    seed = f"{s.name}-{repo}-{next(_seq)}"
    images.build_image(tmp / "layout", "v1", layers=(1024,), seed=seed)
    digest = images.push(tmp / "layout", "v1", s.up, f"platform/{repo}", "v1")
    body, content_type, _ = images.get_manifest(s.up, f"platform/{repo}", "v1")
    subject = {"mediaType": content_type, "digest": digest, "size": len(body)}
    art = artifacts.build_artifact(subject, SBOM_TYPE, seed)
    artifacts.push_artifact(s.upstream_oras(f"platform/{repo}"), f"platform/{repo}", "sbom", art)
    return digest, art


def test_oras_pulls_an_artifact_byte_identical_with_the_registry_headers(side: Side, tmp_path: Path) -> None:
    _, art = push_subject_and_artifact(side, tmp_path, "art")
    up = side.upstream_oras("platform/art").get_manifest("platform/art", "sbom")
    assert up.status_code == 200 and up.content == art.manifest  # distribution 2.8 keeps the bytes
    o = side.proxy_oras()
    r = o.get_manifest("a/art", "sbom")
    assert r.status_code == 200 and r.content == art.manifest
    assert r.headers["Docker-Content-Digest"] == art.digest
    assert r.headers["Content-Type"] == artifacts.OCI_MANIFEST
    assert int(r.headers["Content-Length"]) == len(art.manifest)
    assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    for header in ("Etag", "Docker-Content-Digest", "Content-Type"):
        assert r.headers.get(header) == up.headers.get(header), header
    assert "OCI-Subject" not in up.headers and "OCI-Subject" not in r.headers  # 2.8 does not know `subject`
    doc: dict[str, Any] = json.loads(r.content)
    assert (
        doc["artifactType"] == SBOM_TYPE and doc["subject"]["digest"] == json.loads(art.manifest)["subject"]["digest"]
    )
    out = tmp_path / "pulled"
    files = o.pull("a/art", "sbom", out)
    assert sorted(p.name for p in files) == sorted(name for name, _, _ in art.layers)
    for name, data, _ in art.layers:
        assert (out / name).read_bytes() == data
    config = o.request("GET", "a/art", f"blobs/{doc['config']['digest']}")
    assert config.status_code == 200 and config.content == art.config
    assert config.headers["Docker-Content-Digest"] == doc["config"]["digest"]


def test_referrers_fall_back_to_the_tag_schema_through_the_proxy(side: Side, tmp_path: Path) -> None:
    digest, art = push_subject_and_artifact(side, tmp_path, "refs")
    direct = side.upstream_oras("platform/refs").request("GET", "platform/refs", f"referrers/{digest}")
    assert direct.status_code == 404  # distribution 2.8 itself: no referrers API
    o = side.proxy_oras()
    side.up.clear_access_log()
    status, index = o.discover("a/refs", digest, SBOM_TYPE)
    assert status == 404  # distribution 2.8 has no referrers API: the proxy says so as a registry error
    sent = [e.path for e in side.up.access_log() if "/referrers/" in e.path]
    assert sent == [f"/v2/platform/refs/referrers/{digest}?artifactType={SBOM_TYPE.replace('/', '%2F')}"]
    assert [m["digest"] for m in index["manifests"]] == [art.digest]
    assert index["manifests"][0]["artifactType"] == SBOM_TYPE
    fallback = o.get_manifest("a/refs", digest.replace(":", "-", 1))
    assert fallback.content == art.referrers_index
    r = o.request("GET", "a/refs", f"referrers/{digest}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    pulled = o.get_manifest("a/refs", art.digest)
    assert pulled.status_code == 200 and pulled.content == art.manifest
    status, none = o.discover("a/refs", digest, "application/vnd.example.other")
    assert status == 404 and none["manifests"] == []


def test_a_referrers_request_with_a_bad_digest_never_reaches_the_upstream(side: Side) -> None:
    o = side.proxy_oras()
    side.up.clear_access_log()
    r = o.request("GET", "a/refs", "referrers/sha256:1234")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert not [e for e in side.up.access_log() if "/referrers/" in e.path]
