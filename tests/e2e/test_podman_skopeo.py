"""podman and skopeo pulling through the client-matrix proxies, over plain HTTP and over TLS.

Every upstream kind (anonymous, basic, token, redirect) is reached through a namespace mapping and a
capability mapping (rig/matrix.py). Each pull runs with fresh podman storage, so blobs really cross
the wire; the digest the client recorded is compared with the upstream's `Docker-Content-Digest`,
and the upstreams' own access logs must show nothing outside `/v2/` and `/v2/platform/`.

What these clients do on the wire (podman 4.3.1, skopeo 1.9.3, both containers/image) is pinned
down through a probe proxy: the same mappings, with a logging addon loaded before the project's.
The HTTP/2 tests find out what mitmproxy negotiates with an h2-capable client (httpx).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from rig import clients, images, matrix, proxy, registry, standard, tls
from rig.podman import Podman, ProbeLog, cert_dir, host_goarch, parse_probe, probe_script
from rig.procs import RunResult
from rig.standard import APP

pytestmark = pytest.mark.e2e

KINDS = list(registry.KINDS)
MAPPINGS = ["namespace", "capability"]
TAGS = ["v1", "multi", "v2s2"]
PODMAN_REFS = [*TAGS, "digest"]  # "digest": the multi-arch index, pulled by its digest
TLS_CAPABILITY_KIND = "redirect"  # podman over TLS through a capability mapping: this kind
# Every manifest GET of skopeo and podman carries these six Accept lines, in this order.
C_IMAGE_ACCEPT = (
    images.OCI_MANIFEST,
    images.DOCKER_MANIFEST,
    images.DOCKER_V1_SIGNED,
    images.DOCKER_V1,
    images.DOCKER_LIST,
    images.OCI_INDEX,
)
_BLOB_DATA_PATH = re.compile(r"/sha256/[0-9a-f]{2}/(?P<hex>[0-9a-f]{64})/data$")


# --- what upstream serves -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageExpect:
    digest: str  # the manifest's digest
    config: str
    layers: tuple[str, ...]

    @property
    def blobs(self) -> set[str]:
        return {self.config, *self.layers}


@dataclass(frozen=True)
class KindExpect:
    """The manifests of platform/app on one upstream, read directly from it."""

    tags: dict[str, str]  # tag -> upstream digest
    single: dict[str, ImageExpect]  # "v1", "v2s2"
    index: str  # digest of the multi-arch index
    instances: dict[str, ImageExpect]  # architecture -> instance of the index

    def podman_image(self, ref: str) -> tuple[str, set[str], ImageExpect]:
        """(.Digest, digests in RepoDigests, the image podman stores) for a PODMAN_REFS entry."""
        if ref in self.single:
            img = self.single[ref]
            return img.digest, {img.digest}, img
        inst = self.instances[host_goarch()]
        return self.index, {self.index, inst.digest}, inst

    def blobs(self, tag: str, all_platforms: bool) -> set[str]:
        if tag in self.single:
            return self.single[tag].blobs
        chosen = self.instances.values() if all_platforms else [self.instances[host_goarch()]]
        return set().union(*(i.blobs for i in chosen))


def _image_expect(up: registry.Upstream, ref: str) -> ImageExpect:
    body, _, digest = images.get_manifest(up, APP, ref)
    m = json.loads(body)
    assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    return ImageExpect(digest, m["config"]["digest"], tuple(layer["digest"] for layer in m["layers"]))


@pytest.fixture(scope="module")
def expect(
    upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> dict[str, KindExpect]:
    out: dict[str, KindExpect] = {}
    for kind, up in upstreams.items():
        body, _, index_digest = images.get_manifest(up, APP, "multi")
        index = json.loads(body)
        instances = {
            m["platform"]["architecture"]: _image_expect(up, m["digest"])
            for m in index["manifests"]
            if m["platform"]["os"] == "linux"
        }
        tags = {tag: image_digests[kind][(APP, tag)] for tag in TAGS}
        assert index_digest == tags["multi"]
        out[kind] = KindExpect(tags, {t: _image_expect(up, t) for t in ("v1", "v2s2")}, index_digest, instances)
        up.clear_access_log()
    return out


# --- upstream side checks -------------------------------------------------------------------


def _reset_logs(upstreams: dict[str, registry.Upstream]) -> None:
    for up in upstreams.values():
        up.clear_access_log()
        if up.blob_server is not None:
            up.blob_server.clear()


def _check_upstreams(upstreams: dict[str, registry.Upstream], kind: str, blobs: set[str] | None) -> None:
    """What every upstream saw since _reset_logs: only the mapping's prefix, credentials where due,
    and for the redirect kind `blobs` fetched from the blob server without Authorization."""
    for k, up in upstreams.items():
        log = up.access_log()
        outside = [e for e in log if e.path != "/v2/" and not e.path.startswith("/v2/platform/")]
        assert not outside, f"{k} upstream saw requests outside /v2/platform/: {outside}"
        if k == kind:
            assert log, f"the {k} upstream saw no request"
            if k != "anonymous":
                assert all(e.had_authorization for e in log if e.path != "/v2/"), log
    up = upstreams[kind]
    if up.blob_server is None or blobs is None:
        return
    reqs = up.blob_server.requests()
    assert reqs, "no blob was fetched from the redirect target"
    assert not [r for r in reqs if r.had_authorization], f"blob requests carried Authorization: {reqs}"
    assert all(s in (200, 206) for s in up.blob_server.statuses()), list(zip(reqs, up.blob_server.statuses()))
    fetched = {
        f"sha256:{m.group('hex')}" for r in reqs if r.method == "GET" for m in [_BLOB_DATA_PATH.search(r.path)] if m
    }
    assert blobs <= fetched, f"blobs not fetched from the redirect target: {blobs - fetched}"
    # ... after the registry itself answered each blob GET (with a 307 there).
    asked = {e.path.rsplit("/", 1)[1] for e in up.access_log() if e.method == "GET" and "/blobs/" in e.path}
    assert blobs <= asked, f"blobs not asked of the registry: {blobs - asked}"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """podman with its own (fresh) storage and configuration for this test only."""
    p = Podman(tmp_path / "podman")
    yield p
    p.close()


@pytest.fixture(scope="module")
def ca_dir(test_ca: tls.TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --cert-dir / --src-cert-dir holding the test CA as ca.crt."""
    return cert_dir(tmp_path_factory.mktemp("cert-dir"), test_ca.ca_cert)


@pytest.fixture(scope="module")
def probe_proxy(
    upstreams: dict[str, registry.Upstream], test_ca: tls.TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    """The matrix mappings behind the test CA's certificate, with the wire probe before the addon."""
    tmp = tmp_path_factory.mktemp("probe-proxy")
    p = proxy.start_proxy(
        matrix.matrix_config(upstreams), tmp, extra_args=test_ca.certs_option(), script=probe_script(tmp / "script")
    )
    yield p
    p.stop()


def _ref(host: str, kind: str, mapping: str, ref: str, exp: KindExpect) -> str:
    name = f"{host}/{matrix.local_name(kind, mapping)}"
    return f"{name}@{exp.index}" if ref == "digest" else f"{name}:{ref}"


def _ok(res: RunResult) -> None:
    assert res.returncode == 0, res.describe()


def _podman_pull_and_check(
    podman: Podman,
    upstreams: dict[str, registry.Upstream],
    exp: KindExpect,
    host: str,
    kind: str,
    mapping: str,
    ref: str,
    *,
    tls_verify: bool,
    certs: Path | None,
) -> None:
    image_ref = _ref(host, kind, mapping, ref, exp)
    digest, repo_digests, stored = exp.podman_image(ref)
    _reset_logs(upstreams)
    _ok(podman.pull(image_ref, tls_verify=tls_verify, cert_dir=certs))
    got = podman.inspect(image_ref)
    assert got.digest == digest
    name = f"{host}/{matrix.local_name(kind, mapping)}"
    assert set(got.repo_digests) == {f"{name}@{d}" for d in repo_digests}
    assert got.id == stored.config  # the image of the (host platform's) manifest
    _check_upstreams(upstreams, kind, stored.blobs)


# --- podman ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", PODMAN_REFS)
@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_podman_pull_http(
    podman: Podman,
    matrix_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    kind: str,
    mapping: str,
    ref: str,
) -> None:
    """`podman pull --tls-verify=false` through the plain-HTTP proxy port (podman speaks TLS there:
    it tries HTTPS first, and mitmproxy answers with its own certificate)."""
    _podman_pull_and_check(
        podman, upstreams, expect[kind], matrix_proxy.host, kind, mapping, ref, tls_verify=False, certs=None
    )


TLS_CELLS = [(k, "namespace") for k in KINDS] + [(TLS_CAPABILITY_KIND, "capability")]


@pytest.mark.parametrize("ref", PODMAN_REFS)
@pytest.mark.parametrize(("kind", "mapping"), TLS_CELLS, ids=[f"{k}-{m}" for k, m in TLS_CELLS])
def test_podman_pull_tls(
    podman: Podman,
    matrix_tls_proxy: proxy.ProxyProc,
    ca_dir: Path,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    kind: str,
    mapping: str,
    ref: str,
) -> None:
    """`podman pull --cert-dir DIR` (tls-verify on) through the proxy presenting the test CA's certificate."""
    _podman_pull_and_check(
        podman, upstreams, expect[kind], matrix_tls_proxy.host, kind, mapping, ref, tls_verify=True, certs=ca_dir
    )


def test_podman_tls_verify_refuses_an_unknown_ca(podman: Podman, matrix_tls_proxy: proxy.ProxyProc) -> None:
    """Without --cert-dir the test CA is unknown: the TLS cells above really verified the certificate."""
    res = podman.pull(f"{matrix_tls_proxy.host}/anon/app:v1", tls_verify=True)
    assert res.returncode != 0
    assert "x509: certificate signed by unknown authority" in res.stderr


# --- skopeo ---------------------------------------------------------------------------------


def _skopeo_copy_and_check(
    upstreams: dict[str, registry.Upstream],
    exp: KindExpect,
    host: str,
    kind: str,
    mapping: str,
    tag: str,
    dest: Path,
    *,
    certs: Path | None,
) -> None:
    _reset_logs(upstreams)
    src = f"{host}/{matrix.local_name(kind, mapping)}:{tag}"
    extra = ("--src-cert-dir", str(certs)) if certs is not None else ()
    res = clients.skopeo_copy(src, dest, all=True, tls_verify=certs is not None, tag=tag, extra_args=extra).check()
    assert res.digest == exp.tags[tag]
    _check_upstreams(upstreams, kind, exp.blobs(tag, all_platforms=True))


def _skopeo_inspect_and_check(
    upstreams: dict[str, registry.Upstream],
    exp: KindExpect,
    host: str,
    kind: str,
    mapping: str,
    tag: str,
    *,
    certs: Path | None,
) -> None:
    _reset_logs(upstreams)
    ref = f"{host}/{matrix.local_name(kind, mapping)}:{tag}"
    extra = ("--cert-dir", str(certs)) if certs is not None else ()
    rc, out, err = clients.skopeo_inspect(ref, raw=True, tls_verify=certs is not None, extra_args=extra)
    assert rc == 0, err
    assert f"sha256:{hashlib.sha256(out.encode()).hexdigest()}" == exp.tags[tag]
    _check_upstreams(upstreams, kind, None)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_copy_all_tls(
    matrix_tls_proxy: proxy.ProxyProc,
    ca_dir: Path,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    tmp_layout: Path,
    kind: str,
    mapping: str,
    tag: str,
) -> None:
    _skopeo_copy_and_check(upstreams, expect[kind], matrix_tls_proxy.host, kind, mapping, tag, tmp_layout, certs=ca_dir)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_inspect_raw_tls(
    matrix_tls_proxy: proxy.ProxyProc,
    ca_dir: Path,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    kind: str,
    mapping: str,
    tag: str,
) -> None:
    _skopeo_inspect_and_check(upstreams, expect[kind], matrix_tls_proxy.host, kind, mapping, tag, certs=ca_dir)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_copy_all_http_capability(
    matrix_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    tmp_layout: Path,
    kind: str,
    tag: str,
) -> None:
    _skopeo_copy_and_check(upstreams, expect[kind], matrix_proxy.host, kind, "capability", tag, tmp_layout, certs=None)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_inspect_raw_http_capability(
    matrix_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    kind: str,
    tag: str,
) -> None:
    _skopeo_inspect_and_check(upstreams, expect[kind], matrix_proxy.host, kind, "capability", tag, certs=None)


# --- what the clients send (wire probe) -----------------------------------------------------


def _probe_since(p: proxy.ProxyProc, mark: int) -> ProbeLog:
    return parse_probe(p.output()[mark:])


def _run_client(client: str, podman: Podman, ref: str, dest: Path, certs: Path | None) -> None:
    if client == "podman":
        _ok(podman.pull(ref, tls_verify=certs is not None, cert_dir=certs))
    else:
        extra = ("--src-cert-dir", str(certs)) if certs is not None else ()
        clients.skopeo_copy(ref, dest, all=True, tls_verify=certs is not None, tag="t", extra_args=extra).check()


@pytest.mark.parametrize("client", ["podman", "skopeo"])
def test_client_wire_behaviour_over_tls(
    client: str, podman: Podman, probe_proxy: proxy.ProxyProc, ca_dir: Path, tmp_layout: Path
) -> None:
    """One pull of tok/app:multi with verified TLS, as the proxy receives it:
    no ALPN offered (so HTTP/1.1), one request per TLS connection, the ping first, one anonymous
    `GET /token?scope=repository:tok/app:pull&service=HOST`, no HEAD, six Accept lines on every
    manifest GET and none on blob GETs."""
    mark = len(probe_proxy.output())
    _run_client(client, podman, f"{probe_proxy.host}/tok/app:multi", tmp_layout, ca_dir)
    probe_proxy.wait_quiet(0.2)  # the log lines of the last request
    log = _probe_since(probe_proxy, mark)
    reqs = log.requests
    assert reqs and log.hellos
    assert all(h.alpn_offers == () for h in log.hellos), log.hellos
    assert all(t.alpn == "" for t in log.tls), log.tls
    assert all(r.tls and r.http_version == "HTTP/1.1" for r in reqs), reqs
    assert len({r.conn for r in reqs}) == len(reqs), "containers/image disables keep-alive: a connection per request"
    assert (reqs[0].method, reqs[0].path) == ("GET", "/v2/")
    assert not [r for r in reqs if r.method != "GET"], reqs
    token_reqs = [r for r in reqs if r.path.startswith("/token")]
    assert len(token_reqs) == 1, token_reqs
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(token_reqs[0].path).query)
    assert query == {"scope": ["repository:tok/app:pull"], "service": [probe_proxy.host]}
    assert token_reqs[0].authorization is None
    manifests = [r for r in reqs if "/manifests/" in r.path]
    assert len(manifests) >= 2  # the index, then the instance(s) by digest
    assert all(r.accept == C_IMAGE_ACCEPT for r in manifests), [r.accept for r in manifests]
    assert all(r.authorization == "Bearer" for r in reqs if r.path.startswith("/v2/tok/")), reqs
    blobs = [r for r in reqs if "/blobs/" in r.path]
    assert blobs and all(r.accept == () for r in blobs)


@pytest.mark.parametrize("client", ["podman", "skopeo"])
def test_tls_verify_false_speaks_tls_to_the_plain_port(
    client: str, podman: Podman, probe_proxy: proxy.ProxyProc, tmp_layout: Path
) -> None:
    """With tls-verify off, containers/image tries HTTPS first and never falls back: mitmproxy detects
    the ClientHello on its port and answers with TLS (its certificate is simply not checked)."""
    mark = len(probe_proxy.output())
    _run_client(client, podman, f"{probe_proxy.host}/anon/app:v1", tmp_layout, None)
    probe_proxy.wait_quiet(0.2)
    reqs = _probe_since(probe_proxy, mark).requests
    assert reqs and all(r.tls for r in reqs), reqs


# --- HTTP/2 ---------------------------------------------------------------------------------


class H2FirstContext(ssl.SSLContext):
    """An SSL context whose ALPN list always starts with h2 (httpcore itself offers http/1.1 first)."""

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(["h2", *[p for p in alpn_protocols if p != "h2"]])


def _ca_context(test_ca: tls.TestCA, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(test_ca.ca_cert))
    return ctx


def _negotiated_alpn(host: str, ctx: ssl.SSLContext, offers: list[str]) -> str | None:
    ctx.set_alpn_protocols(offers)
    h, port = host.rsplit(":", 1)
    with socket.create_connection((h, int(port)), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=h) as s:
        return s.selected_alpn_protocol()


@dataclass
class Exchange:
    versions: list[str]
    manifest_digest: str
    blob_ok: bool


def _pull_exchange(c: httpx.Client, base: str, name: str, blob_server: bool) -> Exchange:
    """ping, token, manifest (six Accept lines), first layer blob; the versions of each answer."""
    versions: list[str] = []
    ping = c.get(f"{base}/v2/")
    versions.append(ping.http_version)
    assert ping.status_code == 401
    tok = c.get(f"{base}/token", params={"scope": f"repository:{name}:pull", "service": base.split("//")[1]})
    versions.append(tok.http_version)
    assert tok.status_code == 200, tok.text
    auth = {"Authorization": f"Bearer {tok.json()['token']}"}
    m = c.get(f"{base}/v2/{name}/manifests/v1", headers=[*auth.items(), *[("Accept", a) for a in C_IMAGE_ACCEPT]])
    versions.append(m.http_version)
    assert m.status_code == 200, m.text
    digest = f"sha256:{hashlib.sha256(m.content).hexdigest()}"
    assert m.headers["docker-content-digest"] == digest
    layer = m.json()["layers"][0]["digest"]
    b = c.get(f"{base}/v2/{name}/blobs/{layer}", headers=auth)
    versions.append(b.http_version)
    if blob_server:
        assert b.status_code == 307, b.text
        data = httpx.get(b.headers["location"], timeout=15, trust_env=False).content
    else:
        assert b.status_code == 200, b.text
        data = b.content
    return Exchange(versions, digest, f"sha256:{hashlib.sha256(data).hexdigest()}" == layer)


def test_httpx_http2_client_is_served_http11(
    matrix_tls_proxy: proxy.ProxyProc,
    test_ca: tls.TestCA,
    expect: dict[str, KindExpect],
) -> None:
    """httpx(http2=True) offers ALPN ["http/1.1", "h2"] (httpcore's order); mitmproxy, with no server
    connection yet (connection_strategy=lazy), takes the client's first acceptable protocol: HTTP/1.1.
    A client that lists h2 first gets h2 (next test)."""
    ctx = _ca_context(test_ca)
    with httpx.Client(http2=True, verify=ctx, timeout=15, trust_env=False) as c:
        ex = _pull_exchange(c, f"https://{matrix_tls_proxy.host}", "tok/app", blob_server=False)
    assert ex.versions == ["HTTP/1.1"] * 4
    assert ex.manifest_digest == expect["token"].tags["v1"] and ex.blob_ok
    host = matrix_tls_proxy.host
    assert _negotiated_alpn(host, _ca_context(test_ca), ["http/1.1", "h2"]) == "http/1.1"
    assert _negotiated_alpn(host, _ca_context(test_ca), ["h2", "http/1.1"]) == "h2"


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_h2_client_pulls_over_http2(
    matrix_tls_proxy: proxy.ProxyProc,
    test_ca: tls.TestCA,
    upstreams: dict[str, registry.Upstream],
    expect: dict[str, KindExpect],
    kind: str,
    mapping: str,
) -> None:
    """A client offering h2 first: token, manifest and blob over HTTP/2 (upstream gets HTTP/1.1)."""
    ctx = _ca_context(test_ca, H2FirstContext)
    _reset_logs(upstreams)
    with httpx.Client(http2=True, verify=ctx, timeout=15, trust_env=False) as c:
        ex = _pull_exchange(
            c,
            f"https://{matrix_tls_proxy.host}",
            matrix.local_name(kind, mapping),
            blob_server=upstreams[kind].blob_server is not None,
        )
    assert ex.versions == ["HTTP/2"] * 4
    assert ex.manifest_digest == expect[kind].tags["v1"] and ex.blob_ok
    _check_upstreams(upstreams, kind, None)


def _form_chunks() -> Iterator[bytes]:
    yield b"grant_type=password&username=someone&password=secret&"
    yield b"scope=repository%3Atok%2Fapp%3Apull&service=registry"


@pytest.mark.parametrize("which", ["matrix_tls_proxy", "probe_proxy"])
def test_h2_bodies_without_content_length_are_refused_unread(
    which: str, request: pytest.FixtureRequest, test_ca: tls.TestCA, upstreams: dict[str, registry.Upstream]
) -> None:
    """The framing trap (mitmproxy-notes.md): an h2 request body without Content-Length forwarded
    upstream as HTTP/1.1 would hang, and mitmproxy reads a body in full before sending a local answer.
    The proxy never forwards one and never reads one of unknown length: the stream is reset at once
    (the connection keeps serving). The same token request with its Content-Length is answered."""
    p: proxy.ProxyProc = request.getfixturevalue(which)
    ctx = _ca_context(test_ca, H2FirstContext)
    mark = len(p.output())
    _reset_logs(upstreams)
    base = f"https://{p.host}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    refused: list[tuple[str, str, float]] = []
    with httpx.Client(http2=True, verify=ctx, timeout=15, trust_env=False) as c:
        r = c.post(f"{base}/token", content=b"".join(_form_chunks()), headers=headers)
        assert (r.status_code, r.http_version) == (200, "HTTP/2"), r.text
        headers["Authorization"] = f"Bearer {r.json()['token']}"
        for method, path in (
            ("POST", "/token"),
            ("PUT", "/v2/tok/app/manifests/nope"),
            ("POST", "/v2/tok/app/blobs/uploads/"),
            ("PATCH", "/v2/tok/app/blobs/uploads/some-id"),
        ):
            started = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError) as e:
                c.request(method, f"{base}{path}", content=_form_chunks(), headers=headers)
            refused.append((path, str(e.value), time.monotonic() - started))
        ping = c.get(f"{base}/v2/")
    assert all("StreamReset" in err and t < 10 for _, err, t in refused), refused
    assert (ping.status_code, ping.http_version) == (401, "HTTP/2")
    assert not [e for e in upstreams["token"].access_log() if e.method != "GET"]
    if which == "probe_proxy":
        p.wait_quiet(0.2)
        seen = _probe_since(p, mark).requests
        assert [(r.method, r.http_version) for r in seen][:1] == [("POST", "HTTP/2.0")], seen
