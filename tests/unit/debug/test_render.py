"""debug/render.py: OCI documents as text for mitmweb's OCI view (pure; never raises, never hangs)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.debug import render as r
from regproxy.debug import text as ocitext
from regproxy.debug.render import Kind, kind_for, render, render_redirect
from regproxy.debug.text import human_size, short_digest

D1, D2, D3, D4 = ("sha256:" + c * 64 for c in "1234")
AMD64 = {"mediaType": r.OCI_MANIFEST, "digest": D1, "size": 1234, "platform": {"os": "linux", "architecture": "amd64"}}
ARM64 = {
    "mediaType": r.OCI_MANIFEST,
    "digest": D2,
    "size": 1200,
    "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
}
ATTESTATION = {
    "mediaType": r.OCI_MANIFEST,
    "digest": D3,
    "size": 566,
    "platform": {"os": "unknown", "architecture": "unknown"},
    "annotations": {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": D1},
}
INDEX = {"schemaVersion": 2, "mediaType": r.OCI_INDEX, "manifests": [AMD64, ARM64, ATTESTATION]}
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = {
    "schemaVersion": 2,
    "mediaType": r.OCI_MANIFEST,
    "config": {"mediaType": r.OCI_CONFIG, "digest": D4, "size": 1000},
    "layers": [
        {"mediaType": LAYER_GZIP, "digest": D1, "size": 3 * 1024 * 1024},
        {"mediaType": LAYER_GZIP, "digest": D2, "size": 1024 * 1024 - 1000, "annotations": {"note": "second"}},
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}
CONFIG = {
    "created": "2024-01-01T00:00:00Z",
    "architecture": "arm64",
    "variant": "v8",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/bin:/usr/bin", "DB_PASSWORD=hunter2-value"],
        "Entrypoint": ["/docker-entrypoint.sh"],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "WorkingDir": "/srv",
        "User": "nginx",
        "ExposedPorts": {"80/tcp": {}},
        "Labels": {"maintainer": "someone"},
    },
    "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    "history": [
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in /"},
        {"created": "2024-01-01T00:00:01Z", "created_by": '/bin/sh -c #(nop)  CMD ["sh"]', "empty_layer": True},
        {"created": "2024-01-01T00:00:02Z", "created_by": "RUN make\ninstall"},
    ],
}


def doc(value: Any) -> bytes:
    return json.dumps(value, indent=3).encode()


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def row(text: str, first_column: str) -> str:
    (found,) = [line for line in text.splitlines() if line.strip().startswith(first_column + " ")]
    return found


# --- what each kind of document shows ---------------------------------------------------------------


def test_an_index_lists_each_platform_with_its_digest() -> None:
    text = render(doc(INDEX), r.OCI_INDEX)
    assert text is not None
    assert text.startswith("OCI image index: 3 manifests\n")
    amd = row(text, "linux/amd64")
    assert short_digest(D1) in amd and "1.2 KiB" in amd and r.OCI_MANIFEST in amd
    arm = row(text, "linux/arm64/v8")
    assert short_digest(D2) in arm
    att = row(text, "attestation of linux/amd64")
    assert short_digest(D3) in att and "566 B" in att
    assert D1 not in text  # digests are shortened


def test_a_docker_manifest_list_says_so() -> None:
    listing = {**INDEX, "mediaType": r.DOCKER_LIST}
    text = render(doc(listing), r.DOCKER_LIST + "; charset=utf-8")
    assert text is not None and text.startswith("Docker manifest list: 3 manifests")


def test_an_image_manifest_lists_config_and_layers_with_sizes_and_the_total() -> None:
    text = render(doc(MANIFEST), r.OCI_MANIFEST)
    assert text is not None
    assert text.splitlines()[0] == "OCI image manifest: 2 layers, 4.0 MiB in all (config and layers, as stored)"
    (config,) = lines_with(text, "config  ")
    assert short_digest(D4) in config and "1000 B" in config and r.OCI_CONFIG in config
    (first,) = lines_with(text, "layer 1  ")
    assert short_digest(D1) in first and "3.0 MiB" in first and LAYER_GZIP in first
    assert "layer 2 annotations:\n  note: second" in text
    assert "annotations:\n  org.opencontainers.image.created: 2024-01-01T00:00:00Z" in text


def test_a_docker_v2s2_manifest_shows_the_same() -> None:
    v2s2 = {
        "schemaVersion": 2,
        "mediaType": r.DOCKER_MANIFEST,
        "config": {"mediaType": r.DOCKER_CONFIG, "digest": D4, "size": 700},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": D1, "size": 5000}],
    }
    text = render(doc(v2s2), r.DOCKER_MANIFEST)
    assert text is not None
    assert text.startswith("Docker image manifest (v2 schema 2): 1 layer, 5.6 KiB in all")
    assert short_digest(D4) in text and short_digest(D1) in text


def test_an_artifact_manifest_shows_its_type_and_subject() -> None:
    artifact = {**MANIFEST, "artifactType": "application/vnd.example.sbom", "subject": AMD64}
    text = render(doc(artifact), r.OCI_MANIFEST)
    assert text is not None
    assert "artifact type: application/vnd.example.sbom" in text
    assert f"subject: {short_digest(D1)} 1.2 KiB" in text


def test_a_config_shows_platform_commands_env_names_and_history_but_no_env_values() -> None:
    text = render(doc(CONFIG), "application/octet-stream")  # blobs are served untyped
    assert text is not None
    assert text.startswith("Image config: linux/arm64/v8\n")
    assert 'entrypoint: ["/docker-entrypoint.sh"]' in text
    assert 'cmd:        ["nginx", "-g", "daemon off;"]' in text
    assert "env:        PATH, DB_PASSWORD (values elided)" in text
    assert "hunter2" not in text and "/usr/local/bin" not in text
    assert "workdir:    /srv" in text and "user:       nginx" in text and "ports:      80/tcp" in text
    assert "labels:     maintainer" in text and "someone" not in text
    assert "history: 3 steps, 2 with a layer" in text
    assert lines_with(text, "CMD")[0].endswith("(no layer)")
    assert "RUN make install" in text  # one line per step, whatever the document holds


def test_a_typed_config_is_recognised_by_its_media_type() -> None:
    assert kind_for(r.OCI_CONFIG, b"{}") is Kind.CONFIG
    assert kind_for(r.DOCKER_CONFIG, b"") is Kind.CONFIG
    text = render(b'{"architecture": "amd64", "os": "linux"}', r.OCI_CONFIG)
    assert text is not None and text.startswith("Image config: linux/amd64")


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        (
            "https://blobs.example.com/docker/registry/v2/blobs/sha256/ab/abc/data?X-Amz-Signature=s3cr3t",
            "blobs.example.com",
        ),
        ("https://cdn.example.net:8443/x?[redacted]", "cdn.example.net:8443"),
        ("http://[2001:db8::1]:5000/blob", "[2001:db8::1]:5000"),
    ],
)
def test_a_redirect_shows_only_the_host(location: str, shown: str) -> None:
    text = render_redirect(307, location)
    assert text.startswith(f"Redirect 307: the client fetches this from {shown}\n")
    for hidden in ("docker", "X-Amz", "s3cr3t", "redacted", "/blob", "/x"):
        assert hidden not in text


@pytest.mark.parametrize("location", ["/v2/bp/true/blobs/sha256:" + "a" * 64, "http://h:99999/x", "::::", ""])
def test_a_redirect_elsewhere_or_unreadable_names_no_path(location: str) -> None:
    text = render_redirect(302, location)
    assert text.startswith("Redirect 302: ") and "sha256" not in text and "99999" not in text


# --- recognising documents --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "data", "kind"),
    [
        (r.OCI_INDEX, b"", Kind.INDEX),
        (r.DOCKER_LIST.upper(), b"", Kind.INDEX),
        (r.OCI_MANIFEST + "; charset=utf-8", b"", Kind.MANIFEST),
        (r.DOCKER_MANIFEST, b"", Kind.MANIFEST),
        ("application/json", doc(INDEX), Kind.INDEX),
        (None, doc(MANIFEST), Kind.MANIFEST),
        ("application/octet-stream", doc(CONFIG), Kind.CONFIG),
        ("application/octet-stream", b"\x1f\x8b\x08\x00 a gzip layer", None),
        ("application/json", b'{"name": "bp/true", "tags": ["v1"]}', None),
        ("application/json", b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}', None),
        ("text/html", doc(MANIFEST), None),
        ("application/octet-stream", b" " * 100 + doc(CONFIG), None),  # not JSON at a glance
    ],
)
def test_kind_for(content_type: str | None, data: bytes, kind: Kind | None) -> None:
    assert kind_for(content_type, data) is kind


def test_untyped_documents_beyond_the_input_limit_are_not_looked_at() -> None:
    big = doc({**CONFIG, "pad": "x" * r.MAX_INPUT})
    assert kind_for("application/octet-stream", big) is None
    assert render(big, r.OCI_CONFIG) is None


# --- malformed, hostile and huge input: no exception, no hang ---------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'"a string"',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"schemaVersion": 2, "manifests": ',  # cut off
        b"1" * 5000,  # beyond Python's integer digit limit
    ],
)
@pytest.mark.parametrize("content_type", [r.OCI_INDEX, r.OCI_MANIFEST, r.OCI_CONFIG, "application/octet-stream"])
def test_malformed_input_gives_none(data: bytes, content_type: str) -> None:
    assert render(data, content_type) is None


@pytest.mark.parametrize("content_type", [r.OCI_INDEX, r.OCI_MANIFEST, r.OCI_CONFIG])
@pytest.mark.parametrize(
    "value",
    [
        {},
        {"manifests": {"not": "a list"}, "layers": "nope", "config": [1], "history": 7, "rootfs": []},
        {"manifests": [None, 1, "x", [], {"digest": ["unhashable"], "size": "big", "platform": "linux"}]},
        {"config": None, "layers": [None, {"size": -5, "digest": "nocolon"}, {"size": True, "digest": ":"}]},
        {"config": {"size": 10**4000}, "layers": [{"size": 2**70}]},
        {"config": {"Env": [1, None, {"x": 1}], "Entrypoint": {"a": 1}, "Cmd": None, "Labels": ["x"]}},
        {"annotations": {"k": {"deep": [[[[["v"]]]]]}}, "subject": "not a descriptor", "artifactType": 5},
        {"architecture": "\n\t" + "a" * 10_000, "os": None, "history": [None, {"empty_layer": True}]},
    ],
)
def test_odd_shapes_render_without_raising(content_type: str, value: dict[str, Any]) -> None:
    text = render(json.dumps(value).encode(), content_type)
    assert text is not None
    assert all(len(line) < 1000 for line in text.splitlines())


def test_a_deep_annotation_value_is_not_a_crash() -> None:
    deep: Any = "v"
    for _ in range(3000):  # parses (json's limit is higher for objects parsed iteratively) but prints deep
        deep = [deep]
    data = b'{"schemaVersion": 2, "manifests": [], "annotations": {"k": ' + json.dumps(deep).encode() + b"}}"
    render(data, r.OCI_INDEX)  # a text or None; no exception


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


HUGE = {
    "layers": (compact(dict(MANIFEST, layers=[{"digest": D1, "size": i} for i in range(40_000)])), r.OCI_MANIFEST),
    "platforms": (compact({**INDEX, "manifests": [{**AMD64, "annotations": {"k": "v" * 1000}}] * 3000}), r.OCI_INDEX),
    "env and history": (
        compact({**CONFIG, "config": {"Env": [f"V{i}=x" for i in range(20_000)]}, "history": [{}] * 20_000}),
        "application/octet-stream",
    ),
}


@pytest.mark.parametrize("what", HUGE)
def test_huge_documents_are_cut_and_fast(what: str) -> None:
    data, content_type = HUGE[what]
    assert len(data) <= r.MAX_INPUT
    started = time.monotonic()
    text = render(data, content_type)
    assert time.monotonic() - started < 2.0
    assert text is not None
    assert len(text.splitlines()) < 2 * ocitext.MAX_ENTRIES + 20
    assert any(line.startswith("  … and ") and line.endswith(" more") for line in text.splitlines())


def test_the_count_of_what_was_cut_is_said() -> None:
    text = render(HUGE["layers"][0], r.OCI_MANIFEST)
    assert text is not None and text.startswith("OCI image manifest: 40000 layers")
    assert f"  … and {40_000 - ocitext.MAX_ENTRIES} more" in text.splitlines()


def test_long_values_are_clipped_to_one_line() -> None:
    value = {**MANIFEST, "annotations": {"long": "word " * 10_000, "multi": "a\nb\r\nc"}}
    text = render(doc(value), r.OCI_MANIFEST)
    assert text is not None
    (long,) = lines_with(text, "long:")
    assert len(long) <= ocitext.MAX_VALUE + 10 and long.endswith("…")
    assert "  multi: a b c" in text


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "manifests",
                        "layers",
                        "config",
                        "size",
                        "digest",
                        "platform",
                        "os",
                        "architecture",
                        "history",
                        "Env",
                        "rootfs",
                        "annotations",
                        "mediaType",
                        "subject",
                    ]
                ),
                c,
                max_size=6,
            )
        ),
        max_leaves=30,
    )
)
def test_any_json_renders_or_gives_none(value: Any) -> None:
    for ctype in (r.OCI_INDEX, r.OCI_MANIFEST, r.OCI_CONFIG, "application/octet-stream"):
        result = render(json.dumps(value).encode(), ctype)
        assert result is None or isinstance(result, str)


@given(st.binary(max_size=300))
def test_any_bytes_render_or_give_none(data: bytes) -> None:
    for ctype in (r.OCI_INDEX, r.OCI_MANIFEST, None):
        assert render(data, ctype) is None or isinstance(render(data, ctype), str)


# --- the pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"),
     (1 << 50, "over 1024 TiB"), (-1, "?"), (True, "?"), ("12", "?"), (1.5, "?"), (None, "?")],
)  # fmt: skip
def test_human_size(n: object, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("digest", "short"),
    [(D1, "sha256:111111111111"), ("sha512:abc", "sha512:abc"), ("nocolon", "?"), (":x", "?"), ("x:", "?"), (5, "?")],
)
def test_short_digest(digest: object, short: str) -> None:
    assert short_digest(digest) == short
