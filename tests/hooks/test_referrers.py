"""The referrers API (`GET /v2/<name>/referrers/<digest>`) through routing.py and rewrite.py, with canned upstream answers.

The upstreams that run in the end-to-end tests (distribution 2.8) have no referrers API; what an upstream
that has one answers (OCI distribution spec 1.1: an image index of descriptors, `Link` to the next page,
`OCI-Filters-Applied: artifactType` when it filtered) is canned here, as the other hook tests do: it is
routed with its `artifactType` and a token for the repository, passes byte for byte with the registry
headers, its `Link` pages name the local repository, and an upstream 404 (no referrers API) stays a 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hooks.conftest import BACKPLANE, config_text, nginx
from hooks.test_rewrite import answer, sent, upstream_flow
from hooks.test_routing import errors, pull, routed
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.ops.metrics import Metrics
from regproxy.steps.config_loader import Configuration
from regproxy.steps.rewrite import ResponseRewrite
from regproxy.steps.routing import Router
from rig.keys import CAP

CONFIG = config_text(BACKPLANE, nginx())
DIGEST = "sha256:" + "d" * 64
SBOM = "application/vnd.example.sbom.v1"
INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "e" * 64,
                "size": 1234,
                "artifactType": SBOM,
                "annotations": {"org.opencontainers.image.created": "2026-12-07T00:00:00Z"},
            }
        ],
    },
    indent=3,  # an upstream's own formatting: the bytes must pass as they are
).encode()


@pytest.fixture
def rewriter(config: Configuration, metrics: Metrics) -> Iterator[ResponseRewrite]:
    rr = ResponseRewrite(config, metrics)
    with taddons.context(rr):
        yield rr


@pytest.fixture
def router(config: Configuration) -> Iterator[Router]:
    addon = Router(config)
    with taddons.context(addon):
        yield addon


def test_a_referrers_request_is_routed_with_only_its_artifact_type(router: Router, config: Configuration) -> None:
    path = f"/v2/bp/true/referrers/{DIGEST}?artifactType={SBOM.replace('/', '%2F')}&n=5&evil=1"
    f, st = routed(router, path, headers=[pull(config, "bp/", "bp/true")])
    assert f.response is None and st.kind == "upstream"
    assert (
        f.request.url
        == f"http://127.0.0.1:5001/v2/backplane/true/referrers/{DIGEST}?artifactType=application%2Fvnd.example.sbom.v1"
    )


def test_a_referrers_request_needs_a_token_for_its_repository(router: Router, config: Configuration) -> None:
    f, _ = routed(router, f"/v2/bp/true/referrers/{DIGEST}")
    assert f.response is not None and f.response.status_code == 401
    assert 'scope="repository:bp/true:pull"' in f.response.headers["www-authenticate"]
    f, _ = routed(router, f"/v2/bp/true/referrers/{DIGEST}", headers=[pull(config, "bp/", "bp/other")])
    assert f.response is not None and f.response.status_code == 401 and errors(f) == ["UNAUTHORIZED"]


def test_a_capability_mappings_referrers_go_to_its_upstream_repository(router: Router, config: Configuration) -> None:
    name = f"{CAP}/nginx"
    f, _ = routed(router, f"/v2/{name}/referrers/{DIGEST}", headers=[pull(config, name, name, upstream_token=None)])
    assert f.request.url == f"http://127.0.0.1:5003/v2/private/nginx/referrers/{DIGEST}"


def test_a_referrers_answer_passes_byte_for_byte_with_its_headers(
    rewriter: ResponseRewrite, config: Configuration
) -> None:
    f, st = upstream_flow(config, f"/referrers/{DIGEST}")
    headers = {
        "Content-Type": "application/vnd.oci.image.index.v1+json",
        "Content-Length": str(len(INDEX)),
        "OCI-Filters-Applied": "artifactType",
        "Docker-Distribution-Api-Version": "registry/2.0",
        "Link": f'</v2/backplane/true/referrers/{DIGEST}?artifactType={SBOM}&last=x>; rel="next"',
        "X-Request-Id": "upstream-identity",
        "Set-Cookie": "s=1",
    }
    resp = answer(rewriter, f, 200, INDEX, headers)
    assert st.streamed and resp.stream is True and resp.content == INDEX  # streamed as it comes: no rewrite
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert resp.headers["Link"] == f'</v2/bp/true/referrers/{DIGEST}?artifactType={SBOM}&last=x>; rel="next"'
    assert "x-request-id" not in resp.headers and "set-cookie" not in resp.headers


def test_absolute_referrers_links_name_the_local_repository_or_go(
    rewriter: ResponseRewrite, config: Configuration
) -> None:
    f, _ = upstream_flow(config, f"/referrers/{DIGEST}", name=f"{CAP}/nginx")
    links = [
        f'<http://127.0.0.1:5003/v2/private/nginx/referrers/{DIGEST}?last=a>; rel="next"',
        f'<https://elsewhere.example/v2/private/nginx/referrers/{DIGEST}>; rel="next"',
    ]
    resp = answer(rewriter, f, 200, INDEX, http.Headers([(b"Link", v.encode()) for v in links]))
    assert resp.headers.get_all("link") == [f'</v2/{CAP}/nginx/referrers/{DIGEST}?last=a>; rel="next"']
    assert b"private/nginx" not in b"".join(v for _, v in resp.headers.fields)


def test_an_upstream_without_the_referrers_api_is_a_404_the_client_falls_back_on(
    rewriter: ResponseRewrite, config: Configuration
) -> None:
    f, _ = upstream_flow(config, f"/referrers/{DIGEST}")
    resp = answer(rewriter, f, 404, b'{"errors":[{"code":"NAME_UNKNOWN","detail":{"name":"backplane/true"}}]}')
    assert resp.status_code == 404
    body = sent(resp, b"")
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN" and b"backplane" not in body


def test_an_artifact_manifest_passes_with_oci_subject_and_its_digest(
    rewriter: ResponseRewrite, config: Configuration
) -> None:
    """An OCI 1.1 registry names an artifact's subject in `OCI-Subject` (distribution 2.8 sends none): it passes."""
    body = json.dumps({"schemaVersion": 2, "artifactType": SBOM, "subject": {"digest": DIGEST}}).encode()
    f, st = upstream_flow(config, "/manifests/sbom")
    headers = {
        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
        "Docker-Content-Digest": "sha256:" + "f" * 64,
        "OCI-Subject": DIGEST,
        "ETag": '"sha256:' + "f" * 64 + '"',
        "Server": "registry/3",
    }
    resp = answer(rewriter, f, 200, body, headers)
    assert st.streamed and resp.content == body
    assert resp.headers["OCI-Subject"] == DIGEST and resp.headers["Docker-Content-Digest"] == "sha256:" + "f" * 64
    assert resp.headers["ETag"] == headers["ETag"] and "server" not in resp.headers
