"""Repository names, references and route parsing (protocol/names.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.protocol.errors import RegistryError, for_upstream_status
from regproxy.protocol.names import (
    DIGEST_ALGORITHMS,
    MAX_NAME_LENGTH,
    TAG_RE,
    Route,
    RouteKind,
    is_valid_digest,
    is_valid_name,
    is_valid_reference,
    looks_like_capability,
    parse_route,
)
from rig.keys import CAP as UUID

DIGEST = "sha256:" + "a" * 64
UPLOAD_DOTS_BUG = "BUG: `.`/`..` as the upload id is accepted as a route (a dot segment after the name)"


@pytest.mark.parametrize(
    "name",
    ["a", "a/b", "my-cool-app", "a__b", "x.y", "a---b", f"{UUID}/nginx", "library/nginx", "a0/b-c/d.e_f", "0"],
)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "Nginx",
        "a/",
        "/a",
        "a//b",
        ".",
        "..",
        "a/../b",
        "a/./b",
        "-a",
        "a-",
        "a_",
        "_a",
        "a.",
        "a___b",
        "a..b",
        "a._b",
        "a%2fb",
        "a\\b",
        "a b",
        "a:b",
        "a\x00b",
        "127.0.0.1:5000/foo",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


def test_name_length_limit() -> None:
    assert is_valid_name("a" * MAX_NAME_LENGTH)
    assert not is_valid_name("a" * (MAX_NAME_LENGTH + 1))
    assert not is_valid_name("a/" * 127 + "ab")  # 256 characters of valid components


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "1", "A-b_c.d", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert is_valid_reference(tag)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "a b", "a%20"])
def test_invalid_tags(tag: str) -> None:
    assert not is_valid_reference(tag)


@pytest.mark.parametrize(
    "digest",
    [DIGEST, "sha256:" + "0123456789abcdef" * 4, "sha384:" + "0" * 96, "sha512:" + "0" * 128, "blake3:" + "f" * 64],
)
def test_valid_digests(digest: str) -> None:
    assert is_valid_digest(digest)
    assert is_valid_reference(digest)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:",
        "sha256:zzz",
        "sha256:" + "a" * 31,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "z" * 64,  # not hex: distribution 2.8 answers 500 to a manifest GET for it
        "sha256:" + "A" * 64,  # upper-case hex: not the canonical form
        "sha256:" + "a" * 300,
        "SHA256:" + "a" * 64,
        ":" + "a" * 64,
        "sha256" + "a" * 64,
        "sha256::" + "a" * 64,
        "sha512:" + "a" * 64,  # the right hex for another algorithm
        "sha384:" + "a" * 64,
        "blake3:" + "a" * 128,
        "md5:" + "a" * 32,  # unsupported algorithms
        "sha1:" + "a" * 40,
        "foo:" + "a" * 64,
        "multi+part.algo_x:" + "A=_-" * 8,  # the OCI grammar, but no registered algorithm
        "sha256:" + "a" * 64 + "\n",
    ],
)
def test_invalid_digests(digest: str) -> None:
    assert not is_valid_digest(digest)
    assert is_valid_reference(digest) == (TAG_RE.fullmatch(digest) is not None)  # "sha256aa…" is a tag


@pytest.mark.parametrize("segment", [UUID, UUID.replace("-", ""), "abcdefghij0123456789", "a1" * 12])
def test_capability_like_segments(segment: str) -> None:
    assert looks_like_capability(segment)


@pytest.mark.parametrize("segment", ["nginx", "library", "abcdefghijklmnopqrstuvwxyz", "a1b2", "team-42"])
def test_ordinary_segments_are_not_capabilities(segment: str) -> None:
    assert not looks_like_capability(segment)


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_ping_route(path: str) -> None:
    assert parse_route(path) == Route(RouteKind.PING)


def test_catalog_route() -> None:
    route = parse_route("/v2/_catalog")
    assert route == Route(RouteKind.CATALOG)
    assert not route.is_repository


def test_manifest_by_tag() -> None:
    assert parse_route("/v2/bp/app/manifests/latest") == Route(
        RouteKind.MANIFEST, "bp/app", "latest", "/manifests/latest"
    )


def test_manifest_by_digest() -> None:
    route = parse_route(f"/v2/a/manifests/{DIGEST}")
    assert (route.kind, route.name, route.reference) == (RouteKind.MANIFEST, "a", DIGEST)
    assert route.is_repository


def test_blob_route() -> None:
    assert parse_route(f"/v2/a/b/blobs/{DIGEST}") == Route(RouteKind.BLOB, "a/b", DIGEST, f"/blobs/{DIGEST}")


def test_upload_start_route() -> None:
    assert parse_route("/v2/a/blobs/uploads/") == Route(RouteKind.UPLOAD, "a", "", "/blobs/uploads/")


def test_upload_route_without_trailing_slash() -> None:
    assert parse_route("/v2/a/blobs/uploads") == Route(RouteKind.UPLOAD, "a", "", "/blobs/uploads")


def test_upload_session_route() -> None:
    route = parse_route("/v2/a/b/blobs/uploads/3f1c-uuid")
    assert (route.kind, route.name, route.reference, route.suffix) == (
        RouteKind.UPLOAD,
        "a/b",
        "3f1c-uuid",
        "/blobs/uploads/3f1c-uuid",
    )


def test_tags_list_route() -> None:
    assert parse_route("/v2/a/b/tags/list") == Route(RouteKind.TAGS, "a/b", "", "/tags/list")


def test_referrers_route() -> None:
    assert parse_route(f"/v2/a/referrers/{DIGEST}") == Route(RouteKind.REFERRERS, "a", DIGEST, f"/referrers/{DIGEST}")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v2/a/manifests/manifests/v1", "a/manifests"),
        ("/v2/manifests/manifests/v1", "manifests"),
        (f"/v2/blobs/blobs/{DIGEST}", "blobs"),
        (f"/v2/a/blobs/manifests/{DIGEST}", "a/blobs"),
        ("/v2/x/blobs/uploads/manifests/v1", "x/blobs/uploads"),
        ("/v2/a/blobs/uploads/blobs/uploads/", "a/blobs/uploads"),
    ],
)
def test_names_containing_route_words(path: str, name: str) -> None:
    assert parse_route(path).name == name


def test_name_containing_tags_list() -> None:
    assert parse_route("/v2/tags/list/tags/list").name == "tags/list"


@pytest.mark.parametrize(
    "path",
    ["/", "/v1/a/manifests/x", "/v2x", "/token", "/v2/a", "/v2/a/manifests", "/v2/a/unknown/x", "/v2/_catalog/"],
)
def test_non_api_paths_are_404_name_unknown(path: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_route(path)
    assert (info.value.status, info.value.code) == (404, "NAME_UNKNOWN")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a%2fb/manifests/latest",
        "/v2/a%2Fb/manifests/latest",
        "/v2/%2e%2e/manifests/latest",
        "/v2/a\\b/manifests/latest",
        "/v2/a/manifests/lat%65st",
        "/v2/a b/manifests/latest",
        "/v2/a\x00/manifests/latest",
        "/v2/é/manifests/latest",
    ],
)
def test_unsafe_characters_are_404(path: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_route(path)
    assert info.value.status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/v2/A/manifests/latest",
        "/v2/a/../b/manifests/latest",
        "/v2/../manifests/latest",
        "/v2/./a/manifests/latest",
        "/v2//a/manifests/latest",
        "/v2/a//b/manifests/latest",
        "/v2/-a/manifests/latest",
        f"/v2/a/../../x/blobs/{DIGEST}",
        "/v2/../blobs/uploads/",
    ],
)
def test_bad_names_are_400_name_invalid(path: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_route(path)
    assert (info.value.status, info.value.code) == (400, "NAME_INVALID")


def test_dotted_name_before_tags_list_is_name_invalid() -> None:
    with pytest.raises(RegistryError) as info:
        parse_route("/v2/a/../tags/list")
    assert info.value.code == "NAME_INVALID"


def test_too_long_name_is_name_invalid() -> None:
    with pytest.raises(RegistryError) as info:
        parse_route("/v2/" + "a" * 256 + "/manifests/latest")
    assert info.value.code == "NAME_INVALID"


BAD_REFERENCES = [
    ".INVALID_MANIFEST_NAME",  # what the OCI conformance suite's pull tests ask for
    ".x",
    "-x",
    "a" * 129,
    "..",
    ".",
    "sha256:",
    "sha256:short",
    "sha256:zzz",
    "sha256:" + "z" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "A" * 64,
    "sha512:" + "a" * 64,
    "md5:" + "a" * 32,
    "foo:" + "a" * 64,
    "a:b",
    "=",
]


@pytest.mark.parametrize("ref", BAD_REFERENCES)
def test_bad_manifest_reference_is_404_manifest_unknown(ref: str) -> None:
    """Neither a tag nor a digest: no manifest has it (OCI pull: 404 for GET and HEAD), answered here."""
    with pytest.raises(RegistryError) as info:
        parse_route(f"/v2/a/manifests/{ref}")
    assert (info.value.status, info.value.code) == (404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("name", ["a", "bp/app", f"{UUID}/app", "library/nginx"])
def test_bad_manifest_reference_answer_does_not_depend_on_the_name(name: str) -> None:
    with pytest.raises(RegistryError) as here:
        parse_route(f"/v2/{name}/manifests/.INVALID_MANIFEST_NAME")
    with pytest.raises(RegistryError) as there:
        parse_route("/v2/x/manifests/.INVALID_MANIFEST_NAME")
    assert (here.value.status, here.value.body()) == (there.value.status, there.value.body())
    # The same bytes as the answer to a missing manifest an upstream answered 404 to.
    assert here.value.body() == for_upstream_status(404, RouteKind.MANIFEST.value).body()


def test_bad_name_is_decided_before_a_bad_reference() -> None:
    with pytest.raises(RegistryError) as info:
        parse_route("/v2/A/manifests/.INVALID_MANIFEST_NAME")
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize(
    "ref", [DIGEST, "sha512:" + "0" * 128, "latest", "v1.2.3", "_x", "A-b_c.d", "a" * 128, "sha256-" + "a" * 64]
)
def test_good_manifest_references_route(ref: str) -> None:
    route = parse_route(f"/v2/a/manifests/{ref}")
    assert (route.kind, route.reference, route.suffix) == (RouteKind.MANIFEST, ref, f"/manifests/{ref}")


@pytest.mark.parametrize("kind", ["blobs", "referrers"])
@pytest.mark.parametrize("ref", ["latest", "..", ".", *[r for r in BAD_REFERENCES if ":" in r]])
def test_bad_blob_or_referrers_digest_is_digest_invalid(kind: str, ref: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_route(f"/v2/a/{kind}/{ref}")
    assert (info.value.status, info.value.code) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize("kind", ["blobs", "referrers"])
@pytest.mark.parametrize("digest", [DIGEST, "sha384:" + "1" * 96, "sha512:" + "2" * 128, "blake3:" + "3" * 64])
def test_blob_and_referrers_routes_take_every_known_algorithm(kind: str, digest: str) -> None:
    route = parse_route(f"/v2/a/{kind}/{digest}")
    assert (route.reference, route.suffix) == (digest, f"/{kind}/{digest}")


@pytest.mark.parametrize("ref", ["..", "."])
def test_dot_segment_upload_reference_is_refused(ref: str) -> None:
    with pytest.raises(RegistryError):
        parse_route(f"/v2/a/blobs/uploads/{ref}")


# --- properties ---

_alnum = st.text(alphabet="abcxyz0189", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])
_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
valid_names = st.lists(_component, min_size=1, max_size=5).map("/".join).filter(lambda n: len(n) <= MAX_NAME_LENGTH)

_pieces = list("abz09._-/:%\\=+ ") + ["..", "/./", "/../", "//", "%2f", "%2e", "manifests", "blobs", "uploads", "\x00"]
_junk = st.lists(st.sampled_from(_pieces), max_size=12).map("".join)
_suffixes = st.sampled_from(
    [
        "/manifests/latest",
        f"/manifests/{DIGEST}",
        f"/blobs/{DIGEST}",
        "/blobs/uploads/",
        "/tags/list",
        f"/referrers/{DIGEST}",
    ]
)
route_like_paths = st.one_of(
    st.text(max_size=60).map(lambda s: "/v2/" + s),
    _junk.map(lambda s: "/v2/" + s),
    st.tuples(_junk, _suffixes).map(lambda t: "/v2/" + t[0] + t[1]),
    st.tuples(valid_names, _junk, _suffixes).map(lambda t: f"/v2/{t[0]}{t[1]}{t[2]}"),
    st.text(max_size=40),
)


@given(route_like_paths)
def test_parse_route_returns_only_valid_names(path: str) -> None:
    try:
        route = parse_route(path)
    except RegistryError as e:
        assert (e.status, e.code) in {
            (400, "NAME_INVALID"),
            (400, "DIGEST_INVALID"),
            (404, "NAME_UNKNOWN"),
            (404, "MANIFEST_UNKNOWN"),
            (404, "BLOB_UPLOAD_UNKNOWN"),
        }
        return
    if route.is_repository:
        assert is_valid_name(route.name)
        if route.kind is RouteKind.MANIFEST:
            assert is_valid_reference(route.reference)
        if route.kind in (RouteKind.BLOB, RouteKind.REFERRERS):
            assert is_valid_digest(route.reference)
        assert "%" not in route.name and "\\" not in route.name and "\x00" not in route.name
        assert path == f"/v2/{route.name}{route.suffix}"
    else:
        assert route.kind in (RouteKind.PING, RouteKind.CATALOG)


@given(route_like_paths)
def test_percent_backslash_and_nul_never_route(path: str) -> None:
    if "%" in path or "\\" in path or "\x00" in path:
        with pytest.raises(RegistryError):
            parse_route(path)


@given(_junk, _suffixes)
def test_dot_segments_in_names_never_route(junk: str, suffix: str) -> None:
    path = f"/v2/{junk}{suffix}"
    if any(seg in (".", "..") for seg in f"/v2/{junk}".split("/")):
        with pytest.raises(RegistryError):
            parse_route(path)


@given(valid_names)
def test_valid_name_round_trips_through_manifest_route(name: str) -> None:
    assert parse_route(f"/v2/{name}/manifests/latest").name == name


@given(valid_names)
def test_valid_name_round_trips_through_blob_route(name: str) -> None:
    route = parse_route(f"/v2/{name}/blobs/{DIGEST}")
    assert (route.kind, route.name, route.reference) == (RouteKind.BLOB, name, DIGEST)


@given(valid_names)
def test_valid_name_round_trips_through_upload_route(name: str) -> None:
    route = parse_route(f"/v2/{name}/blobs/uploads/")
    assert (route.kind, route.name) == (RouteKind.UPLOAD, name)


@given(valid_names)
def test_valid_name_round_trips_through_tags_route(name: str) -> None:
    assert parse_route(f"/v2/{name}/tags/list") == Route(RouteKind.TAGS, name, "", "/tags/list")


@given(st.text(max_size=40))
def test_valid_names_are_normalised(name: str) -> None:
    if is_valid_name(name):
        assert name == name.lower()
        assert "" not in name.split("/")
        assert not any(seg in (".", "..") for seg in name.split("/"))


@given(valid_names)
def test_generated_names_are_valid(name: str) -> None:
    assert is_valid_name(name)


_ref_pieces = [*"aAz09._-:=+", "sha256:", "sha512:", "md5:", "0" * 32, "f" * 64, "..", ".INVALID"]
references = st.one_of(
    st.lists(st.sampled_from(_ref_pieces), min_size=1, max_size=8).map("".join),
    st.text(alphabet="abcdef0123456789ABCDEFxyz:", min_size=1, max_size=140),
)


@given(valid_names, references)
def test_a_manifest_reference_routes_or_is_404_manifest_unknown(name: str, ref: str) -> None:
    """A safe-looking reference is never a 400: it routes (valid) or names no manifest (404)."""
    try:
        route = parse_route(f"/v2/{name}/manifests/{ref}")
    except RegistryError as e:
        assert (e.status, e.code) == (404, "MANIFEST_UNKNOWN")
        assert not is_valid_reference(ref)
        return
    assert (route.name, route.reference) == (name, ref)
    assert is_valid_reference(ref)


@given(references)
def test_digests_are_exactly_algorithm_and_lower_hex_of_its_length(ref: str) -> None:
    algorithm, sep, encoded = ref.partition(":")
    expected = (
        sep == ":"
        and algorithm in DIGEST_ALGORITHMS
        and len(encoded) == DIGEST_ALGORITHMS[algorithm]
        and all(c in "0123456789abcdef" for c in encoded)
    )
    assert is_valid_digest(ref) == expected
