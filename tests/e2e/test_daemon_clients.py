"""containerd (`ctr`, 1.6) and dockerd (20.10) pulling through the addon, against real upstreams.

One containerd and one dockerd (using that containerd) serve the whole module, with every socket and
directory under a temp dir (rig/daemons.py). Each ctr pull runs in a fresh containerd namespace
(content sharing "isolated", so nothing is served from another namespace's blobs) that is emptied
and deleted afterwards; each docker pull starts from an empty image store. Every pull asserts:
- the manifest digest the client recorded equals the upstream's `Docker-Content-Digest`;
- the upstream served exactly the config and layer blobs of the image (so the client really
  fetched them), saw nothing outside `/v2/` and `/v2/platform/`, and, if it has auth, every request
  but the ping carried the proxy's upstream credentials;
- for the redirect upstream, the blob server got those blob GETs, none with Authorization.

Transports: "http" is `matrix_proxy` (plain HTTP; see the notes on docker below), "tls" is
`matrix_tls_proxy` presenting the test CA's certificate. ctr over TLS needs a hosts.toml whose server
is https (`--hosts-dir`) plus `--tlscacert`: with `--tlscacert` alone ctr 1.6 talks plain HTTP to a
loopback registry (test_ctr_without_hosts_dir_uses_plain_http_on_loopback). dockerd talks TLS to the
"plain" proxy too, without verifying any certificate (test_docker_loopback_pull_is_tls_unverified).

Observation tests use a dedicated proxy with the matrix mappings and a small observer script loaded
before the addon (OBSERVER below), which logs one `RIGOBS {json}` line a request: method, client path,
status, TLS version, ALPN, HTTP version, user agent, token grant type (never a credential).
"""

from __future__ import annotations

import itertools
import json
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from rig import daemons, images, matrix, proxy, registry, standard, tls
from rig.standard import APP

pytestmark = pytest.mark.e2e

KINDS = registry.KINDS
MAPPINGS = ("namespace", "capability")
CTR_TAGS = ("v1", "multi", "v2s2")
DOCKER_REFS = ("v1", "multi", "v2s2", "digest")
DOCKER_TLS_CAPABILITY_KIND = "token"  # docker over TLS: every kind by namespace, this one by capability too
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

BLOB_PATH = re.compile(r"^/v2/platform/app/blobs/(sha256:[0-9a-f]{64})$")
STORED_BLOB_PATH = re.compile(r"/blobs/sha256/[0-9a-f]{2}/([0-9a-f]{64})/data$")
OBSERVED = re.compile(r"RIGOBS (\{.*\})$", re.MULTILINE)

OBSERVER = '''"""Test observer, loaded before the registryproxy addon (which hides the client's credentials
and paths from every addon after it): one RIGOBS line a request."""
import json
import logging

log = logging.getLogger("rig.observer")


def requestheaders(flow):
    req = flow.request
    path = req.path.partition("?")[0]
    info = {"client_path": path}  # the client's own request, before the addon rewrites it
    if path in ("/v2/", "/token"):  # answered by the proxy itself
        auth = req.headers.get("authorization", "")
        info["auth_scheme"] = auth.split(" ", 1)[0] if auth else None
        info["offline_token"] = req.query.get("offline_token")
    if "/manifests/" in path:
        info["accept"] = req.headers.get_all("accept")
    flow.metadata["rig_observed"] = info


def response(flow):
    req = flow.request
    conn = flow.client_conn
    info = dict(flow.metadata.get("rig_observed", {}))
    grant = None
    if req.method == "POST" and info.get("client_path") == "/token":
        grant = req.urlencoded_form.get("grant_type")
    record = {
        "method": req.method,
        "path": info.pop("client_path", None) or req.path.partition("?")[0],
        "status": flow.response.status_code if flow.response else None,
        "tls": conn.tls_established,
        "tls_version": conn.tls_version,
        "alpn_offers": [a.decode("ascii", "replace") for a in conn.alpn_offers],
        "alpn": (conn.alpn or b"").decode("ascii", "replace"),
        "sni": conn.sni,
        "http_version": req.http_version,
        "user_agent": req.headers.get("user-agent", ""),
        "grant_type": grant,
        **info,
    }
    log.info("RIGOBS %s", json.dumps(record))
'''


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("containerd"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def dockerd(containerd: daemons.Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Dockerd]:
    d = daemons.start_dockerd(tmp_path_factory.mktemp("dockerd"), containerd)
    yield d
    d.stop()


_namespaces = itertools.count(1)


@pytest.fixture
def ctr_ns(containerd: daemons.Containerd) -> Iterator[str]:
    """A containerd namespace no pull used before; emptied and deleted after the test."""
    ns = f"pull-{next(_namespaces):03d}"
    yield ns
    containerd.remove_namespace(ns)


@pytest.fixture
def docker_empty(dockerd: daemons.Dockerd) -> daemons.Dockerd:
    """dockerd with no image and so no layer: the pull fetches everything."""
    dockerd.clear_images()
    return dockerd


@pytest.fixture(scope="module")
def ctr_tls_hosts(matrix_tls_proxy: proxy.ProxyProc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ctr `--hosts-dir` that makes the TLS proxy an https registry (its CA comes by --tlscacert)."""
    return daemons.ctr_hosts_dir(tmp_path_factory.mktemp("ctr-hosts"), matrix_tls_proxy.host)


@pytest.fixture(scope="module")
def docker_tls_ca(matrix_tls_proxy: proxy.ProxyProc, test_ca: tls.TestCA) -> Iterator[Path]:
    """/etc/docker/certs.d/HOST:PORT/ca.crt for the TLS proxy, removed afterwards."""
    with daemons.docker_certs_d(matrix_tls_proxy.host, test_ca.ca_cert) as d:
        yield d


@pytest.fixture(scope="module")
def observed_proxy(
    upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    """The matrix mappings, plain HTTP (mitmproxy's own certificate for TLS), with OBSERVER loaded."""
    tmp = tmp_path_factory.mktemp("observed")
    script = tmp / "rig_observer.py"
    script.write_text(OBSERVER)
    p = proxy.start_proxy(
        matrix.matrix_config(upstreams), tmp / "proxy", extra_args=["-s", str(proxy.ADDON_SCRIPT)], script=script
    )
    yield p
    p.stop()


BlobKey = tuple[str, str, bool]  # (kind, tag, all platforms)


@pytest.fixture(scope="module")
def expected_blobs(upstreams: dict[str, registry.Upstream]) -> dict[BlobKey, frozenset[str]]:
    """(kind, tag, all_platforms) -> the config and layer digests a pull must fetch, read from
    upstream directly (for one platform: the host's, as clients choose)."""
    return {
        (kind, tag, all_platforms): _image_blobs(up, tag, all_platforms)
        for kind, up in upstreams.items()
        for tag in CTR_TAGS
        for all_platforms in (False, True)
    }


def _image_blobs(up: registry.Upstream, ref: str, all_platforms: bool) -> frozenset[str]:
    body, _, _ = images.get_manifest(up, APP, ref)
    manifest: dict[str, Any] = json.loads(body)
    if "manifests" in manifest:
        found: set[str] = set()
        for desc in manifest["manifests"]:
            plat = desc.get("platform", {})
            if all_platforms or (plat.get("os"), plat.get("architecture")) == ("linux", HOST_ARCH):
                found |= _image_blobs(up, desc["digest"], True)
        return frozenset(found)
    return frozenset([manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])])


# --- helpers ------------------------------------------------------------------------------------


def _proxy_for(request: pytest.FixtureRequest, transport: str) -> proxy.ProxyProc:
    name = "matrix_tls_proxy" if transport == "tls" else "matrix_proxy"
    return cast(proxy.ProxyProc, request.getfixturevalue(name))


def _watch(up: registry.Upstream) -> None:
    up.clear_access_log()
    if up.blob_server is not None:
        up.blob_server.clear()


def _assert_upstream_served(up: registry.Upstream, blobs: frozenset[str], what: str) -> None:
    log = up.access_log()
    assert log, f"{what}: the upstream saw no request"
    outside = [e for e in log if e.path != "/v2/" and not e.path.startswith("/v2/platform/")]
    assert not outside, f"{what}: requests outside the mapping reached the upstream: {outside}"
    if up.kind != "anonymous":
        bare = [e for e in log if e.path != "/v2/" and not e.had_authorization]
        assert not bare, f"{what}: upstream requests without the proxy's credentials: {bare}"
    fetched = {m.group(1) for e in log if e.method == "GET" and (m := BLOB_PATH.match(e.path))}
    assert fetched == blobs, f"{what}: blobs fetched from upstream {sorted(fetched)} != image's {sorted(blobs)}"
    if up.kind == "redirect":
        assert up.blob_server is not None
        reqs = up.blob_server.requests()
        got = {"sha256:" + m.group(1) for r in reqs if r.method == "GET" and (m := STORED_BLOB_PATH.search(r.path))}
        assert got == blobs, f"{what}: blob server GETs {sorted(got)} != image's blobs {sorted(blobs)}"
        assert not any(r.had_authorization for r in reqs), f"{what}: Authorization sent to the blob server: {reqs}"
        assert all(s in (200, 206) for s in up.blob_server.statuses()), up.blob_server.statuses()


def _observed(p: proxy.ProxyProc, since: int) -> list[dict[str, Any]]:
    return [json.loads(m.group(1)) for m in OBSERVED.finditer(p.output()[since:])]


def _by(records: list[dict[str, Any]], agent: str) -> list[dict[str, Any]]:
    return [r for r in records if r["user_agent"].startswith(agent)]


def _token_requests(records: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(r["method"], r["grant_type"]) for r in records if r["path"] == "/token"]


# --- containerd (ctr) ---------------------------------------------------------------------------


def _cells(transports: tuple[str, ...], tags: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(t, k, m, tag, id=f"{t}-{k}-{m}-{tag}")
        for t in transports
        for k in KINDS
        for m in MAPPINGS
        for tag in tags
    ]


def _ctr_transport_args(request: pytest.FixtureRequest, transport: str) -> list[str]:
    if transport == "http":
        return ["--plain-http"]
    hosts = cast(Path, request.getfixturevalue("ctr_tls_hosts"))
    ca = cast(tls.TestCA, request.getfixturevalue("test_ca"))
    return ["--hosts-dir", str(hosts), "--tlscacert", str(ca.ca_cert)]


@pytest.mark.parametrize(("transport", "kind", "mapping", "tag"), _cells(("http", "tls"), CTR_TAGS))
def test_ctr_images_pull(
    request: pytest.FixtureRequest,
    containerd: daemons.Containerd,
    ctr_ns: str,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    expected_blobs: dict[BlobKey, frozenset[str]],
    transport: str,
    kind: str,
    mapping: str,
    tag: str,
) -> None:
    """`ctr images pull [--plain-http | --hosts-dir D --tlscacert CA] --snapshotter native
    --all-platforms HOST/NAME:TAG`: recorded digest, unpacked, every blob fetched."""
    rp = _proxy_for(request, transport)
    up = upstreams[kind]
    ref = f"{rp.host}/{matrix.local_name(kind, mapping)}:{tag}"
    _watch(up)
    args = _ctr_transport_args(request, transport)
    res = containerd.ctr("images", "pull", *args, "--snapshotter", "native", "--all-platforms", ref, namespace=ctr_ns)
    assert res.returncode == 0, f"{res.describe()}\n--- proxy output (tail):\n{rp.output()[-3000:]}"
    assert containerd.image_digest(ctr_ns, ref) == image_digests[kind][(APP, tag)]
    status = containerd.image_status(ctr_ns, ref)
    assert status is not None and status.startswith("complete"), status
    _assert_upstream_served(up, expected_blobs[(kind, tag, True)], ref)


@pytest.mark.parametrize(("transport", "kind", "mapping", "tag"), _cells(("http", "tls"), ("v1",)))
def test_ctr_content_fetch(
    request: pytest.FixtureRequest,
    containerd: daemons.Containerd,
    ctr_ns: str,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    expected_blobs: dict[BlobKey, frozenset[str]],
    transport: str,
    kind: str,
    mapping: str,
    tag: str,
) -> None:
    """`ctr content fetch [--plain-http | --hosts-dir D --tlscacert CA] HOST/NAME:v1`."""
    rp = _proxy_for(request, transport)
    up = upstreams[kind]
    ref = f"{rp.host}/{matrix.local_name(kind, mapping)}:{tag}"
    _watch(up)
    res = containerd.ctr("content", "fetch", *_ctr_transport_args(request, transport), ref, namespace=ctr_ns)
    assert res.returncode == 0, f"{res.describe()}\n--- proxy output (tail):\n{rp.output()[-3000:]}"
    assert containerd.image_digest(ctr_ns, ref) == image_digests[kind][(APP, tag)]
    content = set(containerd.ctr_checked("content", "ls", "-q", namespace=ctr_ns).stdout.split())
    assert expected_blobs[(kind, tag, False)] <= content
    _assert_upstream_served(up, expected_blobs[(kind, tag, False)], ref)


def test_ctr_tls_checks_the_proxys_certificate(
    containerd: daemons.Containerd, matrix_tls_proxy: proxy.ProxyProc, ctr_tls_hosts: Path, ctr_ns: str
) -> None:
    """The TLS cells really use TLS: without --tlscacert the same pull fails on the certificate."""
    ref = f"{matrix_tls_proxy.host}/{matrix.local_name('anonymous', 'namespace')}:v1"
    res = containerd.ctr("images", "pull", "--hosts-dir", str(ctr_tls_hosts), ref, namespace=ctr_ns)
    assert res.returncode != 0
    assert "x509: certificate signed by unknown authority" in res.stderr, res.describe()


def test_ctr_without_hosts_dir_uses_plain_http_on_loopback(
    containerd: daemons.Containerd,
    observed_proxy: proxy.ProxyProc,
    test_ca: tls.TestCA,
    image_digests: dict[str, standard.Digests],
    ctr_ns: str,
) -> None:
    """`ctr images pull --tlscacert CA 127.0.0.1:P/…` (no --plain-http, no hosts dir) talks plain
    HTTP: containerd 1.6 never tries https for a loopback host without a hosts.toml."""
    since = len(observed_proxy.output())
    ref = f"{observed_proxy.host}/{matrix.local_name('anonymous', 'namespace')}:v1"
    res = containerd.ctr("images", "pull", "--tlscacert", str(test_ca.ca_cert), ref, namespace=ctr_ns)
    assert res.returncode == 0, res.describe()
    assert containerd.image_digest(ctr_ns, ref) == image_digests["anonymous"][(APP, "v1")]
    seen = _by(_observed(observed_proxy, since), "containerd/")
    assert seen and not any(r["tls"] for r in seen), seen


def test_ctr_token_requests(
    containerd: daemons.Containerd,
    observed_proxy: proxy.ProxyProc,
    image_digests: dict[str, standard.Digests],
    ctr_ns: str,
) -> None:
    """containerd: no ping; an unauthenticated HEAD on the manifest first (answered 401); a
    one-line Accept ending in */*; anonymous tokens by GET; with --user, POST grant_type=password."""
    name = matrix.local_name("token", "namespace")
    since = len(observed_proxy.output())
    ref = f"{observed_proxy.host}/{name}:v2s2"
    res = containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref, namespace=ctr_ns)
    assert res.returncode == 0, res.describe()
    assert containerd.image_digest(ctr_ns, ref) == image_digests["token"][(APP, "v2s2")]
    anonymous = _by(_observed(observed_proxy, since), "containerd/")
    assert not any(r["path"] == "/v2/" for r in anonymous), "containerd pinged /v2/"
    first = anonymous[0]
    assert (first["method"], first["path"], first["status"]) == ("HEAD", f"/v2/{name}/manifests/v2s2", 401), first
    accepts = [r["accept"] for r in anonymous if "accept" in r]
    assert accepts and all(len(a) == 1 and a[0].endswith("*/*") for a in accepts), accepts
    tokens = _token_requests(anonymous)
    assert tokens and all(t == ("GET", None) for t in tokens), tokens
    assert all(not r["tls"] and r["http_version"] == "HTTP/1.1" for r in anonymous)

    since = len(observed_proxy.output())
    ref = f"{observed_proxy.host}/{name}:v1"
    res = containerd.ctr(
        "images", "pull", "--plain-http", "--user", "anyuser:anypass", "--snapshotter", "native", ref, namespace=ctr_ns
    )
    assert res.returncode == 0, res.describe()
    assert containerd.image_digest(ctr_ns, ref) == image_digests["token"][(APP, "v1")]
    tokens = _token_requests(_by(_observed(observed_proxy, since), "containerd/"))
    assert tokens and all(t == ("POST", "password") for t in tokens), tokens


def test_ctr_over_tls_is_http11_without_alpn(
    containerd: daemons.Containerd,
    observed_proxy: proxy.ProxyProc,
    image_digests: dict[str, standard.Digests],
    tmp_path: Path,
    ctr_ns: str,
) -> None:
    """ctr over TLS (hosts.toml trusting mitmproxy's own CA, which signs what the plain proxy
    presents): TLS 1.3, no SNI (an IP address), no ALPN offered, so HTTP/1.1, never HTTP/2."""
    mitm_ca = observed_proxy.config_path.parent / "mitmproxy-conf" / "mitmproxy-ca-cert.pem"
    hosts = daemons.ctr_hosts_dir(tmp_path / "hosts", observed_proxy.host, ca=mitm_ca)
    since = len(observed_proxy.output())
    ref = f"{observed_proxy.host}/{matrix.local_name('redirect', 'capability')}:multi"
    res = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", "--all-platforms", ref, namespace=ctr_ns
    )
    assert res.returncode == 0, res.describe()
    assert containerd.image_digest(ctr_ns, ref) == image_digests["redirect"][(APP, "multi")]
    seen = _by(_observed(observed_proxy, since), "containerd/")
    assert seen
    assert all(r["tls"] and r["http_version"] == "HTTP/1.1" and not r["alpn_offers"] for r in seen), seen
    assert {r["tls_version"] for r in seen} == {"TLSv1.3"}
    assert {r["sni"] for r in seen} == {None}


# --- dockerd ------------------------------------------------------------------------------------


def _docker_cells() -> list[Any]:
    cells = _cells(("http",), DOCKER_REFS)
    cells += [
        pytest.param("tls", k, m, ref, id=f"tls-{k}-{m}-{ref}")
        for k in KINDS
        for m in MAPPINGS
        for ref in DOCKER_REFS
        if m == "namespace" or k == DOCKER_TLS_CAPABILITY_KIND
    ]
    return cells


@pytest.mark.parametrize(("transport", "kind", "mapping", "ref"), _docker_cells())
def test_docker_pull(
    request: pytest.FixtureRequest,
    docker_empty: daemons.Dockerd,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    expected_blobs: dict[BlobKey, frozenset[str]],
    transport: str,
    kind: str,
    mapping: str,
    ref: str,
) -> None:
    """`docker pull HOST/NAME:TAG` (v1, multi, v2s2) or `HOST/NAME@sha256:…` (v1's digest):
    RepoDigests holds the upstream digest, every blob fetched."""
    rp = _proxy_for(request, transport)
    if transport == "tls":
        request.getfixturevalue("docker_tls_ca")
    up = upstreams[kind]
    name = f"{rp.host}/{matrix.local_name(kind, mapping)}"
    tag = "v1" if ref == "digest" else ref
    digest = image_digests[kind][(APP, tag)]
    image = f"{name}@{digest}" if ref == "digest" else f"{name}:{tag}"
    _watch(up)
    res = docker_empty.docker("pull", image)
    assert res.returncode == 0, (
        f"{res.describe()}\n--- proxy output (tail):\n{rp.output()[-3000:]}\n--- dockerd:\n{docker_empty.output_tail()}"
    )
    assert f"{name}@{digest}" in docker_empty.repo_digests(image)
    _assert_upstream_served(up, expected_blobs[(kind, tag, False)], image)


def test_docker_loopback_pull_is_tls_unverified(
    docker_empty: daemons.Dockerd, observed_proxy: proxy.ProxyProc, image_digests: dict[str, standard.Digests]
) -> None:
    """dockerd on the plain-HTTP proxy: it tries https first, mitmproxy detects the TLS ClientHello
    on the same port and presents its own certificate (from its own CA, which nobody trusts), and
    dockerd accepts it (127.0.0.0/8 is insecure: InsecureSkipVerify), so the whole pull is
    TLS 1.3 / HTTP/1.1 without ALPN and the plain-HTTP fallback is never used."""
    since = len(observed_proxy.output())
    name = f"{observed_proxy.host}/{matrix.local_name('basic', 'namespace')}"
    docker_empty.docker_checked("pull", f"{name}:multi")
    assert f"{name}@{image_digests['basic'][(APP, 'multi')]}" in docker_empty.repo_digests(f"{name}:multi")
    seen = _by(_observed(observed_proxy, since), "docker/")
    assert seen
    assert all(r["tls"] and r["http_version"] == "HTTP/1.1" and not r["alpn_offers"] for r in seen), seen
    assert [r["path"] for r in seen].count("/v2/") == 1, [r["path"] for r in seen]
    assert _token_requests(seen) == [("GET", None)]


def test_docker_login_pull_logout_pull(
    docker_empty: daemons.Dockerd,
    observed_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
) -> None:
    """`docker login HOST -u anyuser -p anypass` succeeds (no accounts: any credentials get a refresh
    token, which docker keeps as its identity token); the pull then asks POST grant_type=refresh_token;
    after `docker logout HOST` a pull works anonymously (GET /token). The upstream only ever sees the
    operator's credentials."""
    host = observed_proxy.host
    name = f"{host}/{matrix.local_name('token', 'namespace')}"
    digest = image_digests["token"][(APP, "v1")]
    issuer = upstreams["token"].token_issuer
    assert issuer is not None
    issuer.clear()
    since = len(observed_proxy.output())
    try:
        login = docker_empty.docker("login", host, "-u", "anyuser", "-p", "anypass")
        assert login.returncode == 0 and "Login Succeeded" in login.stdout, login.describe()
        stored = docker_empty.cli_auths().get(host, {})
        assert stored.get("identitytoken", "").startswith("v4.local."), stored.keys()
        seen = _by(_observed(observed_proxy, since), "docker/")
        logins = [r for r in seen if r["path"] == "/token"]
        assert [(r["method"], r["auth_scheme"], r["offline_token"]) for r in logins] == [("GET", "Basic", "true")]

        since = len(observed_proxy.output())
        docker_empty.docker_checked("pull", f"{name}:v1")
        assert f"{name}@{digest}" in docker_empty.repo_digests(f"{name}:v1")
        seen = _by(_observed(observed_proxy, since), "docker/")
        assert _token_requests(seen) == [("POST", "refresh_token")], seen
        token_line = r"^.*POST /token \(tok/\) mapping=- status=200 .*$"  # names the mapping of its scope
        assert re.search(token_line, observed_proxy.output()[since:], re.MULTILINE)
    finally:
        logout = docker_empty.docker("logout", host)
    assert logout.returncode == 0, logout.describe()
    assert host not in docker_empty.cli_auths()

    docker_empty.clear_images()
    since = len(observed_proxy.output())
    docker_empty.docker_checked("pull", f"{name}:v1")
    assert f"{name}@{digest}" in docker_empty.repo_digests(f"{name}:v1")
    seen = _by(_observed(observed_proxy, since), "docker/")
    tokens = [r for r in seen if r["path"] == "/token"]
    assert [(r["method"], r["auth_scheme"]) for r in tokens] == [("GET", None)], tokens
    up = upstreams["token"]
    # The proxy may reuse an upstream token it fetched earlier; whatever it asked, it asked as the operator.
    assert all(r.user == up.username for r in issuer.requests())
