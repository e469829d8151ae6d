"""Pulls through a real mitmdump running the addon, from real docker-registry upstreams of every kind.

One proxy serves the whole module: namespace mappings onto each upstream kind, a capability
mapping onto the token upstream (whose credentials only the proxy has), overlapping keys, and a
dead and a stalled upstream. Digests the client recorded are compared with the upstream's.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from regproxy.config import load_file
from regproxy.tokens.paseto import Grant, TokenCodec
from rig import clients, images, proxy, registry, standard
from rig.keys import CAP
from rig.procs import Proc, free_port, with_free_port
from rig.standard import APP, MANY, MANY_TAGS, SOLO

pytestmark = pytest.mark.e2e

KEY_HEX = "5e" * 16 + "a7" * 16
NS = {"anonymous": "anon", "basic": "basic", "token": "tok", "redirect": "redir"}
REPO = Path(__file__).resolve().parents[2]
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]


def mapping_id(p: proxy.ProxyProc, key: str) -> str:
    """The identity a token grant names for the proxy's mapping `key` (see Mapping.identity)."""
    config = load_file(p.config_path, {"REGISTRYPROXY_SECRETKEY": KEY_HEX, **p.env})
    return next(m.identity for m in config.mappings if m.key == key)


class FaultServer:
    """A fault-injecting upstream on loopback: accepts connections and hands each to `handle`.

    The base class never answers (a stalled upstream); subclasses misbehave in other ways.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            conn.settimeout(5)
            try:
                self.handle(conn)
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:
        """Keep the connection open and say nothing."""

    def close(self) -> None:
        self._stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


Stall = FaultServer


class MidBodyStall(FaultServer):
    """Answers any request with a 200 head promising 1 MB, sends 1 KB, then stalls."""

    def handle(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
            + b"x" * 1024
        )


class Blackhole:
    """A port whose TCP connects never complete: a listener that never accepts, its backlog full."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(c)
        time.sleep(0.2)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def faults() -> Iterator[tuple[MidBodyStall, Blackhole]]:
    m, b = MidBodyStall(), Blackhole()
    yield m, b
    m.close()
    b.close()


@pytest.fixture(scope="module")
def stall() -> Iterator[Stall]:
    s = Stall()
    yield s
    s.close()


def _config(
    up: dict[str, registry.Upstream], stall_port: int, midbody_port: int, blackhole_port: int
) -> dict[str, Any]:
    proxies: dict[str, Any] = {}
    for kind, prefix in NS.items():
        u = up[kind]
        m: dict[str, Any] = {"registry": u.url, "remote": "platform"}
        if u.username:
            m.update(username=u.username, password=u.password)
        proxies[f"{prefix}/"] = m
        lib: dict[str, Any] = {"registry": u.url, "remote": "library"}
        if u.username:
            lib.update(username=u.username, password=u.password)
        proxies[f"{prefix}-lib/"] = lib
    tok = up["token"]
    proxies[f"{CAP}/app"] = {
        "registry": tok.url,
        "remote": APP,
        "username": tok.username,
        "password_env": "RP_TEST_CAP_PASSWORD",
    }
    # Overlapping keys: the longest, by whole segments, wins.
    proxies["ov/"] = {"registry": up["anonymous"].url, "remote": "platform"}
    proxies["ov/deep/"] = {"registry": up["basic"].url, "remote": "platform", "auth": up["basic"].basic_auth_header()}
    proxies["ov/app"] = {"registry": up["redirect"].url, "remote": APP, "auth": up["redirect"].basic_auth_header()}
    proxies["dom/"] = {"registry": up["anonymous"].url, "remote": "platform", "hosts": ["images.test"]}
    proxies["dead/"] = {"registry": f"http://127.0.0.1:{free_port()}", "remote": "platform"}
    proxies["stall/"] = {"registry": f"http://127.0.0.1:{stall_port}", "remote": "platform"}
    proxies["midbody/"] = {"registry": f"http://127.0.0.1:{midbody_port}", "remote": "platform"}
    proxies["blackhole/"] = {"registry": f"http://127.0.0.1:{blackhole_port}", "remote": "platform"}
    return {"secretkey": KEY_HEX, "upstream_timeout": 3, "proxies": proxies}


@pytest.fixture(scope="module")
def rp(
    upstreams: dict[str, registry.Upstream],
    stall: Stall,
    faults: tuple[MidBodyStall, Blackhole],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[proxy.ProxyProc]:
    env = {"RP_TEST_CAP_PASSWORD": upstreams["token"].password or ""}
    config = _config(upstreams, stall.port, faults[0].port, faults[1].port)
    p = proxy.start_proxy(config, tmp_path_factory.mktemp("rp"), env=env)
    yield p
    p.stop()


def token_for(rp: proxy.ProxyProc, *names: str) -> str:
    r = httpx.get(f"{rp.url}/token", params=[("scope", f"repository:{n}:pull") for n in names], timeout=30)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def get(rp: proxy.ProxyProc, path: str, tok: str | None = None, method: str = "GET", **kw: Any) -> httpx.Response:
    given = kw.pop("headers", [])
    headers = list(given.items()) if isinstance(given, dict) else list(given)
    if "/manifests/" in path and not any(k.lower() == "accept" for k, _ in headers):
        headers += [("Accept", t) for t in MANIFEST_TYPES]
    if tok:
        headers.append(("Authorization", f"Bearer {tok}"))
    return httpx.request(method, f"{rp.url}{path}", headers=headers, timeout=30, **kw)


# --- pulls --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NS))
@pytest.mark.parametrize("tag", ["v1", "v2s2"])
def test_namespace_pull_keeps_the_digest(
    rp: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_layout: Path,
    kind: str,
    tag: str,
) -> None:
    up = upstreams[kind]
    up.clear_access_log()
    res = clients.skopeo_copy(f"{rp.host}/{NS[kind]}/app:{tag}", tmp_layout, tag=tag).check()
    assert res.digest == image_digests[kind][(APP, tag)]
    log = up.access_log()
    assert log, "the upstream saw no request"
    # Nothing outside the mapping's remote prefix was asked of the upstream.
    assert all(e.path == "/v2/" or e.path.startswith("/v2/platform/") for e in log), log
    if kind != "anonymous":
        assert all(e.had_authorization for e in log if e.path != "/v2/"), log
    if kind == "redirect":
        assert up.blob_server is not None
        blob_requests = up.blob_server.requests()
        assert blob_requests, "blobs were not fetched from the redirect target"
        assert not any(r.had_authorization for r in blob_requests)


@pytest.mark.parametrize("kind", list(NS))
def test_multi_arch_index_pull_all(
    rp: proxy.ProxyProc,
    image_digests: dict[str, standard.Digests],
    tmp_layout: Path,
    kind: str,
) -> None:
    res = clients.skopeo_copy(f"{rp.host}/{NS[kind]}/app:multi", tmp_layout, all=True, tag="multi").check()
    assert res.digest == image_digests[kind][(APP, "multi")]


def test_capability_pull_uses_only_the_proxys_credentials(
    rp: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_layout: Path,
) -> None:
    up = upstreams["token"]
    assert up.token_issuer is not None
    up.token_issuer.clear()
    res = clients.skopeo_copy(f"{rp.host}/{CAP}/app:v1", tmp_layout, tag="v1").check()
    assert res.digest == image_digests["token"][(APP, "v1")]
    reqs = up.token_issuer.requests()
    assert reqs and all(r.user == up.username for r in reqs)
    assert all(s == f"repository:{APP}:pull" for r in reqs for s in r.scopes)
    # The token upstream refuses anonymous pulls, so the client really got in through the mapping.
    direct = clients.skopeo_copy(f"{up.host}/{APP}:v1", tmp_layout.with_name("direct"), tag="v1")
    assert not direct.ok


def test_library_namespace(rp: proxy.ProxyProc, image_digests: dict[str, standard.Digests], tmp_layout: Path) -> None:
    res = clients.skopeo_copy(f"{rp.host}/anon-lib/solo:latest", tmp_layout).check()
    assert res.digest == image_digests["anonymous"][(SOLO, "latest")]


def test_overlapping_keys_pick_the_longest(
    rp: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_path: Path,
) -> None:
    cases = [("ov/app", "redirect"), ("ov/deep/app", "basic"), ("ov/many", "anonymous")]
    for name, kind in cases:
        for u in upstreams.values():
            u.clear_access_log()
        tag = "v1" if "app" in name else "t007"
        key = (APP, "v1") if "app" in name else (MANY, "t007")
        res = clients.skopeo_copy(f"{rp.host}/{name}:{tag}", tmp_path / name.replace("/", "_"), tag=tag).check()
        assert res.digest == image_digests[kind][key], name
        served = [k for k, u in upstreams.items() if any(e.path != "/v2/" for e in u.access_log())]
        assert served == [kind], (name, served)


def test_head_stays_head_and_every_accept_line_goes_upstream(
    rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    up = upstreams["basic"]
    tok = token_for(rp, "basic/app")
    accepts = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
    up.clear_access_log()
    r = get(rp, "/v2/basic/app/manifests/v1", tok, method="HEAD", headers=[("Accept", a) for a in accepts])
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image_digests["basic"][(APP, "v1")]
    assert int(r.headers["content-length"]) > 0
    recs = [x for x in up.access_records() if "manifests" in x.path]
    assert [x.method for x in recs] == ["HEAD"]
    assert [v for k, v in recs[0].headers if k == "accept"] == accepts
    body = get(rp, "/v2/basic/app/manifests/v1", tok, headers=[("Accept", a) for a in accepts])
    direct = httpx.get(
        f"{up.url}/v2/{APP}/manifests/v1",
        headers=[("Accept", a) for a in accepts] + list(up.auth_headers().items()),
        timeout=30,
    )
    assert body.content == direct.content  # byte-identical manifest


def test_range_requests_pass_206(rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]) -> None:
    tok = token_for(rp, "anon/app")
    manifest = get(
        rp, "/v2/anon/app/manifests/v1", tok, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    ).json()
    layer = manifest["layers"][0]["digest"]
    full = get(rp, f"/v2/anon/app/blobs/{layer}", tok)
    part = get(rp, f"/v2/anon/app/blobs/{layer}", tok, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full.content[10:20]
    tail = get(rp, f"/v2/anon/app/blobs/{layer}", tok, headers={"Range": "bytes=100-"})
    assert tail.status_code == 206 and tail.content == full.content[100:]


@pytest.mark.parametrize("kind", ["anonymous", "token"])
def test_tags_list_paginates_through_link_with_local_names(
    rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream], kind: str
) -> None:
    """distribution 2.8 ignores `n` on tags/list; the proxy then pages the list itself."""
    name = f"{NS[kind]}/many"
    tok = token_for(rp, name)
    upstreams[kind].clear_access_log()
    path: str | None = f"/v2/{name}/tags/list?n=50&bogus=1"
    tags: list[str] = []
    pages = 0
    while path is not None and pages < 10:
        r = get(rp, path, tok)
        assert r.status_code == 200, r.text
        assert int(r.headers["content-length"]) == len(r.content)
        body = r.json()
        assert body["name"] == name
        tags += body["tags"]
        pages += 1
        link = r.headers.get("link")
        path = None
        if link is not None:
            assert "platform" not in link and link.endswith('>; rel="next"')
            path = link.split(">")[0].lstrip("<")
            assert path.startswith(f"/v2/{name}/tags/list?")
    assert pages == 3
    assert tags == sorted(MANY_TAGS)
    paths = [e.path for e in upstreams[kind].access_log() if "tags" in e.path]
    assert paths[0] == "/v2/platform/many/tags/list?n=50"  # unknown parameters are not forwarded


def test_redirected_blob_reaches_the_client_without_the_proxys_token(
    rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]
) -> None:
    up = upstreams["redirect"]
    assert up.blob_server is not None
    tok = token_for(rp, "redir/app")
    manifest = get(
        rp, "/v2/redir/app/manifests/v1", tok, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    ).json()
    r = get(rp, f"/v2/redir/app/blobs/{manifest['layers'][0]['digest']}", tok)
    assert r.status_code == 307
    location = r.headers["location"]
    assert location.startswith(up.blob_server.url)
    assert httpx.get(location, timeout=30).status_code == 200
    assert httpx.get(location, headers={"Authorization": f"Bearer {tok}"}, timeout=30).status_code == 403


def test_hosts_mapping_serves_only_its_domain_and_realm_follows_it(
    rp: proxy.ProxyProc, image_digests: dict[str, standard.Digests]
) -> None:
    # mitmdump was started without keep_host_header: the addon must have turned it on itself.
    host = {"Host": "images.test"}
    ping = get(rp, "/v2/", headers=host)
    assert 'realm="http://images.test/token"' in ping.headers["www-authenticate"]
    t = httpx.get(f"{rp.url}/token", params={"scope": "repository:dom/app:pull"}, headers=host, timeout=30)
    tok = t.json()["token"]
    r = get(rp, "/v2/dom/app/manifests/v1", tok, headers=host)
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image_digests["anonymous"][(APP, "v1")]
    # The same token on the proxy's other name is foreign; a token for that name finds no mapping.
    _expect_401(get(rp, "/v2/dom/app/manifests/v1", tok))
    assert get(rp, "/v2/dom/app/manifests/v1", token_for(rp, "dom/app")).status_code == 404


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_upstream_401_is_rewritten_to_the_proxys_challenge(
    rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream], method: str
) -> None:
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    tok = codec.issue_access(rp.url, (Grant(mapping_id(rp, "tok/"), ("tok/app",), "not-an-upstream-token"),), 60)
    upstreams["token"].clear_access_log()
    r = get(rp, "/v2/tok/app/manifests/v1", tok, method=method)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge == (
        f'Bearer realm="{rp.url}/token",service="{rp.host}",scope="repository:tok/app:pull",error="invalid_token"'
    )
    assert upstreams["token"].access_log()[-1].path == "/v2/platform/app/manifests/v1"
    if method == "GET":
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert b"platform" not in r.content


@pytest.fixture
def own_upstream(tmp_path: Path) -> Iterator[registry.Upstream]:
    """An anonymous upstream of this test's own, so that what it pushes stays out of the shared ones."""
    up = registry.start_upstream("anonymous", tmp_path / "own-upstream")
    yield up
    up.stop()


def test_large_blob_streams_with_flat_memory(own_upstream: registry.Upstream, make_proxy: Any) -> None:
    """A 256 MiB blob through the proxy: the proxy's peak RSS stays far below the blob's size."""
    up = own_upstream
    rp = make_proxy({"secretkey": KEY_HEX, "proxies": {"anon/": {"registry": up.url, "remote": "platform"}}})
    size = 256 * 1024 * 1024
    dgst = images.push_blob(up, "platform/big", size)
    tok = token_for(rp, "anon/big")
    received = hashlib.sha256()
    total = 0
    with httpx.stream("GET", f"{rp.url}/v2/anon/big/blobs/{dgst}", headers={"Authorization": f"Bearer {tok}"}) as r:
        assert r.status_code == 200
        for part in r.iter_bytes():
            received.update(part)
            total += len(part)
    assert total == size and f"sha256:{received.hexdigest()}" == dgst
    peak_kb = _peak_rss_kb(rp)
    assert peak_kb < 200 * 1024, f"proxy peak RSS {peak_kb} kB while streaming a {size >> 20} MiB blob"


@pytest.mark.parametrize("authorized", [False, True])
def test_huge_upload_is_refused_unread(rp: proxy.ProxyProc, authorized: bool) -> None:
    """A 4 GiB PUT to the pull-only proxy: the connection is closed without the body being read."""
    tok = token_for(rp, "anon/app")
    auth = f"Authorization: Bearer {tok}\r\n" if authorized else ""
    head = (
        f"PUT /v2/anon/app/blobs/uploads/x?digest=sha256:{'0' * 64} HTTP/1.1\r\nHost: {rp.host}\r\n{auth}"
        f"Content-Type: application/octet-stream\r\nContent-Length: {4 << 30}\r\n\r\n"
    ).encode()
    chunk = b"\0" * (1 << 20)
    sent = 0
    closed = False
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rp.port), timeout=10) as s:
        s.sendall(head)
        try:
            while sent < (512 << 20) and time.monotonic() - started < 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            closed = True
        if not closed:
            s.settimeout(5)
            try:
                closed = s.recv(1) == b""
            except OSError:
                closed = True
    assert closed, f"the proxy kept reading: {sent >> 20} MiB sent"
    assert sent < (512 << 20)
    assert _peak_rss_kb(rp) < 200 * 1024
    assert get(rp, "/v2/anon/app/manifests/v1", tok).status_code == 200  # and it keeps serving


def _peak_rss_kb(rp: proxy.ProxyProc) -> int:
    status = Path(f"/proc/{rp.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


# --- refusals ---------------------------------------------------------------------------------


def test_unknown_names_get_404_name_unknown(rp: proxy.ProxyProc) -> None:
    bodies = []
    for name in ("nothing/here", f"{CAP[:-1]}0/app", f"{CAP}/other", "anon"):
        tok = token_for(rp, name)
        r = get(rp, f"/v2/{name}/manifests/v1", tok)
        assert r.status_code == 404, name
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        bodies.append((r.content, sorted((k, v) for k, v in r.headers.items() if k != "date")))
    assert all(b == bodies[0] for b in bodies)
    rc, _, _ = clients.skopeo_inspect(f"{rp.host}/nothing/here:v1")
    assert rc != 0


def test_unknown_tag_and_blob_answer_registry_errors_without_upstream_names(rp: proxy.ProxyProc) -> None:
    tok = token_for(rp, f"{CAP}/app")
    r = get(rp, f"/v2/{CAP}/app/manifests/nope", tok)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    r = get(rp, f"/v2/{CAP}/app/blobs/sha256:{'0' * 64}", tok)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert b"platform" not in r.content


def _expect_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer realm=")
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_bad_tokens_get_401(rp: proxy.ProxyProc) -> None:
    good = token_for(rp, "tok/app")
    tampered = good[:-10] + ("A" if good[-10] != "A" else "B") + good[-9:]
    foreign = TokenCodec((b"\x01" * 32,)).issue_access(rp.url, (Grant(mapping_id(rp, "tok/"), ("tok/app",), None),), 60)
    other_mapping = token_for(rp, "anon/app")
    for bad in (tampered, foreign, other_mapping, good[:50], "v2.local.AAAA", "not-a-token"):
        _expect_401(get(rp, "/v2/tok/app/manifests/v1", bad))
    _expect_401(get(rp, "/v2/tok/app/manifests/v1", headers={"Authorization": "Basic dXNlcjpwYXNz"}))
    assert get(rp, "/v2/tok/app/manifests/v1", good).status_code == 200


def test_expired_token_gets_401(rp: proxy.ProxyProc) -> None:
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    expired = codec.issue_access(rp.url, (Grant(mapping_id(rp, "anon/"), ("anon/app",), None),), 3)
    assert get(rp, "/v2/anon/app/manifests/v1", expired).status_code == 200
    time.sleep(3.5)
    _expect_401(get(rp, "/v2/anon/app/manifests/v1", expired))


def test_token_endpoint_cuts_actions_to_pull(rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]) -> None:
    up = upstreams["token"]
    assert up.token_issuer is not None
    up.token_issuer.clear()
    r = httpx.post(
        f"{rp.url}/token",
        data={
            "grant_type": "password",
            "username": "x",
            "password": "y",
            "scope": "repository:tok/cut-check:push,pull,* repository:tok/push-only:push",
        },
        timeout=30,
    )
    assert r.status_code == 200 and "refresh_token" in r.json()
    # A repository no earlier test asked for, so the upstream token cannot come from the proxy's cache.
    assert [s for q in up.token_issuer.requests() for s in q.scopes] == ["repository:platform/cut-check:pull"]
    tok = r.json()["token"]
    put = get(rp, "/v2/tok/cut-check/manifests/v9", tok, method="PUT", content=b"{}")
    assert put.status_code == 405
    refreshed = httpx.post(
        f"{rp.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": r.json()["refresh_token"],
            "scope": "repository:tok/app:pull",
        },
        timeout=30,
    )
    assert refreshed.status_code == 200
    assert get(rp, "/v2/tok/app/manifests/v1", refreshed.json()["token"]).status_code == 200
    bad = httpx.post(
        f"{rp.url}/token", data={"grant_type": "refresh_token", "refresh_token": "v4.local.xx"}, timeout=30
    )
    assert bad.status_code == 401


def test_upstream_token_is_reused_across_client_tokens(
    rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]
) -> None:
    up = upstreams["token"]
    assert up.token_issuer is not None
    up.token_issuer.clear()
    client_tokens = {token_for(rp, "tok/reuse-check") for _ in range(5)}
    assert len(client_tokens) == 5  # every client gets a token of its own ...
    assert up.token_issuer.count() == 1  # ... wrapping one upstream token, fetched once
    token_for(rp, "tok/reuse-check", "tok/reuse-other")
    assert up.token_issuer.count() == 2  # another set of repositories is another upstream token


def test_dead_and_stalled_upstreams_answer_registry_errors_in_bounded_time(rp: proxy.ProxyProc) -> None:
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    for prefix in ("dead", "stall"):
        name = f"{prefix}/app"
        tok = codec.issue_access(rp.url, (Grant(mapping_id(rp, f"{prefix}/"), (name,), None),), 60)
        started = time.monotonic()
        r = get(rp, f"/v2/{name}/manifests/v1", tok)
        assert time.monotonic() - started < 10
        assert r.status_code in (502, 504), r.text
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        # Its token endpoint fails the same way, and everything else keeps being served.
        t = httpx.get(f"{rp.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
        assert t.status_code in (502, 504) and t.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert get(rp, "/v2/anon/app/manifests/v1", token_for(rp, "anon/app")).status_code == 200


def test_upstream_stalling_mid_blob_fails_the_transfer_in_bounded_time(rp: proxy.ProxyProc) -> None:
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    tok = codec.issue_access(rp.url, (Grant(mapping_id(rp, "midbody/"), ("midbody/app",), None),), 60)
    started = time.monotonic()
    received = 0
    url = f"{rp.url}/v2/midbody/app/blobs/sha256:{'1' * 64}"
    # A short body is an error for the client, never a silent success.
    with pytest.raises(httpx.TransportError), httpx.stream("GET", url, headers={"Authorization": f"Bearer {tok}"}) as r:
        assert r.status_code == 200
        for part in r.iter_bytes():
            received += len(part)
    assert received < 1_000_000
    assert time.monotonic() - started < 10  # upstream_timeout is 3 s
    assert get(rp, "/v2/anon/app/manifests/v1", token_for(rp, "anon/app")).status_code == 200


def test_blackholed_upstream_connect_is_bounded(rp: proxy.ProxyProc) -> None:
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    tok = codec.issue_access(rp.url, (Grant(mapping_id(rp, "blackhole/"), ("blackhole/app",), None),), 60)
    started = time.monotonic()
    r = get(rp, "/v2/blackhole/app/manifests/v1", tok)
    assert 2.5 < time.monotonic() - started < 10  # the connect hung until upstream_timeout (3 s)
    assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_no_secret_in_the_proxys_output(rp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]) -> None:
    """Runs last in this module: everything above went through this proxy."""
    tokens = [token_for(rp, f"{CAP}/app", "tok/app", "redir/app", "basic/app")]
    get(rp, f"/v2/{CAP}/app/manifests/v1", tokens[0])
    secrets = {KEY_HEX, CAP, *tokens}
    for u in upstreams.values():
        if u.password:
            secrets |= {u.password, u.basic_auth_header() or ""}
    output = rp.output()
    assert "GET" in output  # the proxy did log requests
    assert "eyJ" not in output  # no upstream JWT
    assert "v4.local." not in output  # no PASETO
    for s in filter(None, secrets):
        assert s not in output, f"a secret ({len(s)} chars) appears in the proxy's output"


# --- start-up ---------------------------------------------------------------------------------


class RunSh:
    """`./run.sh ARGS` with a config, in its own process group (rig.procs.Proc): started on a free port
    (another one when something took it before run.sh bound it), waited for, stopped."""

    def __init__(self, config_text: str, tmp_path: Path, args: list[str]) -> None:
        self.config_text = config_text
        self.tmp_path = tmp_path
        self.args = args
        self.port = 0
        self.proc: Proc | None = None
        self.output = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self, port: int) -> tuple[Proc, int]:
        cfg = self.tmp_path / "run-sh.yaml"
        cfg.write_text(f"listen_addr: 127.0.0.1\nport: {port}\n{self.config_text}")
        env = {**os.environ, "REGISTRYPROXY_CONFIG": str(cfg)}
        proc = Proc("run.sh").start([str(REPO / "run.sh"), *self.args], env=env)
        try:
            # A refused connection is "not yet"; run.sh exiting (a port taken first among others) ends the wait.
            url = f"http://127.0.0.1:{port}/v2/"
            proc.wait_ready(lambda: httpx.get(url, timeout=2).status_code > 0, 60, f"to answer {url}", interval=0.2)
        except BaseException:
            proc.stop(timeout=15)
            raise
        return proc, port

    def __enter__(self) -> Self:
        self.proc, self.port = with_free_port(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=15)
            self.output = self.proc.output()


@pytest.mark.parametrize("mode", [[], ["--stock"], ["--workers", "2"]], ids=["lean", "stock", "workers"])
def test_run_sh_starts_the_proxy_with_a_config(
    tmp_path: Path,
    mode: list[str],
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
) -> None:
    up = upstreams["token"]
    config = (
        f"proxies:\n  'x/':\n    registry: {up.url}\n    remote: platform\n"
        f"    username: {up.username}\n    password: {up.password}\n"
    )
    with RunSh(config, tmp_path, mode) as run:
        assert httpx.get(f"{run.url}/v2/", timeout=10).status_code == 401
        # A token from one process is good on every other (workers share one key), each request
        # on a new connection so that HAProxy spreads them.
        tok = httpx.get(f"{run.url}/token", params={"scope": "repository:other/app:pull"}, timeout=10).json()["token"]
        for _ in range(4):
            assert (
                httpx.get(f"{run.url}/v2/", headers={"Authorization": f"Bearer {tok}"}, timeout=10).status_code == 200
            )
        pulled = clients.skopeo_copy(f"127.0.0.1:{run.port}/x/app:multi", tmp_path / "pulled", all=True, tag="multi")
        assert pulled.check().digest == image_digests["token"][(APP, "multi")]
    assert "random one for this process" in run.output
    if mode == ["--workers", "2"]:
        assert "2 workers on 127.0.0.1:" in run.output
        assert run.output.count("GET /v2/ mapping=- status=200") >= 4


def test_saved_flows_hold_no_credential_or_capability_key(
    tmp_path: Path, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    """`./run.sh -w FILE` (the lean master saving flows): credentials and capability keys stay out."""
    from mitmproxy import http
    from mitmproxy import io as mitmio

    up = upstreams["basic"]
    config = (
        f"secretkey: '{KEY_HEX}'\nproxies:\n  '{CAP}/app':\n"
        f"    registry: {up.url}\n    remote: {APP}\n    username: {up.username}\n    password: {up.password}\n"
    )
    flows_file = tmp_path / "flows.mitm"
    with RunSh(config, tmp_path, ["-w", str(flows_file)]) as run:
        res = clients.skopeo_copy(f"127.0.0.1:{run.port}/{CAP}/app:v1", tmp_path / "pulled", tag="v1").check()
        assert res.digest == image_digests["basic"][(APP, "v1")]
        httpx.put(f"{run.url}/v2/{CAP}/app/manifests/v1", content=b"{}", timeout=10)
    raw = flows_file.read_bytes()
    with flows_file.open("rb") as fh:
        flows = list(mitmio.FlowReader(fh).stream())
    assert len(flows) >= 5
    assert CAP.encode() not in raw
    assert b"v4.local." not in raw and b"eyJ" not in raw  # no PASETO, no upstream JWT
    assert (up.password or "").encode() not in raw and (up.basic_auth_header() or "").encode() not in raw
    for f in flows:
        assert isinstance(f, http.HTTPFlow)
        assert f.request.headers.get("authorization") in (None, "[redacted]")


def test_bad_config_refuses_start_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    secret = "supersecretpassword123"
    cfg.write_text(
        "secretkey: nothex\nproxies:\n  'x/':\n    registry: http://127.0.0.1:9\n"
        f"    username: u\n    password: {secret}\n"
    )
    env = {**os.environ, "REGISTRYPROXY_CONFIG": str(cfg)}
    res = subprocess.run([str(REPO / "run.sh")], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "registryproxy: secretkey: is not hex; it must be 64 hex digits (32 bytes)"
    ]
    assert secret not in res.stdout + res.stderr


@pytest.mark.parametrize(
    ("content", "args", "line"),
    [
        ("secretkey: nothex\n", [], "registryproxy: secretkey: is not hex; it must be 64 hex digits (32 bytes)"),
        ("", ["--set", "registryproxy_client_timeout=-1"], "registryproxy: registryproxy_client_timeout: must be"),
    ],
    ids=["config", "option"],
)
def test_bad_config_or_option_under_stock_mitmdump_is_one_line(
    tmp_path: Path, content: str, args: list[str], line: str
) -> None:
    """`mitmdump -s addon/registryproxy.py`: mitmproxy's script loader would print a script's option error
    with its traceback; the chain logs one line and mitmproxy ends start-up on it."""
    cfg = tmp_path / "c.yaml"
    secret = "supersecretpassword123"
    cfg.write_text(
        f"{content}proxies:\n  'x/':\n    registry: http://127.0.0.1:9\n    username: u\n    password: {secret}\n"
    )
    env = {**os.environ, "REGISTRYPROXY_CONFIG": str(cfg)}
    script = str(proxy.ADDON_SCRIPT)
    cmd = [str(proxy.mitmdump_binary()), "-s", script, "--mode", "reverse:http://127.0.0.1:9@127.0.0.1:0", *args]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out and secret not in out
    errors = [x for x in out.splitlines() if "registryproxy: " in x and ("must" in x or "not hex" in x)]
    assert len(errors) == 1 and line in errors[0], out
    assert "Error logged during startup, exiting..." in out


def test_json_bodies_are_registry_errors(rp: proxy.ProxyProc) -> None:
    for path in ("/nothing", "/v2/UPPER/manifests/v1", "/v2/a/manifests/bad^tag"):
        r = get(rp, path)
        assert r.status_code in (400, 401, 404)
        assert json.loads(r.content)["errors"][0]["code"]
