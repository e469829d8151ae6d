"""debug/contentview.py: the OCI view as mitmproxy picks and runs it (`contentviews.prettify_message`, as mitmweb does)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow
from regproxy.debug import contentview as ociview
from regproxy.debug.render import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

D1 = "sha256:" + "1" * 64
INDEX = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": D1, "size": 500, "platform": {"os": "linux", "architecture": "s390x"}}
    ],
}
MANIFEST = {
    "schemaVersion": 2,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 10},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D1, "size": 2048}],
}
IMAGE_CONFIG = {"architecture": "riscv64", "os": "linux", "config": {"Env": ["K=v"]}, "rootfs": {"diff_ids": []}}


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    ociview.register()
    with taddons.context():  # prettify_message reads an option
        yield


def shown(status: int, body: bytes, headers: dict[str, str], view: str = "auto") -> contentviews.ContentviewResult:
    f = tflow.tflow(resp=True)
    assert f.response is not None
    f.response = http.Response.make(status, body, headers)
    return contentviews.prettify_message(f.response, f, view)


@pytest.mark.parametrize(
    ("content_type", "value", "expected"),
    [
        (OCI_INDEX, INDEX, "linux/s390x"),
        (DOCKER_LIST, {**INDEX, "mediaType": DOCKER_LIST}, "Docker manifest list: 1 manifest"),
        (OCI_MANIFEST, MANIFEST, "OCI image manifest: 1 layer"),
        (DOCKER_MANIFEST + "; charset=utf-8", MANIFEST, "Docker image manifest (v2 schema 2): 1 layer"),
        ("application/octet-stream", IMAGE_CONFIG, "Image config: linux/riscv64"),
    ],
)
def test_oci_documents_get_the_oci_view_by_themselves(content_type: str, value: object, expected: str) -> None:
    result = shown(200, json.dumps(value).encode(), {"Content-Type": content_type})
    assert result.view_name == "OCI" and expected in result.text


@pytest.mark.parametrize(
    ("content_type", "body", "view"),
    [
        ("application/json", b'{"name": "bp/true", "tags": ["v1", "v2"]}', "JSON"),
        ("application/json; charset=utf-8", b'{"errors": [{"code": "NAME_UNKNOWN"}]}', "JSON"),
        ("application/octet-stream", b"\x1f\x8b\x08\x00layer bytes", "Raw"),
    ],
)
def test_other_bodies_keep_mitmproxys_views(content_type: str, body: bytes, view: str) -> None:
    assert shown(200, body, {"Content-Type": content_type}).view_name == view


def test_a_redirect_says_where_it_goes_host_only() -> None:
    result = shown(
        307, b"", {"Location": "https://blobs.example.net/docker/registry/v2/blobs/sha256/ab/data?[redacted]"}
    )
    assert result.view_name == "OCI"
    assert "blobs.example.net" in result.text and "docker/registry" not in result.text and "redacted" not in result.text


def test_a_malformed_document_falls_back_without_an_error() -> None:
    result = shown(200, b'{"schemaVersion": 2, "manifests": [', {"Content-Type": OCI_INDEX})
    assert result.view_name == "OCI" and result.syntax_highlight != "error"
    assert result.text.startswith('{"schemaVersion"')  # as it is


def test_chosen_by_hand_for_plain_json_it_shows_json() -> None:
    result = shown(200, b'{"name":"bp/true","tags":["v1"]}', {"Content-Type": "application/json"}, view="OCI")
    assert result.view_name == "OCI" and json.loads(result.text) == {"name": "bp/true", "tags": ["v1"]}


def test_registering_twice_keeps_one_view() -> None:
    ociview.register()
    ociview.register()
    assert [name for name in contentviews.registry if name == "oci"] == ["oci"]
