"""The OCI distribution spec's pull endpoints, case by case, through a real mitmdump in front of real
docker-registry (distribution 2.8) upstreams: status and error code of every answer.

What the spec (and its conformance suite, conformance/01_pull_test.go and 03_discovery_test.go)
asks for, endpoint by endpoint:
- `GET /v2/`: 200 with a valid token, else 401 with a challenge; `Docker-Distribution-Api-Version`.
- `GET`/`HEAD /v2/<name>/manifests/<reference>`: 200 with `Docker-Content-Digest`; 404 for a missing
  one, and for a reference that is neither a tag nor a digest (the suite asks for
  `.INVALID_MANIFEST_NAME`): `MANIFEST_UNKNOWN`. The proxy answers those itself, before any token or
  mapping is looked at (the same bytes whatever the name), and never sends them upstream:
  distribution 2.8 answers 500 to `manifests/sha256:<not hex>` or an algorithm it does not know.
- `GET`/`HEAD /v2/<name>/blobs/<digest>`: 200 (206 for a Range); 404 `BLOB_UNKNOWN` for a missing
  one; 400 `DIGEST_INVALID` for something that is not a digest (answered here too).
- `GET /v2/<name>/tags/list[?n=&last=]`: 200, `name` the local name, tags in lexical order, `n=0`
  an empty list without `Link`; 404 `NAME_UNKNOWN` for a missing repository.
- `GET /v2/<name>/referrers/<digest>[?artifactType=]`: 400 for an invalid digest; a registry without
  the referrers API (distribution 2.8) answers 404, which clients take as "use the tag schema".
- A Range past a blob's end: 416 `SIZE_INVALID` with `Content-Range: bytes */<size>`, answered whole
  even though distribution announces the blob's length and sends a short error body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qsl

import httpx
import pytest
from rig import proxy, registry, standard
from rig.keys import CAP
from rig.standard import APP, MANY_TAGS

pytestmark = pytest.mark.e2e

KEY_HEX = "5e" * 16 + "a7" * 16
NS = {"anonymous": "conf", "token": "conftok"}
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
]
MISSING = "sha256:" + "0" * 64
# Neither a tag nor a digest of a known algorithm; in the comments, what distribution 2.8 answers
# when asked for the manifest directly.
BAD_REFERENCES = [
    ".INVALID_MANIFEST_NAME",  # 404 text/plain (no route)
    "sha256:zzz",  # 500
    "sha256:",  # 404 text/plain
    "sha256:" + "z" * 64,  # 500
    "sha256:" + "a" * 63,  # 500
    "sha256:" + "A" * 64,  # 500
    "sha512:" + "a" * 64,  # 500
    "md5:" + "a" * 32,  # 500
    "foo:" + "a" * 64,  # 500
]
BAD_DIGESTS = ["sha256:zzz", "sha256:" + "z" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "latest"]


@pytest.fixture(scope="module")
def rp(upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[proxy.ProxyProc]:
    anon, tok = upstreams["anonymous"], upstreams["token"]
    config = {
        "secretkey": KEY_HEX,
        "proxies": {
            "conf/": {"registry": anon.url, "remote": "platform"},
            "conftok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
            f"{CAP}/app": {"registry": anon.url, "remote": APP},
        },
    }
    p = proxy.start_proxy(config, tmp_path_factory.mktemp("conformance"))
    yield p
    p.stop()


class Client(httpx.Client):
    """An httpx client on the proxy that gets (and keeps) a pull token per name from its token endpoint."""

    def __init__(self, rp: proxy.ProxyProc) -> None:
        super().__init__(base_url=rp.url, timeout=30, trust_env=False)
        self.tokens: dict[str, str] = {}

    def token(self, name: str) -> str:
        if name not in self.tokens:
            r = self.get("/token", params={"scope": f"repository:{name}:pull"})
            assert r.status_code == 200, r.text
            self.tokens[name] = r.json()["token"]
        return self.tokens[name]


@pytest.fixture(scope="module")
def http(rp: proxy.ProxyProc) -> Iterator[Client]:
    with Client(rp) as c:
        yield c


def call(
    http: Client,
    method: str,
    path: str,
    name: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> httpx.Response:
    """`method path` through the proxy, with a token for `name` (none if None) and, for manifests,
    the Accept lines a client sends."""
    hdrs = list(headers)
    if "/manifests/" in path and not any(k.lower() == "accept" for k, _ in hdrs):
        hdrs += MANIFEST_ACCEPT
    if name is not None:
        hdrs.append(("Authorization", f"Bearer {http.token(name)}"))
    return http.request(method, path, headers=hdrs)


def expect_error(r: httpx.Response, status: int, code: str) -> None:
    """An OCI error answer: status, JSON error body with `code` (GET), no body (HEAD)."""
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert r.headers["content-type"].startswith("application/json")
    if r.request.method == "HEAD":
        assert r.content == b""
        return
    assert int(r.headers["content-length"]) == len(r.content)
    errors = r.json()["errors"]
    assert [e["code"] for e in errors] == [code], errors
    assert set(errors[0]) <= {"code", "message", "detail"}
    assert b"platform" not in r.content  # no upstream name


def upstream_paths(up: registry.Upstream) -> list[str]:
    return [e.path for e in up.access_log() if e.path != "/v2/"]


def _layer(http: Client, name: str) -> tuple[str, int]:
    r = call(http, "GET", f"/v2/{name}/manifests/v1", name, [("Accept", MANIFEST_ACCEPT[0][1])])
    assert r.status_code == 200, r.text
    layer = r.json()["layers"][0]
    return layer["digest"], layer["size"]


# --- GET /v2/ ------------------------------------------------------------------------------------


def test_ping_without_token_is_401_with_a_challenge(http: Client, rp: proxy.ProxyProc) -> None:
    r = call(http, "GET", "/v2/")
    expect_error(r, 401, "UNAUTHORIZED")
    assert r.headers["www-authenticate"].startswith(f'Bearer realm="{rp.url}/token"')


def test_ping_with_token_is_200(http: Client) -> None:
    r = call(http, "GET", "/v2/", "conf/app")
    assert r.status_code == 200
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"


# --- manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NS))
@pytest.mark.parametrize("by", ["tag", "digest"])
def test_manifest_get_and_head_are_200_with_the_digest(
    http: Client, image_digests: dict[str, standard.Digests], kind: str, by: str
) -> None:
    name, digest = f"{NS[kind]}/app", image_digests[kind][(APP, "v1")]
    ref = "v1" if by == "tag" else digest
    got = call(http, "GET", f"/v2/{name}/manifests/{ref}", name)
    assert got.status_code == 200, got.text
    assert got.headers["docker-content-digest"] == digest
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
    assert got.headers["content-type"] == got.json()["mediaType"]
    head = call(http, "HEAD", f"/v2/{name}/manifests/{ref}", name)
    assert head.status_code == 200
    assert head.headers["docker-content-digest"] == digest
    assert int(head.headers["content-length"]) == len(got.content)
    assert head.content == b""


@pytest.mark.parametrize("kind", list(NS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("ref", ["nope", MISSING, "sha512:" + "0" * 128])
def test_missing_manifest_is_404_manifest_unknown(http: Client, kind: str, method: str, ref: str) -> None:
    name = f"{NS[kind]}/app"
    expect_error(call(http, method, f"/v2/{name}/manifests/{ref}", name), 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_manifest_of_a_missing_repository_under_a_mapping_is_404(http: Client, method: str) -> None:
    # distribution answers MANIFEST_UNKNOWN here (not NAME_UNKNOWN); the proxy keeps its status and code.
    expect_error(call(http, method, "/v2/conf/nope/manifests/v1", "conf/nope"), 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_manifest_of_an_unmapped_name_is_404_name_unknown(http: Client, method: str) -> None:
    expect_error(call(http, method, "/v2/other/app/manifests/v1", "other/app"), 404, "NAME_UNKNOWN")


@pytest.mark.parametrize("kind", list(NS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("ref", BAD_REFERENCES)
def test_invalid_manifest_reference_is_404_manifest_unknown_answered_locally(
    http: Client, upstreams: dict[str, registry.Upstream], kind: str, method: str, ref: str
) -> None:
    up, name = upstreams[kind], f"{NS[kind]}/app"
    up.clear_access_log()
    expect_error(call(http, method, f"/v2/{name}/manifests/{ref}", name), 404, "MANIFEST_UNKNOWN")
    assert upstream_paths(up) == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_invalid_manifest_reference_answer_is_the_same_bytes_for_every_name(
    http: Client, upstreams: dict[str, registry.Upstream], method: str
) -> None:
    """Mapped and existing, mapped and missing, a capability key, a near-miss of it, unmapped, no
    token at all: one answer, so probing with a bad reference learns nothing about names."""
    for up in upstreams.values():
        up.clear_access_log()
    answers = []
    for name, tok in [
        ("conf/app", "conf/app"),
        ("conftok/app", "conftok/app"),
        ("conf/nope", "conf/nope"),
        (f"{CAP}/app", f"{CAP}/app"),
        (f"{CAP[:-1]}0/app", f"{CAP[:-1]}0/app"),
        ("other/app", "other/app"),
        ("conf/app", None),
    ]:
        r = call(http, method, f"/v2/{name}/manifests/.INVALID_MANIFEST_NAME", tok)
        expect_error(r, 404, "MANIFEST_UNKNOWN")
        answers.append((r.status_code, r.content, sorted((k, v) for k, v in r.headers.items() if k != "date")))
    assert all(a == answers[0] for a in answers), answers
    assert all(upstream_paths(up) == [] for up in upstreams.values())
    # The same bytes as a missing tag the upstream answered 404 to.
    missing = call(http, method, "/v2/conf/app/manifests/nope", "conf/app")
    assert (missing.status_code, missing.content) == answers[0][:2]


def test_valid_manifest_reference_without_token_is_401(http: Client) -> None:
    r = call(http, "GET", "/v2/conf/app/manifests/v1")
    expect_error(r, 401, "UNAUTHORIZED")
    assert 'scope="repository:conf/app:pull"' in r.headers["www-authenticate"]


# --- blobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NS))
def test_blob_get_and_head_are_200_with_the_digest(http: Client, kind: str) -> None:
    name = f"{NS[kind]}/app"
    digest, size = _layer(http, name)
    got = call(http, "GET", f"/v2/{name}/blobs/{digest}", name)
    assert got.status_code == 200
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
    assert len(got.content) == size
    head = call(http, "HEAD", f"/v2/{name}/blobs/{digest}", name)
    assert head.status_code == 200
    assert head.headers["docker-content-digest"] == digest
    assert int(head.headers["content-length"]) == size
    assert head.content == b""


@pytest.mark.parametrize("kind", list(NS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_missing_blob_is_404_blob_unknown(http: Client, kind: str, method: str) -> None:
    name = f"{NS[kind]}/app"
    expect_error(call(http, method, f"/v2/{name}/blobs/{MISSING}", name), 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("ref", BAD_DIGESTS)
def test_invalid_blob_digest_is_400_digest_invalid_answered_locally(
    http: Client, upstreams: dict[str, registry.Upstream], method: str, ref: str
) -> None:
    up = upstreams["anonymous"]
    up.clear_access_log()
    expect_error(call(http, method, f"/v2/conf/app/blobs/{ref}", "conf/app"), 400, "DIGEST_INVALID")
    assert upstream_paths(up) == []


@pytest.mark.parametrize(("range_", "start", "end"), [("bytes=10-19", 10, 19), ("bytes=100-", 100, None)])
def test_blob_range_is_206(http: Client, range_: str, start: int, end: int | None) -> None:
    digest, size = _layer(http, "conf/app")
    full = call(http, "GET", f"/v2/conf/app/blobs/{digest}", "conf/app").content
    last = size - 1 if end is None else end
    r = call(http, "GET", f"/v2/conf/app/blobs/{digest}", "conf/app", [("Range", range_)])
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{last}/{size}"
    assert r.content == full[start : last + 1]


def test_blob_range_past_the_end_is_416(http: Client) -> None:
    digest, size = _layer(http, "conf/app")
    r = call(http, "GET", f"/v2/conf/app/blobs/{digest}", "conf/app", [("Range", f"bytes={size + 100}-")])
    expect_error(r, 416, "SIZE_INVALID")


# --- tags/list -------------------------------------------------------------------------------------


def _tags(http: Client, query: str = "", name: str = "conf/app") -> tuple[list[str], str | None]:
    r = call(http, "GET", f"/v2/{name}/tags/list{query}", name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == name
    tags: list[str] = body["tags"]
    return tags, r.headers.get("link")


def test_tags_list_is_200_with_the_local_name(http: Client) -> None:
    tags, link = _tags(http)
    assert sorted(tags) == ["multi", "v1", "v2s2"]
    assert link is None


def test_tags_list_is_in_lexical_order(http: Client) -> None:
    # 120 tags (t000…t119): storage order is never lexical by chance (hash order on ext4, newest first on tmpfs).
    tags, _ = _tags(http, name="conf/many")
    assert sorted(tags) == list(MANY_TAGS)
    assert tags == sorted(tags)


@pytest.mark.parametrize(("name", "tok"), [("conf/nope", "conf/nope"), ("other/app", "other/app")])
def test_tags_list_of_a_missing_or_unmapped_repository_is_404_name_unknown(http: Client, name: str, tok: str) -> None:
    expect_error(call(http, "GET", f"/v2/{name}/tags/list", tok), 404, "NAME_UNKNOWN")


def test_tags_list_n_limits_and_links_with_the_local_name(http: Client) -> None:
    tags, link = _tags(http, "?n=2")
    assert tags == ["multi", "v1"]
    assert link == '</v2/conf/app/tags/list?n=2&last=v1>; rel="next"'
    rest, link = _tags(http, "?n=2&last=v1")
    assert rest == ["v2s2"] and link is None


def test_tags_list_n_zero_is_an_empty_list_without_link(http: Client) -> None:
    assert _tags(http, "?n=0") == ([], None)


@pytest.mark.parametrize("query", ["?last=multi", "?n=5&last=multi"])
def test_tags_list_last_starts_after_the_tag(http: Client, query: str) -> None:
    tags, _ = _tags(http, query)
    assert tags == ["v1", "v2s2"]


# --- referrers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?artifactType=application/vnd.example.sbom.v1"])
def test_referrers_without_upstream_support_is_404(
    http: Client,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    query: str,
) -> None:
    """distribution 2.8 has no referrers API: 404, on which clients fall back to the tag schema. The
    request did go upstream, with its artifactType."""
    up = upstreams["anonymous"]
    up.clear_access_log()
    digest = image_digests["anonymous"][(APP, "v1")]
    r = call(http, "GET", f"/v2/conf/app/referrers/{digest}{query}", "conf/app")
    assert r.status_code == 404, r.text
    assert r.json()["errors"][0]["code"]
    [sent] = upstream_paths(up)
    path, _, sent_query = sent.partition("?")
    assert path == f"/v2/platform/app/referrers/{digest}"
    assert parse_qsl(sent_query) == parse_qsl(query.lstrip("?"))


@pytest.mark.parametrize("query", ["", "?artifactType=application/vnd.example.sbom.v1"])
@pytest.mark.parametrize("ref", BAD_DIGESTS)
def test_referrers_with_an_invalid_digest_is_400_digest_invalid_answered_locally(
    http: Client, upstreams: dict[str, registry.Upstream], query: str, ref: str
) -> None:
    up = upstreams["anonymous"]
    up.clear_access_log()
    expect_error(call(http, "GET", f"/v2/conf/app/referrers/{ref}{query}", "conf/app"), 400, "DIGEST_INVALID")
    assert upstream_paths(up) == []
