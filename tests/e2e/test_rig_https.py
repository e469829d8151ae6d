"""The production-like rig, proven directly (no proxy): HTTPS upstreams from a test CA with the token
service and the blob store on servers of their own (rig/https_upstream.py), with the delay relays in
front of them (rig/relay.py), and the timed pulls of rig/wan.py. The relay on its own: test_rig_relay.py."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rig import clients, daemons, wan
from rig.https_upstream import HTTPS_KINDS, HttpsRig, HttpsUpstream, client_context
from rig.standard import APP, SOLO, TestImages

pytestmark = pytest.mark.e2e

D = 0.010  # the one-way delay the timing tests use (20 ms round trip)


def _client(u: HttpsUpstream) -> httpx.Client:
    return httpx.Client(timeout=30, trust_env=False, follow_redirects=False, verify=u.httpx_verify())


def _blob_path(digest: str) -> str:
    return f"/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("containerd"))
    yield d
    d.stop()


# -- the upstreams, directly ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", HTTPS_KINDS)
def test_skopeo_pulls_each_https_kind(kind: str, https_rig: HttpsRig, test_images: TestImages, tmp_path: Path) -> None:
    u = https_rig[kind]
    u.clear_logs()
    res = clients.skopeo_copy(
        f"{u.host}/{APP}:v1", tmp_path / "v1", creds=u.push_creds, tls_verify=True, cert_dir=u.cert_dir, tag="v1"
    )
    assert res.check().digest == https_rig.digests[kind][(APP, "v1")] == test_images.v1.digest
    res = clients.skopeo_copy(
        f"{u.host}/{APP}:multi", tmp_path / "multi", all=True, creds=u.push_creds, tls_verify=True, cert_dir=u.cert_dir
    )
    assert res.check().digest == https_rig.digests[kind][(APP, "multi")] == test_images.multi.digest
    res = clients.skopeo_copy(
        f"{u.host}/{SOLO}:latest", tmp_path / "solo", creds=u.push_creds, tls_verify=True, cert_dir=u.cert_dir
    )
    assert res.check().digest == https_rig.digests[kind][(SOLO, "latest")]

    log = u.access_log()
    assert ("GET", "/v2/", False) in log
    assert any(e.path == f"/v2/{APP}/manifests/v1" and e.had_authorization == (kind != "https-anon") for e in log)
    if u.token_issuer is not None:
        assert u.token_issuer.count() >= 1
        assert all(r.status == 200 and r.user == u.username for r in u.token_issuer.requests())
    if u.blob_server is not None:  # every blob came from the blob store, without Authorization
        reqs = u.blob_server.requests()
        assert {r.path for r in reqs} >= {_blob_path(b.digest) for b in test_images.v1.layers}
        assert not any(r.had_authorization for r in reqs)
        assert set(u.blob_server.statuses()) == {200}


def test_skopeo_checks_the_upstream_certificate(https_rig: HttpsRig, tmp_path: Path) -> None:
    """The upstreams really are TLS with the rig's CA: without it skopeo refuses them."""
    u = https_rig["https-anon"]
    res = clients.skopeo_copy(f"{u.host}/{APP}:v1", tmp_path / "x", tls_verify=True)
    assert not res.ok
    assert "x509: certificate signed by unknown authority" in res.stderr, res.describe()


@pytest.mark.parametrize("kind", HTTPS_KINDS)
def test_ctr_pulls_each_https_kind(
    kind: str, https_rig: HttpsRig, containerd: daemons.Containerd, tmp_path: Path
) -> None:
    """`ctr images pull --hosts-dir D [--user U:P]`: hosts.toml names the CA, which also covers the
    token service and the blob store (same client)."""
    u = https_rig[kind]
    u.clear_logs()
    ref = f"{u.host}/{APP}:v1"
    args = ["images", "pull", "--hosts-dir", str(u.ctr_hosts_dir(tmp_path / "hosts")), "--snapshotter", "native"]
    if u.push_creds is not None:
        args += ["--user", u.push_creds]
    ns = f"https-{kind}"
    try:
        res = containerd.ctr(*args, ref, namespace=ns)
        assert res.returncode == 0, res.describe()
        assert containerd.image_digest(ns, ref) == https_rig.digests[kind][(APP, "v1")]
    finally:
        if ns in containerd.ctr_checked("namespaces", "ls", "-q").stdout.split():
            containerd.remove_namespace(ns)
    assert any(e.method == "HEAD" and e.path == f"/v2/{APP}/manifests/v1" for e in u.access_log())
    if u.blob_server is not None:
        assert u.blob_server.count() >= 3 and not any(r.had_authorization for r in u.blob_server.requests())
    if u.token_issuer is not None:
        assert {r.method for r in u.token_issuer.requests()} <= {"GET", "POST"}
        assert all(r.status == 200 for r in u.token_issuer.requests())


def test_servers_names_and_certificates(https_rig: HttpsRig) -> None:
    """Registry and token service under `localhost`, the blob store under `127.0.0.1`; each presents
    a certificate that Python's strict default context accepts for that name, ALPN http/1.1."""
    u = https_rig["https-redirect"]
    assert u.url.startswith("https://localhost:") and u.host == u.url.removeprefix("https://")
    assert u.token_realm is not None and u.token_realm.startswith("https://localhost:")
    assert u.token_realm.endswith("/token") and u.token_realm != u.url + "/token"
    assert u.blobs_url is not None and u.blobs_url.startswith("https://127.0.0.1:")
    ctx = client_context(https_rig.ca)
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    for url in (u.url, u.token_realm, u.blobs_url):
        parsed = httpx.URL(url)
        assert parsed.port is not None
        raw = socket.create_connection((parsed.host, parsed.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=parsed.host) as conn:
            assert conn.selected_alpn_protocol() in (None, "http/1.1")
    # The challenge names the relayed realm; absolute URLs the registry writes are on its public URL.
    with _client(u) as c:
        r = c.get(f"{u.url}/v2/")
        assert r.status_code == 401
        assert f'realm="{u.token_realm}"' in r.headers["www-authenticate"]
        scopes = [f"repository:{APP}:pull,push"]
        r = c.post(f"{u.url}/v2/{APP}/blobs/uploads/", headers=u.auth_headers(scopes))
        assert r.status_code == 202 and r.headers["location"].startswith(f"{u.url}/v2/{APP}/blobs/uploads/")
        c.delete(r.headers["location"], headers=u.auth_headers(scopes))


def test_blob_store_refuses_authorization(https_rig: HttpsRig, test_images: TestImages) -> None:
    u = https_rig["https-redirect"]
    assert u.blob_server is not None and u.blobs_url is not None
    layer = test_images.v1.layers[0]
    with _client(u) as c:
        r = c.get(f"{u.url}/v2/{APP}/blobs/{layer.digest}", headers=u.auth_headers([f"repository:{APP}:pull"]))
        assert r.status_code == 307
        location = r.headers["location"]
        assert location.startswith(u.blobs_url) and _blob_path(layer.digest) in location
        u.blob_server.clear()
        refused = c.get(location, headers={"Authorization": "Bearer anything"})
        assert refused.status_code == 403 and b"InvalidArgument" in refused.content
        ok = c.get(location)
        assert ok.status_code == 200 and "sha256:" + hashlib.sha256(ok.content).hexdigest() == layer.digest
    assert [
        (q.had_authorization, s) for q, s in zip(u.blob_server.requests(), u.blob_server.statuses(), strict=True)
    ] == [
        (True, 403),
        (False, 200),
    ]


# -- distance ---------------------------------------------------------------------------------------


def _new_connection_get(u: HttpsUpstream) -> float:
    """Seconds for one GET /v2/ on a new TLS connection."""
    t0 = time.perf_counter()
    with _client(u) as c:
        c.get(f"{u.url}/v2/")
    return time.perf_counter() - t0


def test_relay_adds_round_trips_to_a_request(https_rig: HttpsRig) -> None:
    """A request on a new HTTPS connection pays the TCP handshake (2D) and its own round trip (2D) at
    least (TLS adds another), and each request is one connection at the relay."""
    u = https_rig["https-anon"]
    u.reset_connections()
    near, far = [], []
    for _ in range(5):  # interleaved, so that load on the machine hits both alike
        near.append(_new_connection_get(u))
        with u.delayed(D):
            far.append(_new_connection_get(u))
    assert min(far) - min(near) >= 4 * D, (near, far)
    assert min(far) < 8 * D + 1.0, (near, far)
    assert u.connections() == {"registry": 10}


def test_relay_counts_the_connections_skopeo_opened(https_rig: HttpsRig, tmp_path: Path) -> None:
    """skopeo opens a new TLS connection per request: the registry, token and blob-store relays
    count exactly one connection per request each server saw."""
    u = https_rig["https-redirect"]
    assert u.token_issuer is not None and u.blob_server is not None and u.front is not None
    with u.delayed(D):
        u.clear_logs()
        res = clients.skopeo_copy(f"{u.host}/{APP}:v1", tmp_path / "v1", creds=u.push_creds, cert_dir=u.cert_dir)
        res.check()
    conns = u.connections()
    assert conns == {
        "registry": len(u.access_log()),
        "token": u.token_issuer.count(),
        "blobs": u.blob_server.count(),
    }
    assert conns["registry"] >= 5 and conns["blobs"] == 3
    assert u.front.connections() == conns["registry"]  # every relayed connection completed TLS


@pytest.mark.parametrize("kind", ["https-redirect", "https-basic"])
def test_timed_pulls_of_the_wan_image(
    kind: str,
    https_rig: HttpsRig,
    wan_image: wan.WanImage,
    containerd: daemons.Containerd,
    tmp_path: Path,
) -> None:
    """rig/wan.py: skopeo and ctr pull the 8 x 4 MiB image over a 20 ms round trip; each pull reports
    its wall time and the connections each upstream server accepted."""
    u = https_rig[kind]
    digest = wan_image.ensure(u)
    assert digest == wan_image.digest and len(wan_image.info.layers) == 8
    assert all(4 * wan.MIB < b.size < 4 * wan.MIB + 64 * 1024 for b in wan_image.info.layers)
    ref = f"{u.host}/{wan.WAN_NAME}:{wan.WAN_TAG}"
    with u.delayed(D):
        pulls = [
            wan.skopeo_pull(ref, tmp_path / "skopeo", creds=u.push_creds, cert_dir=u.cert_dir, counter=u),
            wan.ctr_pull(containerd, ref, hosts_dir=u.ctr_hosts_dir(tmp_path / "hosts"), creds=u.push_creds, counter=u),
        ]
    for p in pulls:
        p.check()
        print(p.describe())
        assert p.digest == digest
        # ping or HEAD, token or 401, manifest, a blob (and its redirect): >= 5 new connections in turn
        assert p.seconds >= 20 * D, p.describe()
        assert p.connections["registry"] >= 1
        if kind == "https-redirect":
            assert p.connections["token"] >= 1 and p.connections["blobs"] >= 1
    assert pulls[0].connections["registry"] >= 9  # skopeo: one connection per request
