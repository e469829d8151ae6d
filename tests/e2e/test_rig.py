"""The rig itself, proven directly against the real upstreams (no proxy involved)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from rig import clients, images, procs, proxy, registry, token_issuer
from rig.standard import APP, EXTRA_REPOS, MANY, MANY_TAGS, SOLO, Digests, TestImages

pytestmark = pytest.mark.e2e

KINDS = registry.KINDS
Upstreams = dict[str, registry.Upstream]


def _client() -> httpx.Client:
    return httpx.Client(timeout=30, trust_env=False, follow_redirects=False)


def _auth(u: registry.Upstream, name: str, actions: str = "pull") -> dict[str, str]:
    return u.auth_headers([f"repository:{name}:{actions}"])


# -- clients against every kind --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_copies_single_arch_image(
    kind: str, upstreams: Upstreams, image_digests: dict[str, Digests], tmp_layout: Path
) -> None:
    u = upstreams[kind]
    res = clients.skopeo_copy(f"{u.host}/{APP}:v1", tmp_layout, creds=u.push_creds, tag="v1")
    res.check()
    assert res.digest == images.manifest_digest(u, APP, "v1") == image_digests[kind][(APP, "v1")]


@pytest.mark.parametrize("kind", KINDS)
def test_skopeo_copies_index_with_all(
    kind: str,
    upstreams: Upstreams,
    image_digests: dict[str, Digests],
    test_images: TestImages,
    tmp_layout: Path,
) -> None:
    u = upstreams[kind]
    res = clients.skopeo_copy(f"docker://{u.host}/{APP}:multi", tmp_layout, all=True, creds=u.push_creds)
    res.check()
    assert res.digest == images.manifest_digest(u, APP, "multi") == test_images.multi.digest
    assert res.digest == image_digests[kind][(APP, "multi")]
    # Every platform's manifest came along.
    for img in test_images.multi.images:
        assert (tmp_layout / "blobs" / "sha256" / img.digest.split(":")[1]).is_file()


@pytest.mark.parametrize("kind", ["anonymous", "token"])
def test_skopeo_copies_v2s2_and_library_images(
    kind: str, upstreams: Upstreams, image_digests: dict[str, Digests], tmp_path: Path
) -> None:
    u = upstreams[kind]
    body, content_type, digest = images.get_manifest(u, APP, "v2s2")
    assert content_type == images.DOCKER_MANIFEST
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest() == image_digests[kind][(APP, "v2s2")]
    res = clients.skopeo_copy(f"{u.host}/{APP}:v2s2", tmp_path / "a", creds=u.push_creds)
    assert res.check().digest == digest  # --preserve-digests keeps the Docker manifest as is
    res = clients.skopeo_copy(f"{u.host}/{SOLO}:latest", tmp_path / "b", creds=u.push_creds)
    assert res.check().digest == image_digests[kind][(SOLO, "latest")]


def test_test_images_are_deterministic_and_valid(tmp_path: Path, test_images: TestImages) -> None:
    again = images.build_image(tmp_path / "x", "v1", layers=(1024, 4096), seed="app-v1")
    assert again.digest == test_images.v1.digest
    other = images.build_image(tmp_path / "y", "v1", layers=(1024, 4096), seed="other")
    assert other.digest != again.digest
    blobs = tmp_path / "x" / "blobs" / "sha256"
    config = json.loads((blobs / again.config.digest.split(":")[1]).read_bytes())
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    for layer, diff_id in zip(again.layers, config["rootfs"]["diff_ids"], strict=True):
        data = (blobs / layer.digest.split(":")[1]).read_bytes()
        assert layer.size == len(data)
        assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == diff_id
    platforms = [(i.os, i.architecture) for i in test_images.multi.images]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    assert test_images.multi.images[0].layers[0] != test_images.multi.images[1].layers[0]


# -- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["basic", "token", "redirect"])
def test_private_kinds_refuse_without_credentials(kind: str, upstreams: Upstreams, tmp_layout: Path) -> None:
    u = upstreams[kind]
    u.clear_access_log()
    res = clients.skopeo_copy(f"{u.host}/{APP}:v1", tmp_layout)
    assert not res.ok and res.digest is None
    assert "unauthorized" in res.stderr.lower() or "authentication required" in res.stderr.lower()
    rc, _, _ = clients.skopeo_inspect(f"{u.host}/{APP}:v1")
    assert rc != 0
    auths = [rec.authorization for rec in u.access_records()]
    assert auths and u.basic_auth_header() not in auths
    for auth in auths:
        if kind == "basic":
            # skopeo answers a Basic challenge without credentials with empty ones.
            assert auth in (None, "Basic Og==")
        elif auth is not None:
            claims = jwt.decode(auth.removeprefix("Bearer "), options={"verify_signature": False})
            assert all(not a["actions"] for a in claims["access"])
    with _client() as c:
        r = c.get(f"{u.url}/v2/{APP}/manifests/v1", headers={"Accept": images.OCI_MANIFEST})
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    if kind == "basic":
        assert challenge.startswith("Basic ")
    else:
        assert u.token_issuer is not None
        assert challenge.startswith("Bearer ")
        assert f'realm="{u.token_issuer.realm}"' in challenge
        assert f'service="{u.token_issuer.service}"' in challenge
        assert f'scope="repository:{APP}:pull"' in challenge


def test_token_kind_refuses_anonymous_token_and_wrong_password(
    upstreams: Upstreams,
) -> None:
    u = upstreams["token"]
    iss = u.token_issuer
    assert iss is not None
    iss.clear()
    anon = u.token([f"repository:{APP}:pull"], anonymous=True)
    claims = jwt.decode(anon, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": APP, "actions": []}]
    with _client() as c:
        r = c.get(
            f"{u.url}/v2/{APP}/manifests/v1",
            headers={"Authorization": f"Bearer {anon}"},
        )
        assert r.status_code == 401
        r = c.get(
            iss.realm,
            params={"service": iss.service, "scope": f"repository:{APP}:pull"},
            auth=("rig-user", "nope"),
        )
        assert r.status_code == 401
    recs = iss.requests()
    assert [(q.status, q.user, q.had_authorization) for q in recs] == [
        (200, None, False),
        (401, None, True),
    ]


def test_token_issuer_protocol(upstreams: Upstreams) -> None:
    u = upstreams["token"]
    iss = u.token_issuer
    assert iss is not None and u.username is not None and u.password is not None
    iss.clear()
    with _client() as c:
        # GET, Basic, repeated scope and several scopes in one value, account=, offline_token.
        r = c.get(
            iss.realm,
            params=[
                ("service", iss.service),
                ("scope", f"repository:{APP}:pull"),
                (
                    "scope",
                    f"repository:{MANY}:pull,push repository:127.0.0.1:5000/x/y:pull",
                ),
                ("account", u.username),
                ("offline_token", "true"),
                ("client_id", "rig-test"),
            ],
            auth=(u.username, u.password),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token"] == body["access_token"]
        assert body["expires_in"] == 300
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["issued_at"])
        refresh = body["refresh_token"]
        header = jwt.get_unverified_header(body["token"])
        assert header["alg"] == "ES256" and header["kid"] == iss.key_id
        assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", iss.key_id)
        claims = jwt.decode(
            body["token"],
            iss.public_key_pem(),
            algorithms=["ES256"],
            audience=iss.service,
        )
        assert claims["iss"] == iss.issuer and claims["sub"] == u.username
        assert {"exp", "nbf", "iat", "jti"} <= claims.keys()
        assert claims["access"] == [
            {"type": "repository", "name": APP, "actions": ["pull"]},
            {"type": "repository", "name": MANY, "actions": ["pull", "push"]},
            {"type": "repository", "name": "127.0.0.1:5000/x/y", "actions": ["pull"]},
        ]
        # The token works on the registry.
        r = c.head(
            f"{u.url}/v2/{APP}/manifests/v1",
            headers=[("Accept", t) for t in images.MANIFEST_TYPES] + [("Authorization", f"Bearer {body['token']}")],
        )
        assert r.status_code == 200
        # POST password grant (containerd) and refresh_token grant (dockerd).
        form = {
            "grant_type": "password",
            "username": u.username,
            "password": u.password,
            "scope": f"repository:{APP}:pull",
            "service": iss.service,
            "client_id": "containerd-client",
            "access_type": "online",
        }
        r = c.post(iss.realm, data=form)
        assert r.status_code == 200 and "refresh_token" in r.json()
        r = c.post(iss.realm, data={**form, "password": "wrong"})
        assert r.status_code == 401
        r = c.post(
            iss.realm,
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh,
                "service": iss.service,
                "scope": f"repository:{APP}:pull",
            },
        )
        assert r.status_code == 200
        assert jwt.decode(r.json()["token"], options={"verify_signature": False})["sub"] == u.username
        r = c.post(
            iss.realm,
            data={
                "grant_type": "refresh_token",
                "refresh_token": "bogus",
                "service": iss.service,
            },
        )
        assert r.status_code == 401
        # An expired token is refused by the registry with 401.
        expired = iss.issue_token(
            u.username,
            [{"type": "repository", "name": APP, "actions": ["pull"]}],
            now=time.time() - 3600,
        )
        r = c.get(
            f"{u.url}/v2/{APP}/manifests/v1",
            headers={"Authorization": f"Bearer {expired}"},
        )
        assert r.status_code == 401
    assert iss.count() == 5
    summary = [(q.method, q.grant_type, q.status, q.user) for q in iss.requests()]
    assert summary == [
        ("GET", None, 200, u.username),
        ("POST", "password", 200, u.username),
        ("POST", "password", 401, None),
        ("POST", "refresh_token", 200, u.username),
        ("POST", "refresh_token", 401, None),
    ]
    first = iss.requests()[0]
    assert first.params["account"] == [u.username] and len(first.params["scope"]) == 2
    assert first.had_authorization


def test_token_issuer_public_repos_and_readonly(tmp_path: Path) -> None:
    iss = token_issuer.TokenIssuer(
        tmp_path,
        {"ro": "pw", "rw": "pw"},
        public_repos={"pub/one"},
        public_prefixes=("open/",),
        readonly_users={"ro"},
    )
    scopes = ["repository:pub/one:pull,push repository:open/x/y:* repository:priv/z:pull"]
    assert iss.grant(None, scopes) == [
        {"type": "repository", "name": "pub/one", "actions": ["pull"]},
        {"type": "repository", "name": "open/x/y", "actions": ["pull"]},
        {"type": "repository", "name": "priv/z", "actions": []},
    ]
    assert [a["actions"] for a in iss.grant("ro", scopes)] == [
        ["pull"],
        ["pull"],
        ["pull"],
    ]
    assert [a["actions"] for a in iss.grant("rw", scopes)] == [
        ["pull", "push"],
        ["*"],
        ["pull"],
    ]
    assert token_issuer.parse_scopes(["registry:catalog:*", "bad", "repository:h:5000/a:pull"]) == [
        ("registry", "catalog", ["*"]),
        ("repository", "h:5000/a", ["pull"]),
    ]


# -- blob redirects -------------------------------------------------------------------------------


def test_redirect_kind_sends_blobs_to_the_blob_server(
    upstreams: Upstreams, test_images: TestImages, tmp_layout: Path
) -> None:
    u = upstreams["redirect"]
    bs = u.blob_server
    assert bs is not None
    bs.clear()
    layer = test_images.v1.layers[1]
    data = (test_images.layout / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
    with _client() as c:
        for method in ("GET", "HEAD"):
            r = c.request(method, f"{u.url}/v2/{APP}/blobs/{layer.digest}", headers=_auth(u, APP))
            assert r.status_code == 307, (method, r.status_code, r.text)
            location = r.headers["location"]
            assert location.startswith(bs.url + "docker/registry/v2/blobs/sha256/")
            assert location.split("?")[0].endswith(f"/{layer.digest.split(':')[1]}/data")
        r = c.get(location)
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-length"] == str(len(data))
        r = c.head(location)
        assert r.status_code == 200 and r.headers["content-length"] == str(len(data)) and r.content == b""
        r = c.get(location, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        r = c.get(location, headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == data[100:]
        r = c.get(location, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416
        assert c.get(bs.url + "../../etc/passwd").status_code == 404
        assert not any(q.had_authorization for q in bs.requests())
        r = c.get(location, headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and b"<Error>" in r.content
    assert bs.requests()[-1] == (
        "GET",
        location.split("?")[0].replace(bs.url.rstrip("/"), ""),
        True,
    )
    assert bs.statuses()[-1] == 403
    # A real client follows the redirect without Authorization.
    bs.clear()
    clients.skopeo_copy(f"{u.host}/{APP}:v1", tmp_layout, creds=u.push_creds).check()
    assert bs.count() >= 2 and set(bs.statuses()) == {200}
    assert not any(q.had_authorization for q in bs.requests())


@pytest.mark.parametrize("kind", ["anonymous", "basic", "token"])
def test_other_kinds_serve_blobs_directly(kind: str, upstreams: Upstreams, test_images: TestImages) -> None:
    u = upstreams[kind]
    layer = test_images.v1.layers[0]
    with _client() as c:
        r = c.get(
            f"{u.url}/v2/{APP}/blobs/{layer.digest}",
            headers={**_auth(u, APP), "Range": "bytes=0-9"},
        )
    assert r.status_code == 206 and len(r.content) == 10


# -- tags, logs ---------------------------------------------------------------------------------


def _follow_links(
    c: httpx.Client, u: registry.Upstream, first: str, key: str, scopes: list[str]
) -> tuple[list[str], list[str]]:
    """Every item under `key` over all pages from `first`, and the Link targets followed."""
    items: list[str] = []
    links: list[str] = []
    url: str | None = u.url + first
    while url is not None:
        r = c.get(url, headers=u.auth_headers(scopes))
        assert r.status_code == 200, r.text
        items += r.json()[key]
        link = r.headers.get("link")
        url = None
        if link is not None:
            m = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert m, link
            links.append(m.group(1))
            url = u.url + m.group(1)
        assert len(links) < 20
    return items, links


@pytest.mark.parametrize("kind", KINDS)
def test_tags_list_and_catalog(kind: str, upstreams: Upstreams) -> None:
    u = upstreams[kind]
    with _client() as c:
        # distribution 2.8.2 ignores n= on tags/list (tag paging came with distribution 3):
        # all 120 tags in one answer, no Link.
        r = c.get(f"{u.url}/v2/{MANY}/tags/list?n=50", headers=_auth(u, MANY))
        assert r.status_code == 200 and "link" not in r.headers
        assert r.json()["name"] == MANY and sorted(r.json()["tags"]) == list(MANY_TAGS)
        # _catalog does page, with a Link header.
        scopes = ["registry:catalog:*"]
        repos, links = _follow_links(c, u, "/v2/_catalog?n=10", "repositories", scopes)
    assert sorted(repos) == sorted([APP, MANY, SOLO, *EXTRA_REPOS])
    assert len(links) >= 2
    assert links[0] == "/v2/_catalog?last=platform%2Frepos%2Fr06&n=10"


@pytest.mark.parametrize("kind", KINDS)
def test_access_log_records_requests(kind: str, upstreams: Upstreams) -> None:
    u = upstreams[kind]
    u.clear_access_log()
    before = len(u.registry_log())
    path = f"/v2/{APP}/manifests/v1"
    with _client() as c:
        c.get(f"{u.url}/v2/")
        c.head(u.url + path, headers={"Accept": images.OCI_MANIFEST, **_auth(u, APP)})
    log = u.access_log()
    assert log[0] == ("GET", "/v2/", False)
    assert log[-1] == ("HEAD", path, kind != "anonymous")
    assert log[-1].had_authorization is (kind != "anonymous")
    reg = u.wait_registry_log(before + 2)[before:]
    assert reg == [
        ("GET", "/v2/", 200 if kind == "anonymous" else 401),
        ("HEAD", path, 200),
    ]
    assert 'msg="response completed"' in u.output()


def test_parse_registry_log() -> None:
    text = (
        'time="x" level=info msg="response completed" http.request.method=GET http.request.uri=/v2/\n'
        '127.0.0.1 - - [27/Nov/2026:08:17:54 +0000] "HEAD /v2/a/b/manifests/x HTTP/1.1" 404 91 "" "curl/7.88.1"\n'
        '127.0.0.1 - - [27/Nov/2026:08:17:55 +0000] "GET /v2/a/tags/list?n=1 HTTP/1.1" 200 - "" "Go-http-client/1.1"\n'
    )
    assert registry.parse_registry_log(text) == [
        ("HEAD", "/v2/a/b/manifests/x", 404),
        ("GET", "/v2/a/tags/list?n=1", 200),
    ]


# -- processes and the proxy launcher -------------------------------------------------------------

_THROWAWAY_ADDON = """
from mitmproxy import ctx, http


class Throwaway:
    def load(self, loader):
        loader.add_option("registryproxy_config", str, "", "config file")

    def configure(self, updated):
        if "registryproxy_config" in updated:
            print("throwaway config:", ctx.options.registryproxy_config, flush=True)

    def request(self, flow):
        flow.response = http.Response.make(
            200, b"{}", {"Docker-Distribution-Api-Version": "registry/2.0", "X-Path": flow.request.path}
        )


addons = [Throwaway()]
"""


def test_start_proxy_runs_mitmdump_with_a_script(tmp_path: Path) -> None:
    script = tmp_path / "throwaway_addon.py"
    script.write_text(_THROWAWAY_ADDON)
    p = proxy.start_proxy({"anything": {"x": 1}}, tmp_path / "proxy", script=script)
    try:
        assert p.host == f"127.0.0.1:{p.port}" and p.url == f"http://{p.host}"
        assert re.search(
            rf"reverse proxy to http://127\.0\.0\.1:9 listening at 127\.0\.0\.1:{p.port}\.",
            p.output(),
        )
        with _client() as c:
            r = c.get(f"{p.url}/v2/a/b/tags/list")
        assert r.status_code == 200 and r.headers["x-path"] == "/v2/a/b/tags/list"
        p.wait_for_output(r"throwaway config: .*registryproxy\.yaml")
        assert p.config_path.read_text().startswith("anything:")
    finally:
        p.stop()
    assert not p.running()


def test_proc_stops_the_whole_group_and_reports_output(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(c.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = procs.Proc("sleeper").start([sys.executable, "-c", code])
    p.wait_for_output(r"^ready$", timeout=10)
    child = int(marker.read_text())
    with pytest.raises(procs.RigError, match="(?s)never printed.*ready"):
        p.wait_for_output("never printed", timeout=0.3)
    port = procs.free_port()
    with pytest.raises(procs.RigError, match="timed out"):
        p.wait_for_port("127.0.0.1", port, timeout=0.3)
    assert p.stop() == -signal.SIGTERM
    # The child was in the same process group and is gone too (reaped by init or a zombie).
    status = Path(f"/proc/{child}/status")
    procs.wait_until(
        lambda: not status.exists() or "zombie" in status.read_text(),
        5,
        "the child to die",
    )


# -- waiting -------------------------------------------------------------------------------------


def test_wait_until_treats_a_raising_check_as_not_yet(tmp_path: Path) -> None:
    """A check that raises (a socket file not there yet) is polled again; a lasting error is named."""
    path = tmp_path / "appears.sock"
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            path.write_text("up")
        return path.read_text() == "up"  # FileNotFoundError twice first

    procs.wait_until(check, 5, "the file", interval=0.01)
    assert calls == 3
    with pytest.raises(procs.RigError, match=r"(?s)waiting for a socket.*FileNotFoundError") as info:
        procs.wait_until(
            lambda: (tmp_path / "never").exists() or bool((tmp_path / "never").read_text()), 0.2, "a socket"
        )
    assert isinstance(info.value.__cause__, FileNotFoundError)

    # Details that fail themselves do not hide the timeout.
    def details() -> str:
        raise KeyError("gone")

    with pytest.raises(procs.RigError, match=r"(?s)timed out.*no details: KeyError"):
        procs.wait_until(lambda: False, 0.1, "nothing", details=details)


def test_stop_waiting_ends_a_wait_at_once() -> None:
    started = time.monotonic()

    def check() -> bool:
        raise procs.StopWaiting("it exited")

    with pytest.raises(procs.StopWaiting, match="it exited"):
        procs.wait_until(check, 30, "something")
    assert time.monotonic() - started < 5


def test_wait_ready_stops_when_the_process_exits() -> None:
    p = procs.Proc("quitter").start([sys.executable, "-c", "print('bye')"])
    try:
        started = time.monotonic()
        with pytest.raises(procs.StopWaiting, match=r"(?s)quitter exited \(waiting for it to be ready\).*bye"):
            p.wait_ready(lambda: False, 30, "to be ready")
        assert time.monotonic() - started < 10
    finally:
        p.stop()


def test_with_free_port_tries_another_port_when_one_was_taken() -> None:
    tried: list[int] = []

    def taken_twice(port: int) -> int:
        tried.append(port)
        if len(tried) < 3:
            raise procs.RigError(f"listen tcp 127.0.0.1:{port}: bind: Address already in use")
        return port

    def taken(port: int) -> int:
        tried.append(port)
        raise procs.RigError("listen tcp: bind: address already in use")

    def broken(port: int) -> int:
        raise procs.RigError("something else")

    assert procs.with_free_port(taken_twice) == tried[-1] and len(tried) == 3
    tried.clear()
    with pytest.raises(procs.RigError, match="already in use"):
        procs.with_free_port(taken)
    assert len(tried) == 3  # bounded
    with pytest.raises(procs.RigError, match="something else"):
        procs.with_free_port(broken)


def test_wait_quiet_waits_while_a_log_grows() -> None:
    sizes = iter([1, 2, 3, 4, 5])
    last = [0]

    def size() -> int:
        last[0] = next(sizes, last[0])
        return last[0]

    started = time.monotonic()
    assert procs.wait_quiet(size, 0.1, timeout=5, interval=0.01)
    assert last[0] == 5 and time.monotonic() - started >= 0.1
    growing = iter(range(10**6))
    assert not procs.wait_quiet(lambda: next(growing), 0.1, timeout=0.3, interval=0.01)
