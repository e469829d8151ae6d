"""The pull-through cache on an S3 store: a real OpenStack Swift with s3api (rig/swift.py, `swift_s3`).

Every test has a bucket of its own and a proxy (or three) with `cache.store: s3://BUCKET/rp`, whose S3
credentials are the Swift rig's second user (random values, handed over by environment variable names as
the configuration asks), over the session's token-auth upstream (`tok/`) and a capability mapping onto it.
What the tests read back: the bucket's objects (listed and fetched with aiobotocore, the keys and bytes
checked against the digests), the upstream's own tap (which requests reached it), the proxy's JSON access
log (`cache`: hit, miss, fill, stale, off), Swift's access log (which blobs clients fetched from Swift
itself), the proxy's metrics.

- skopeo and containerd (`ctr`) pull through a proxy: the first pull fills the bucket (each blob and
  manifest stored under its digest, linked and tagged), each blob fetched from the upstream once; the
  second pull, with fresh client state, asks the upstream nothing but a HEAD of the tag, and every blob
  and manifest line says `cache=hit`.
- `redirect: true`: after the fill, blob GETs are answered 307 to a presigned URL at the Swift endpoint;
  that URL gives the exact bytes without credentials and a tampered one is refused by Swift; skopeo's
  second pull follows the redirects (Swift logs the GETs) with the right digests and no upstream blob GET.
- Three replicas behind HAProxy on one bucket: a pull through HAProxy fills it; a pull straight at each
  replica is all hits in that replica's own log; a replica restarted (a new process, nothing in memory)
  serves hits too, straight and through HAProxy.
- Secrets: a whole session (fills, hits, 307s, refusals, a proxy with a wrong S3 secret) leaves no S3
  secret, access key id, presigned signature, upstream credential or token, secret key or capability key in
  the proxy's output at debug level, its flow dump (-w), the bodies it answered, or the bucket's keys and
  records.
- mitmweb marks the flows answered from the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from mitmproxy.utils.emoji import emoji
from prometheus_client.parser import text_string_to_metric_families
from rig import clients, daemons, images, proxy, registry
from rig.flowfiles import DEBUG_ARGS, flow_texts
from rig.haproxy import BACKEND, HAProxy, start_haproxy
from rig.keys import CAP
from rig.procs import LOOPBACK, wait_until
from rig.standard import APP
from rig.swift import Swift
from screenshot.shoot import start_mitmweb

pytestmark = pytest.mark.e2e

ProxyFactory = Callable[..., proxy.ProxyProc]  # the `make_proxy` fixture (tests/e2e/conftest.py)

KEY_HEX = "5e" * 16 + "a7" * 16
KEY_ENV, SECRET_ENV = "CACHE_S3_KEY_ID", "CACHE_S3_SECRET"
CAP_ENV = "RP_CACHE_S3_CAP_PASSWORD"
PREFIX = "rp"
REMOTE = "platform"
JSON_LOG = ("--set", "registryproxy_log_format=json")
FILL_TIMEOUT = 30.0  # s for a fill to be committed to the bucket (bounded; the commit follows the answer)
LOG_TIMEOUT = 30.0  # s for the access log lines of answered requests (bounded; generous for a loaded CI machine)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[1], MANIFEST_TYPES[3]
PASETO_RE = re.compile(rb"v4\.local\.")
JWT_RE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
SIGNATURE_RE = re.compile(rb"X-Amz-Signature=[0-9a-f]{16,}", re.IGNORECASE)
CREDENTIAL_RE = re.compile(rb"X-Amz-Credential=", re.IGNORECASE)


# --- the bucket -----------------------------------------------------------------------------------


@dataclass
class Bucket:
    """A bucket of one test's on the Swift rig, and the `cache:` section that stores into it."""

    s3: Swift
    name: str
    prefix: str = PREFIX

    def cache_config(self, *, redirect: bool = False, **top: Any) -> dict[str, Any]:
        return {
            "store": f"s3://{self.name}/{self.prefix}",
            "max_size": "1GB",
            "tag_ttl": "0s",
            "stale_if_error": "7d",
            **top,
            "s3": {
                "endpoint_url": self.s3.endpoint_url,
                "region": self.s3.region,
                "access_key_id_env": KEY_ENV,
                "secret_access_key_env": SECRET_ENV,
                "redirect": redirect,
                "url_expiry": "10m",
            },
        }

    def env(self) -> dict[str, str]:
        """The proxy's S3 credentials (the rig's second user), under the names `cache_config` gives."""
        return {KEY_ENV: self.s3.proxy_access_key_id, SECRET_ENV: self.s3.proxy_secret_access_key}

    def _run(self, body: Callable[[Any], Any]) -> Any:
        async def main() -> Any:
            async with self.s3.client() as c:
                return await body(c)

        return asyncio.run(main())

    def objects(self) -> dict[str, int]:
        """Every object under the prefix: key (the prefix taken off) -> size."""

        async def listing(c: Any) -> dict[str, int]:
            found: dict[str, int] = {}
            token: str | None = None
            for _page in range(1000):  # bounded; a page holds up to 1000 keys
                kw: dict[str, Any] = {"Bucket": self.name, "Prefix": f"{self.prefix}/"}
                if token:
                    kw["ContinuationToken"] = token
                page = await c.list_objects_v2(**kw)
                for o in page.get("Contents", []):
                    found[o["Key"][len(self.prefix) + 1 :]] = int(o["Size"])
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
            return found

        result: dict[str, int] = self._run(listing)
        return result

    def get(self, key: str) -> bytes:
        """The bytes of object PREFIX/key."""

        async def fetch(c: Any) -> bytes:
            got = await c.get_object(Bucket=self.name, Key=f"{self.prefix}/{key}")
            data: bytes = await got["Body"].read()
            return data

        result: bytes = self._run(fetch)
        return result

    def wait_for(self, image: Image, timeout: float = FILL_TIMEOUT) -> dict[str, int]:
        """The listing once every blob and manifest of `image` is stored and linked (fills are committed
        once the digest is verified: after the client had its answer)."""

        def missing() -> list[str]:
            objs = self.objects()
            linked = {k.rsplit("/", 1)[1] for k in objs if k.startswith("links/")}
            gone = [f"blobs/sha256/{h}" for h in image.blobs if f"blobs/sha256/{h}" not in objs]
            gone += [f"manifests/sha256/{h}" for h in image.manifests if f"manifests/sha256/{h}" not in objs]
            gone += [f"links/*/sha256/{h}" for h in image.hexes() if h not in linked]
            return gone

        wait_until(lambda: not missing(), timeout, f"{image.ref} in bucket {self.name}", lambda: str(missing()))
        return self.objects()


def _new_bucket(s3: Swift) -> Bucket:
    b = Bucket(s3, f"rp-cache-{uuid.uuid4().hex[:12]}")
    s3.create_bucket(b.name)
    return b


@pytest.fixture
def bucket(swift_s3: Swift) -> Bucket:
    return _new_bucket(swift_s3)


# --- the image, as the upstream has it --------------------------------------------------------------


@dataclass
class Image:
    """An image's content on the upstream: the manifests (by hex: bytes) and blobs (by hex: size)."""

    ref: str  # "platform/app:v1"
    digest: str  # the tag's manifest digest
    manifests: dict[str, bytes]
    blobs: dict[str, int]

    def hexes(self) -> set[str]:
        return set(self.manifests) | set(self.blobs)

    def blob_paths(self) -> set[str]:
        """The upstream paths of its blobs."""
        name = self.ref.split(":")[0]
        return {f"/v2/{name}/blobs/sha256:{h}" for h in self.blobs}


def _hex(digest: str) -> str:
    assert digest.startswith("sha256:"), digest
    return digest.removeprefix("sha256:")


def image_content(up: registry.Upstream, name: str, tag: str) -> Image:
    """Read `name:tag` straight from the upstream (before a test counts its requests), index and all."""
    manifests: dict[str, bytes] = {}
    blobs: dict[str, int] = {}

    def walk(ref: str) -> str:
        body, ctype, digest = images.get_manifest(up, name, ref)
        assert hashlib.sha256(body).hexdigest() == _hex(digest)
        manifests[_hex(digest)] = body
        doc = json.loads(body)
        if ctype in INDEX_TYPES or "manifests" in doc:
            for child in doc["manifests"]:
                walk(child["digest"])
        else:
            for d in [doc["config"], *doc["layers"]]:
                blobs[_hex(d["digest"])] = int(d["size"])
        return digest

    top = walk(tag)
    return Image(f"{name}:{tag}", top, manifests, blobs)


@pytest.fixture(scope="module")
def content(upstreams: dict[str, registry.Upstream]) -> dict[str, Image]:
    """tag -> the token upstream's platform/app at that tag (v1, multi, v2s2)."""
    return {tag: image_content(upstreams["token"], APP, tag) for tag in ("v1", "multi", "v2s2")}


# --- the proxy ------------------------------------------------------------------------------------


def proxy_config(up: dict[str, registry.Upstream], b: Bucket, *, redirect: bool = False) -> dict[str, Any]:
    tok = up["token"]
    return {
        "secretkey": KEY_HEX,
        "cache": b.cache_config(redirect=redirect),
        "proxies": {
            "tok/": {"registry": tok.url, "remote": REMOTE, "username": tok.username, "password": tok.password},
            f"{CAP}/app": {"registry": tok.url, "remote": APP, "username": tok.username, "password_env": CAP_ENV},
        },
    }


def proxy_env(up: dict[str, registry.Upstream], b: Bucket) -> dict[str, str]:
    return {**b.env(), CAP_ENV: up["token"].password or ""}


def start_cached(
    make_proxy: ProxyFactory,
    up: dict[str, registry.Upstream],
    b: Bucket,
    *,
    redirect: bool = False,
    extra_args: tuple[str, ...] = JSON_LOG,
) -> proxy.ProxyProc:
    return make_proxy(proxy_config(up, b, redirect=redirect), list(extra_args), env=proxy_env(up, b))


def records(p: proxy.ProxyProc, since: int = 0) -> list[dict[str, Any]]:
    """The JSON access-log records in the proxy's output after character `since`."""
    out = []
    for line in p.output()[since:].splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if isinstance(rec, dict) and "method" in rec:
                out.append(rec)
    return out


def wait_records(
    p: proxy.ProxyProc, since: int, ready: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    """records(p, since) once `ready` holds for them (a line is written once its answer is complete)."""
    wait_until(lambda: ready(records(p, since)), LOG_TIMEOUT, what, lambda: p.output()[since:][-4000:])
    return records(p, since)


def blob_records(recs: list[dict[str, Any]], image: Image, method: str = "GET") -> list[dict[str, Any]]:
    return [r for r in recs if r["method"] == method and "/blobs/sha256:" in r["name"] and _rec_hex(r) in image.blobs]


def manifest_records(recs: list[dict[str, Any]], method: str = "GET") -> list[dict[str, Any]]:
    return [r for r in recs if r["method"] == method and "/manifests/" in r["name"]]


def _rec_hex(rec: dict[str, Any]) -> str:
    return str(rec["name"]).rsplit("sha256:", 1)[-1]


def _brief(recs: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['method']} {r['name']} {r['status']} cache={r.get('cache')}" for r in recs)


def upstream_requests(up: registry.Upstream) -> list[tuple[str, str]]:
    return [(e.method, e.path.split("?")[0]) for e in up.access_log()]


def upstream_blob_gets(up: registry.Upstream) -> Counter[str]:
    return Counter(path for method, path in upstream_requests(up) if method == "GET" and "/blobs/" in path)


def upstream_manifest_gets(up: registry.Upstream) -> list[str]:
    return [path for method, path in upstream_requests(up) if method == "GET" and "/manifests/" in path]


def token_for(base: str, name: str) -> str:
    r = httpx.get(f"{base}/token", params={"scope": f"repository:{name}:pull"}, timeout=30, trust_env=False)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def check_stored(b: Bucket, image: Image, objs: dict[str, int]) -> None:
    """Each blob and manifest of `image` in the bucket under its digest, with its exact bytes; linked; and
    the tag recorded (under some link id, never a name)."""
    for h, size in image.blobs.items():
        assert objs[f"blobs/sha256/{h}"] == size, h
        assert hashlib.sha256(b.get(f"blobs/sha256/{h}")).hexdigest() == h
    for h, body in image.manifests.items():
        assert b.get(f"manifests/sha256/{h}") == body, h
    link_ids = {k.split("/")[1] for k in objs if k.startswith(("links/", "tags/"))}
    assert link_ids and all(re.fullmatch(r"[0-9a-f]{16,64}", i) for i in link_ids), link_ids
    tag = image.ref.split(":")[1]
    tag_keys = [k for k in objs if k.startswith("tags/") and k.endswith(f"/{tag}")]
    assert tag_keys, sorted(objs)
    for k in tag_keys:
        assert _hex(image.digest) in b.get(k).decode(), k
    # Only what the layout names: content by digest, links, tags (no temporary or partial objects left).
    shapes = (r"blobs/sha256/[0-9a-f]{64}", r"manifests/sha256/[0-9a-f]{64}", r"links/\w+/sha256/[0-9a-f]{64}")
    for k in objs:
        assert any(re.fullmatch(s, k) for s in shapes) or re.fullmatch(r"tags/\w+/[\w.-]+", k), k


def scrape_cache_metrics(base: str) -> dict[str, float]:
    """registryproxy_cache_* samples at `base`/metrics: 'name{label=value,...}' -> value."""
    r = httpx.get(f"{base}/metrics", timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("registryproxy_cache_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _hits_counted(samples: dict[str, float]) -> float:
    """Hits counted, whichever way the metrics name them: a counter with "hit" in its name, or a label
    whose value is "hit" (bytes counters left out)."""
    total = 0.0
    for key, value in samples.items():
        name, _, labels = key.partition("{")
        values = {pair.partition("=")[2] for pair in labels.rstrip("}").split(",")}
        if name.endswith("_total") and "bytes" not in name and ("hit" in name or "hit" in values):
            total += value
    return total


# --- skopeo and ctr, without redirect ---------------------------------------------------------------


def test_skopeo_first_pull_fills_the_bucket_second_is_all_hits(
    make_proxy: ProxyFactory,
    taps: dict[str, registry.Upstream],
    bucket: Bucket,
    content: dict[str, Image],
    tmp_path: Path,
) -> None:
    up = taps["token"]
    image = content["v1"]
    p = start_cached(make_proxy, taps, bucket)
    up.clear_access_log()
    assert bucket.objects() == {}

    # The first pull: the upstream's digest, every blob fetched from the upstream once, and stored.
    pulled = clients.skopeo_copy(f"{p.host}/tok/app:v1", tmp_path / "first", tag="v1").check()
    assert pulled.digest == image.digest
    fill = wait_records(p, 0, lambda rs: len(blob_records(rs, image)) >= len(image.blobs), "the fill's blob lines")
    assert upstream_blob_gets(up) == Counter(image.blob_paths()), upstream_requests(up)
    first = blob_records(fill, image)
    assert {r["cache"] for r in first} <= {"fill", "miss"}, _brief(fill)
    assert all(r["status"] == 200 for r in first), _brief(fill)
    objs = bucket.wait_for(image)
    check_stored(bucket, image, objs)
    hits_before = _hits_counted(scrape_cache_metrics(p.url))

    # The second pull, with fresh client state: the tag is asked with a HEAD, nothing else reaches the
    # upstream, and every blob and the manifest come from the bucket.
    up.clear_access_log()
    mark = len(p.output())
    again = clients.skopeo_copy(f"{p.host}/tok/app:v1", tmp_path / "second", tag="v1").check()
    assert again.digest == image.digest
    assert (again.dest_dir / "blobs" / "sha256").is_dir()
    for h in image.blobs:
        assert hashlib.sha256((again.dest_dir / "blobs" / "sha256" / h).read_bytes()).hexdigest() == h
    recs = wait_records(p, mark, lambda rs: len(blob_records(rs, image)) >= len(image.blobs), "the hits' lines")
    assert upstream_blob_gets(up) == Counter(), upstream_requests(up)
    assert upstream_manifest_gets(up) == [], upstream_requests(up)
    assert ("HEAD", f"/v2/{APP}/manifests/v1") in upstream_requests(up), upstream_requests(up)
    hits = blob_records(recs, image)
    assert len(hits) == len(image.blobs), _brief(recs)
    assert all(r["cache"] == "hit" and r["status"] == 200 for r in hits), _brief(recs)
    assert all(r["bytes"] == image.blobs[_rec_hex(r)] for r in hits), _brief(recs)
    got_manifests = [r for r in manifest_records(recs) if r["status"] == 200]
    assert got_manifests and all(r["cache"] == "hit" for r in got_manifests), _brief(recs)
    # Nothing new was stored: the second pull only read.
    assert bucket.objects().keys() == objs.keys()
    samples = scrape_cache_metrics(p.url)
    assert _hits_counted(samples) >= hits_before + len(image.blobs), samples


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("containerd-cache-s3"))
    yield d
    d.stop()


def _ctr_pull(containerd: daemons.Containerd, ns: str, ref: str) -> str | None:
    res = containerd.ctr(
        "images", "pull", "--plain-http", "--snapshotter", "native", "--all-platforms", ref, namespace=ns
    )
    assert res.returncode == 0, res.describe()
    return containerd.image_digest(ns, ref)


def test_ctr_pull_of_an_index_fills_then_hits(
    make_proxy: ProxyFactory,
    taps: dict[str, registry.Upstream],
    bucket: Bucket,
    content: dict[str, Image],
    containerd: daemons.Containerd,
) -> None:
    """containerd (content isolated per namespace) pulls the multi-arch index with every platform twice,
    the second time in a namespace of its own: only the tag's HEAD reaches the upstream."""
    up = taps["token"]
    image = content["multi"]
    p = start_cached(make_proxy, taps, bucket)
    up.clear_access_log()
    ref = f"{p.host}/tok/app:multi"
    namespaces = [f"cache-s3-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        assert _ctr_pull(containerd, namespaces[0], ref) == image.digest
        assert upstream_blob_gets(up) == Counter(image.blob_paths()), upstream_requests(up)
        check_stored(bucket, image, bucket.wait_for(image))

        up.clear_access_log()
        mark = len(p.output())
        assert _ctr_pull(containerd, namespaces[1], ref) == image.digest
        recs = wait_records(p, mark, lambda rs: len(blob_records(rs, image)) >= len(image.blobs), "the hits' lines")
        # The index by tag: a HEAD upstream; the platform manifests by digest and every blob: no request.
        asked = upstream_requests(up)
        assert {r for r in asked if "/blobs/" in r[1] or "/manifests/" in r[1]} == {
            ("HEAD", f"/v2/{APP}/manifests/multi")
        }, asked
        hits = blob_records(recs, image)
        assert len(hits) == len(image.blobs) and all(r["cache"] == "hit" for r in hits), _brief(recs)
        by_digest = [r for r in manifest_records(recs) if "sha256:" in r["name"] and r["status"] == 200]
        platforms = set(image.manifests) - {_hex(image.digest)}
        assert platforms <= {_rec_hex(r) for r in by_digest} <= set(image.manifests), _brief(recs)
        assert all(r["cache"] == "hit" for r in by_digest), _brief(recs)
    finally:
        for ns in namespaces:
            if ns in containerd.ctr_checked("namespaces", "ls", "-q").stdout.split():
                containerd.remove_namespace(ns)


# --- a blob larger than a part -------------------------------------------------------------------

MiB = 1 << 20
BIG_LAYER = 40 * MiB  # over the S3 store's part size (16 MiB): a multipart upload of three parts
BIG = "platform/big"


@pytest.fixture(scope="module")
def big_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry.Upstream]:
    """A token-auth upstream of the module's own with BIG:v1, one layer of BIG_LAYER pseudo-random bytes
    (not the session's upstreams: their repository list is counted elsewhere)."""
    base = tmp_path_factory.mktemp("cache-s3-big")
    up = registry.start_upstream("token", base / "upstream")
    try:
        images.build_image(base / "layout", "v1", layers=(BIG_LAYER,), seed="cache-s3-big")
        images.push(base / "layout", "v1", up, BIG, "v1", timeout=180)
        yield up
    finally:
        up.stop()


def _sha256_of_object(b: Bucket, key: str) -> str:
    """The sha256 of object PREFIX/key, streamed (never whole in memory)."""

    async def digest(c: Any) -> str:
        got = await c.get_object(Bucket=b.name, Key=f"{b.prefix}/{key}")
        h = hashlib.sha256()
        async for chunk in got["Body"].iter_chunks(MiB):
            h.update(chunk)
        return h.hexdigest()

    result: str = b._run(digest)
    return result


def test_a_blob_over_the_part_size_goes_up_in_parts_and_comes_back_whole(
    make_proxy: ProxyFactory,
    big_upstream: registry.Upstream,
    bucket: Bucket,
    swift_s3: Swift,
    tmp_path: Path,
) -> None:
    up = big_upstream
    image = image_content(up, BIG, "v1")
    (layer,) = [h for h, size in image.blobs.items() if size > 32 * MiB]
    config = {
        "secretkey": KEY_HEX,
        "cache": bucket.cache_config(),
        "proxies": {
            "big/": {"registry": up.url, "remote": "platform", "username": up.username, "password": up.password}
        },
    }
    p = make_proxy(config, list(JSON_LOG), env=bucket.env())
    up.clear_access_log()
    swift_s3.clear_log()
    pulled = clients.skopeo_copy(f"{p.host}/big/big:v1", tmp_path / "first", tag="v1", timeout=300).check()
    assert pulled.digest == image.digest
    objs = bucket.wait_for(image, timeout=60)
    assert objs[f"blobs/sha256/{layer}"] == image.blobs[layer]
    assert _sha256_of_object(bucket, f"blobs/sha256/{layer}") == layer
    # It went up in parts: an upload started, two or more parts, one completion; nothing left open.
    key_path = f"/{bucket.name}/{PREFIX}/blobs/sha256/{layer}"
    mine = [r for r in swift_s3.wait_requests(1) if r.path.startswith(key_path)]
    parts = [r for r in mine if r.method == "PUT" and "partNumber" in r.path and r.status == 200]
    assert len(parts) >= 2 and sum(r.bytes_received for r in parts) == image.blobs[layer], mine
    assert [r.method for r in mine if "uploadId" in r.path and r.method == "POST" and r.status == 200] == ["POST"]
    assert not [r for r in mine if r.method == "PUT" and "partNumber" not in r.path], mine

    async def open_uploads(c: Any) -> list[Any]:
        listed = await c.list_multipart_uploads(Bucket=bucket.name)
        return list(listed.get("Uploads", []))

    assert bucket._run(open_uploads) == []
    assert upstream_blob_gets(up) == Counter(image.blob_paths()), upstream_requests(up)

    # Back whole from the bucket.
    up.clear_access_log()
    mark = len(p.output())
    again = clients.skopeo_copy(f"{p.host}/big/big:v1", tmp_path / "second", tag="v1", timeout=300).check()
    assert again.digest == image.digest
    h = hashlib.sha256()
    with (again.dest_dir / "blobs" / "sha256" / layer).open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    assert h.hexdigest() == layer
    assert upstream_blob_gets(up) == Counter(), upstream_requests(up)
    recs = wait_records(p, mark, lambda rs: len(blob_records(rs, image)) >= len(image.blobs), "the hits' lines")
    assert all(r["cache"] == "hit" for r in blob_records(recs, image)), _brief(recs)


# --- redirect: true -------------------------------------------------------------------------------


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_redirect_answers_cached_blobs_with_presigned_swift_urls(
    make_proxy: ProxyFactory,
    taps: dict[str, registry.Upstream],
    bucket: Bucket,
    content: dict[str, Image],
    swift_s3: Swift,
    tmp_path: Path,
) -> None:
    up = taps["token"]
    image = content["v1"]
    p = start_cached(make_proxy, taps, bucket, redirect=True)
    up.clear_access_log()

    # The first pull fills (an uncached blob cannot be redirected: the proxy streams it while storing).
    pulled = clients.skopeo_copy(f"{p.host}/tok/app:v1", tmp_path / "first", tag="v1").check()
    assert pulled.digest == image.digest
    assert upstream_blob_gets(up) == Counter(image.blob_paths()), upstream_requests(up)
    check_stored(bucket, image, bucket.wait_for(image))

    # A cached blob GET: 307 to Swift, a presigned URL of the blob's object.
    tok = token_for(p.url, "tok/app")
    layer_hex = max(image.blobs, key=lambda h: image.blobs[h])
    up.clear_access_log()
    before = len(p.output())
    with httpx.Client(timeout=30, trust_env=False, follow_redirects=False) as c:
        r = c.get(f"{p.url}/v2/tok/app/blobs/sha256:{layer_hex}", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 307, (r.status_code, r.text)
        location = r.headers["location"]
        assert location.startswith(f"{swift_s3.endpoint_url}/{bucket.name}/{PREFIX}/blobs/sha256/{layer_hex}?"), (
            location
        )
        query = dict(parse_qsl(urlsplit(location).query))
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert query["X-Amz-Credential"].startswith(f"{swift_s3.proxy_access_key_id}/")
        assert 0 < int(query["X-Amz-Expires"]) <= 600  # url_expiry: 10m
        # Swift serves it without credentials (and nothing of the client's request goes along), exact bytes.
        got = c.get(location)
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).hexdigest() == layer_hex
        assert len(got.content) == image.blobs[layer_hex]
        ranged = c.get(location, headers={"Range": "bytes=10-99"})
        assert ranged.status_code == 206 and ranged.content == got.content[10:100]
        # Tampered: refused by Swift.
        sig = query["X-Amz-Signature"]
        bad_sig = _with_query(location, **{"X-Amz-Signature": sig[:-1] + ("0" if sig[-1] != "0" else "1")})
        other_key = location.replace(layer_hex, next(h for h in image.blobs if h != layer_hex), 1)
        for name, url in (("signature", bad_sig), ("key", other_key)):
            refused = c.get(url)
            assert refused.status_code == 403 and b"SignatureDoesNotMatch" in refused.content, (name, refused.text)
        # Without a token: the proxy's challenge, never a redirect.
        anonymous = c.get(f"{p.url}/v2/tok/app/blobs/sha256:{layer_hex}")
        assert anonymous.status_code == 401 and "location" not in anonymous.headers
    assert upstream_blob_gets(up) == Counter()
    # A line is logged after its answer is sent: the lines of the requests above must be in before the second
    # pull's mark, or the anonymous 401 would count as one of its blob lines.
    wait_records(
        p,
        before,
        lambda rs: sorted(r["status"] for r in blob_records(rs, image)) == [307, 401],
        "the 307's and the 401's lines",
    )

    # The second pull: skopeo follows the 307s to Swift, the digests are right, the upstream sees no blob GET.
    up.clear_access_log()
    swift_s3.clear_log()
    mark = len(p.output())
    again = clients.skopeo_copy(f"{p.host}/tok/app:v1", tmp_path / "second", tag="v1").check()
    assert again.digest == image.digest
    for h in image.blobs:
        assert hashlib.sha256((again.dest_dir / "blobs" / "sha256" / h).read_bytes()).hexdigest() == h
    assert upstream_blob_gets(up) == Counter(), upstream_requests(up)
    assert upstream_manifest_gets(up) == [], upstream_requests(up)
    recs = wait_records(p, mark, lambda rs: len(blob_records(rs, image)) >= len(image.blobs), "the 307s' lines")
    redirected = blob_records(recs, image)
    assert len(redirected) == len(image.blobs), _brief(recs)
    assert all(r["status"] == 307 and r["cache"] == "hit" for r in redirected), _brief(recs)
    # Swift served each blob to skopeo (its own access log, once the answers were sent).
    wanted = {f"/{bucket.name}/{PREFIX}/blobs/sha256/{h}" for h in image.blobs}

    def served() -> set[str]:
        return {
            path
            for r in swift_s3.requests()
            if r.method == "GET" and r.status == 200 and (path := r.path.split("%3F")[0].split("?")[0]) in wanted
        }

    wait_until(lambda: served() == wanted, LOG_TIMEOUT, "Swift's GETs of every blob", lambda: str(swift_s3.requests()))


# --- three replicas behind HAProxy on one bucket ------------------------------------------------------

REPLICAS = 3


@dataclass
class Group:
    replicas: list[proxy.ProxyProc]
    haproxy: HAProxy
    bucket: Bucket
    config: dict[str, Any]
    env: dict[str, str]
    tmp: Path
    restarts: int = 0


@pytest.fixture(scope="module")
def group(
    upstreams: dict[str, registry.Upstream], swift_s3: Swift, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Group]:
    tmp = tmp_path_factory.mktemp("cache-s3-replicas")
    b = _new_bucket(swift_s3)
    config, env = proxy_config(upstreams, b), proxy_env(upstreams, b)
    replicas: list[proxy.ProxyProc] = []
    hp: HAProxy | None = None
    g: Group | None = None
    try:
        for i in range(REPLICAS):
            replicas.append(proxy.start_proxy(config, tmp / f"r{i}", JSON_LOG, env))
        hp = start_haproxy(tmp / "haproxy", [r.port for r in replicas])
        g = Group(replicas, hp, b, config, env, tmp)
        yield g
    finally:
        if hp is not None:
            hp.stop()
            sys.stdout.write(f"--- haproxy output:\n{hp.proc.output()}\n")
        for r in g.replicas if g is not None else replicas:
            r.stop()
            sys.stdout.write(f"--- replica {r.host} output (tail):\n{r.output()[-4000:]}\n")


def _fill_through_haproxy(g: Group, up: registry.Upstream, image: Image, dest: Path) -> None:
    """Pull `image` through HAProxy once, unless the bucket has it already; wait for the commit."""
    objs = g.bucket.objects()
    if all(f"blobs/sha256/{h}" in objs for h in image.blobs):
        return
    up.clear_access_log()
    tag = image.ref.split(":")[1]
    pulled = clients.skopeo_copy(f"{g.haproxy.host}/tok/app:{tag}", dest, tag=tag).check()
    assert pulled.digest == image.digest
    assert upstream_blob_gets(up) == Counter(image.blob_paths()), upstream_requests(up)
    check_stored(g.bucket, image, g.bucket.wait_for(image))


def _pull_is_all_hits(
    target: str, replicas: list[proxy.ProxyProc], up: registry.Upstream, image: Image, dest: Path
) -> list[list[dict[str, Any]]]:
    """Pull `image` through `target`; no blob reaches the upstream, and every blob line in the replicas'
    own logs is a hit. Returns each replica's new records."""
    up.clear_access_log()
    marks = [len(r.output()) for r in replicas]
    tag = image.ref.split(":")[1]
    pulled = clients.skopeo_copy(f"{target}/tok/app:{tag}", dest, tag=tag).check()
    assert pulled.digest == image.digest
    assert upstream_blob_gets(up) == Counter(), upstream_requests(up)
    assert upstream_manifest_gets(up) == [], upstream_requests(up)

    def each() -> list[list[dict[str, Any]]]:
        return [blob_records(records(r, m), image) for r, m in zip(replicas, marks, strict=True)]

    wait_until(
        lambda: sum(len(rs) for rs in each()) >= len(image.blobs),
        LOG_TIMEOUT,
        "a blob line per blob in the replicas' logs",
        lambda: "\n".join(_brief(rs) for rs in each()),
    )
    per_replica = each()
    for i, rs in enumerate(per_replica):
        assert all(r["cache"] == "hit" and r["status"] == 200 for r in rs), f"replica {i}:\n{_brief(rs)}"
    return [records(r, m) for r, m in zip(replicas, marks, strict=True)]


def test_replicas_share_one_bucket_a_pull_through_one_is_a_hit_on_every_other(
    group: Group, upstreams: dict[str, registry.Upstream], content: dict[str, Image], tmp_path: Path
) -> None:
    up, image = upstreams["token"], content["v1"]
    g = group
    assert g.haproxy.status() == {f"r{i}": "UP" for i in range(REPLICAS)}
    _fill_through_haproxy(g, up, image, tmp_path / "fill")
    # A pull straight at each replica: that replica served every blob, from the bucket.
    for i, r in enumerate(g.replicas):
        recs = _pull_is_all_hits(r.host, [r], up, image, tmp_path / f"direct{i}")[0]
        assert len(blob_records(recs, image)) == len(image.blobs), f"replica {i}:\n{_brief(recs)}"
    # Through HAProxy (round robin per request): all hits, wherever they landed.
    _pull_is_all_hits(g.haproxy.host, g.replicas, up, image, tmp_path / "balanced")
    # Another image filled through one replica is a hit on the others.
    other = content["v2s2"]
    up.clear_access_log()
    pulled = clients.skopeo_copy(f"{g.replicas[0].host}/tok/app:v2s2", tmp_path / "v2s2-fill", tag="v2s2").check()
    assert pulled.digest == other.digest
    g.bucket.wait_for(other)
    for i, r in enumerate(g.replicas[1:], start=1):
        recs = _pull_is_all_hits(r.host, [r], up, other, tmp_path / f"v2s2-{i}")[0]
        assert len(blob_records(recs, other)) == len(other.blobs), f"replica {i}:\n{_brief(recs)}"


def test_a_restarted_replica_serves_hits_from_the_bucket(
    group: Group, upstreams: dict[str, registry.Upstream], content: dict[str, Image], tmp_path: Path
) -> None:
    up, image = upstreams["token"], content["v1"]
    g = group
    _fill_through_haproxy(g, up, image, tmp_path / "fill")
    # Replica r1 restarted: a new process (nothing of the old one's memory) on a new port, which HAProxy is
    # told through its admin socket.
    old = g.replicas[1]
    old.stop()
    g.restarts += 1
    new = proxy.start_proxy(g.config, g.tmp / f"r1-restart{g.restarts}", JSON_LOG, g.env)
    g.replicas[1] = new
    answer = g.haproxy.command(f"set server {BACKEND}/r1 addr {LOOPBACK} port {new.port}")
    assert "changed" in answer or answer.strip() == "", answer
    g.haproxy.wait_status({f"r{i}": "UP" for i in range(REPLICAS)}, timeout=30)

    recs = _pull_is_all_hits(new.host, [new], up, image, tmp_path / "restarted")[0]
    assert len(blob_records(recs, image)) == len(image.blobs), _brief(recs)
    assert all(r["cache"] == "hit" for r in manifest_records(recs) if r["status"] == 200), _brief(recs)
    # And through HAProxy, the restarted replica among the others.
    _pull_is_all_hits(g.haproxy.host, g.replicas, up, image, tmp_path / "balanced")


# --- secrets ------------------------------------------------------------------------------------------

SESSION_ARGS = DEBUG_ARGS


def _session(
    p: proxy.ProxyProc, image: Image, tmp: Path, label: str, *, full: bool = True
) -> tuple[dict[str, bytes], list[str]]:
    """Fills, hits, redirects and refusals through `p` (`full`: every kind; else one pull and the blob
    GETs, for a proxy that may be slow to fail). Returns the bodies and Location headers it answered
    (what -> bytes) and every presigned URL it handed out."""
    answered: dict[str, bytes] = {}
    presigned: list[str] = []
    names = ("tok/app", f"{CAP}/app") if full else ("tok/app",)
    for name in names:
        for n in range(2 if full else 1):
            dest = tmp / f"{label}-{name.replace('/', '_')}-{n}"
            res = clients.skopeo_copy(f"{p.host}/{name}:v1", dest, tag="v1", timeout=120 if full else 60)
            if full:
                assert res.check().digest == image.digest, name
    with httpx.Client(base_url=p.url, timeout=30, trust_env=False, follow_redirects=False) as c:
        tok = c.get("/token", params={"scope": ["repository:tok/app:pull", f"repository:{CAP}/app:pull"]})
        assert tok.status_code == 200, tok.text
        auth = {"Authorization": f"Bearer {tok.json()['token']}"}
        asks = [f"/v2/{n}/blobs/sha256:{h}" for n in names for h in image.blobs]
        if full:
            asks += [f"/v2/{n}/manifests/{ref}" for n in names for ref in ("v1", image.digest)]
            asks += [
                f"/v2/tok/app/blobs/sha256:{'0' * 64}",  # unknown upstream: its error, passed on
                "/v2/tok/app/manifests/nope",
                f"/v2/{CAP[:-1]}9/app/manifests/v1",  # an almost-right capability key
            ]
        for path in asks:
            for method in ("GET", "HEAD"):
                r = c.request(method, path, headers={**auth, "Accept": ", ".join(MANIFEST_TYPES)})
                answered[f"{label} {method} {path} ({r.status_code})"] = r.content
                if "location" in r.headers:
                    answered[f"{label} {method} {path} Location"] = r.headers["location"].encode()
                    if "X-Amz-Signature=" in r.headers["location"]:
                        presigned.append(r.headers["location"])
        bad = c.get("/v2/tok/app/manifests/v1", headers={"Authorization": "Bearer v4.local.bm90LWEtdG9rZW4"})
        answered[f"{label} forged token ({bad.status_code})"] = bad.content
    return answered, presigned


def _context(data: bytes, secret: bytes) -> str:
    """The start of the first line holding `secret`, the secret itself masked: where a leak came from."""
    at = data.index(secret)
    start = data.rfind(b"\n", 0, at) + 1
    line = data[start : data.find(b"\n", at) if b"\n" in data[at:] else len(data)]
    return repr(line.replace(secret, b"<SECRET>")[:160])


def test_no_s3_secret_or_signature_in_output_flows_bodies_or_bucket(
    make_proxy: ProxyFactory,
    taps: dict[str, registry.Upstream],
    bucket: Bucket,
    content: dict[str, Image],
    swift_s3: Swift,
    issued_upstream_tokens: Callable[[], list[str]],
    tmp_path: Path,
) -> None:
    image = content["v1"]
    flows = tmp_path / "flows.mitm"
    args = (*SESSION_ARGS, "--set", "registryproxy_log_format=json", "-w", str(flows))
    good = start_cached(make_proxy, taps, bucket, redirect=True, extra_args=args)
    answered, presigned = _session(good, image, tmp_path, "good")
    bucket.wait_for(image)
    assert presigned, "no presigned URL was handed out: the redirect was never exercised"

    # A proxy whose S3 secret is wrong (Swift's SignatureDoesNotMatch bodies carry the canonical request,
    # access key id included): whatever it makes of that, it says none of it.
    wrong_secret = "wrong" + swift_s3.proxy_secret_access_key[5:][::-1]
    wrong_env = {**proxy_env(taps, bucket), SECRET_ENV: wrong_secret}
    bad_flows = tmp_path / "bad-flows.mitm"
    bad_args = (*SESSION_ARGS, "-w", str(bad_flows))
    bad: proxy.ProxyProc | None = None
    try:
        bad = make_proxy(proxy_config(taps, bucket, redirect=True), list(bad_args), env=wrong_env)
    except Exception as e:  # noqa: BLE001 - refusing to start is an answer too; its output is scanned
        bad_output = str(e)
    else:
        more, _ = _session(bad, image, tmp_path, "wrong-secret", full=False)
        answered |= more
        bad.stop()
        bad_output = bad.output()
    good.stop()  # -w is complete once the proxy has shut down
    assert not good.running()

    output = good.output()
    seen = {r.get("cache") for r in records(good)}
    assert "hit" in seen and seen & {"fill", "miss"}, seen  # the session did fill and hit
    up = taps["token"]
    secrets: dict[str, str] = {
        "the S3 secret access key": swift_s3.proxy_secret_access_key,
        "the wrong S3 secret access key": wrong_secret,
        "the S3 access key id": swift_s3.proxy_access_key_id,
        "the S3 access key id (URL-encoded)": quote(swift_s3.proxy_access_key_id, safe=""),
        "the S3 user": swift_s3.proxy_access_key_id.split(":")[1],
        "the secret key": KEY_HEX,
        "the capability key": CAP,
        "the capability key (hex only)": CAP.replace("-", ""),
        "the upstream's password": up.password or "",
        "the upstream's Basic credentials": (up.basic_auth_header() or "").split()[-1],
    }
    for i, url in enumerate(presigned):
        secrets[f"presigned signature #{i}"] = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    secrets |= {f"upstream token #{i}": t for i, t in enumerate(issued_upstream_tokens())}
    assert issued_upstream_tokens(), "the proxy fetched no upstream token"

    places: dict[str, bytes] = {
        "the proxy's output": output.encode(),
        "the wrong-secret proxy's output": bad_output.encode(),
        "the flow file": flows.read_bytes(),
    }
    texts = flow_texts(flows)
    assert len(texts) >= 20, len(texts)
    assert any("[redacted]" in t for t in texts)  # the 307s' signed queries, the tokens
    places |= {f"saved flow #{i}": t.encode() for i, t in enumerate(texts)}
    if bad_flows.exists():
        places["the wrong-secret proxy's flow file"] = bad_flows.read_bytes()
        places |= {f"wrong-secret saved flow #{i}": t.encode() for i, t in enumerate(flow_texts(bad_flows))}
    # What the clients were answered: no error body holds a secret; a presigned URL is the one thing
    # the client may see (its own Location), never a credential beyond it.
    bodies = {f"body of {k}": v for k, v in answered.items() if not k.endswith("Location")}
    places |= bodies
    objs = bucket.objects()
    places["the bucket's keys"] = "\n".join(objs).encode()
    places |= {f"bucket object {k}": bucket.get(k) for k in objs if k.startswith(("links/", "tags/"))}

    leaks = []
    for where, data in places.items():
        for what, secret in secrets.items():
            if secret and secret.encode() in data:
                leaks.append(f"{what} in {where}: {_context(data, secret.encode())}")
        for pattern, what in ((SIGNATURE_RE, "a presigned signature"), (CREDENTIAL_RE, "an X-Amz-Credential")):
            if pattern.search(data):
                leaks.append(f"{what} in {where}")
        if PASETO_RE.search(data):
            leaks.append(f"a PASETO in {where}")
        if JWT_RE.search(data):
            leaks.append(f"a JWT in {where}")
    assert not leaks, "\n".join(leaks)


# --- mitmweb --------------------------------------------------------------------------------------

RED, WARNING = ":red_circle:", ":warning:"


def _flow_brief(f: dict[str, Any]) -> str:
    status = f["response"]["status_code"] if f.get("response") else None
    req = f["request"]
    return f"{req['method']} {req['host']}:{req['port']}{req['path']} -> {status} {f['marked']!r} {f['comment']!r}"


def test_mitmweb_marks_the_answers_from_the_cache(
    upstreams: dict[str, registry.Upstream], bucket: Bucket, content: dict[str, Image], tmp_path: Path
) -> None:
    image = content["v1"]
    web = start_mitmweb(proxy_config(upstreams, bucket), tmp_path / "mitmweb", env=proxy_env(upstreams, bucket))
    try:
        first = clients.skopeo_copy(f"{web.host}/tok/app:v1", tmp_path / "first", tag="v1").check()
        assert first.digest == image.digest
        bucket.wait_for(image)
        filled = {f["id"] for f in web.flows()}
        again = clients.skopeo_copy(f"{web.host}/tok/app:v1", tmp_path / "second", tag="v1").check()
        assert again.digest == image.digest

        def blob_flows(fresh: bool) -> list[dict[str, Any]]:
            out = []
            for f in web.flows():
                if (f["id"] in filled) == fresh or f["request"]["method"] != "GET" or not f.get("response"):
                    continue
                # The request path is the upstream's, or the local blob server's one-time ticket: the
                # comment names the blob as the client asked for it.
                if any(f"/blobs/sha256:{h}" in f["comment"] for h in image.blobs):
                    out.append(f)
            return out

        wait_until(
            lambda: len(blob_flows(fresh=True)) >= len(image.blobs),
            LOG_TIMEOUT,
            "the second pull's blob flows in mitmweb",
            lambda: "\n".join(_flow_brief(f) for f in web.flows() if f["id"] not in filled),
        )
        fills, hits = blob_flows(fresh=False), blob_flows(fresh=True)
        shown = [(f["request"]["path"], f["marked"], f["comment"]) for f in fills + hits]
        assert len(fills) == len(image.blobs) and len(hits) == len(image.blobs), shown
        hit_marks = {f["marked"] for f in hits}
        assert len(hit_marks) == 1 and not hit_marks & {"", emoji[RED], emoji[WARNING]}, shown
        (mark,) = hit_marks
        assert all(re.search(r"\bcache\b[^;]*\bhit\b", f["comment"]) for f in hits), shown
        assert all(f["marked"] != mark for f in fills), shown  # a fill came from the upstream
        manifests = [
            f
            for f in web.flows()
            if f["id"] not in filled and "/manifests/" in f["request"]["path"] and f.get("response")
            and f["request"]["method"] == "GET" and f["response"]["status_code"] == 200
        ]  # fmt: skip
        assert manifests and all(f["marked"] == mark for f in manifests), shown
    finally:
        web.stop()
        sys.stdout.write(f"--- mitmweb output:\n{web.output()[-4000:]}\n")
