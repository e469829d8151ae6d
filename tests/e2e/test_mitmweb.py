"""mitmweb as a debugger: pulls through a real mitmweb running the addon, read back over its REST API.

One mitmweb serves the module, with mappings over the session upstreams (Basic, token, a capability
mapping onto the token upstream, the upstream whose blobs redirect to a blob store), a mapping to a
dead upstream, one to an upstream that drops every request after its ping and one to an upstream of
the module's own that stalls manifest bodies and serves a 1 GiB blob. skopeo pulls through it (a
multi-arch index among them); a few requests fail or are refused on purpose. Then mitmweb's own
answers (GET /flows, each flow's request and response content and its content view, /flows/dump,
/events) must show every flow annotated by the addon, failures and refusals marked, the manifests,
indexes and configs kept byte for byte and read by the OCI view, locally answered flows at the
proxy's own address, and no secret at all: the upstream password, an upstream token, a PASETO, the
secret key, the capability key or a share link (pulls and a challenge through links of tok/ and of the
capability mapping are among the requests).

tests/screenshot/shoot.py (whose mitmweb launcher this module uses) is run once to a temporary path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.httpclient
import tornado.websocket
from mitmproxy import io as mitmio
from mitmproxy import tcp
from mitmproxy.http import HTTPFlow
from mitmproxy.utils.emoji import emoji
from regproxy.config import load_file
from regproxy.debug.text import short_digest
from regproxy.links import mint
from regproxy.steps.keep_bodies import DEFAULT_KEEP_BLOB_SIZE, MAX_KEPT_BODY
from rig import clients, images, registry
from rig.httpserver import HandlerServer
from rig.keys import CAP
from rig.procs import LOOPBACK, free_port, run, wait_until
from rig.standard import APP
from screenshot.shoot import MitmWeb, manifest_path, start_mitmweb

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
KEY_HEX = "c3" * 16 + "9d" * 16
ALMOST_CAP = CAP[:-1] + "9"  # one character off
FORGED = "v4.local.Zm9yZ2VkLXRva2VuLXRoYXQtbmV2ZXItZGVjcnlwdHM"
# Share links (links/) of a namespace and of the capability mapping, good for two hours.
LINKS = {key: mint(bytes.fromhex(KEY_HEX), key, int(time.time()) + 7200)[0] for key in ("tok/", f"{CAP}/app")}
JWT_RE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
RED, WARNING = ":red_circle:", ":warning:"
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]


class DropAfterPing(BaseHTTPRequestHandler):
    """An upstream that answers the registry ping (anonymous) and closes every other request unanswered."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/v2/":
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.close_connection = True  # no status line: the proxy sees the connection close

    do_HEAD = do_GET


BIG_BLOB = 1 << 30
BIG_DIGEST = "sha256:" + "b" * 64  # never checked: the proxy passes blobs on as they are
STALL_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Awkward(BaseHTTPRequestHandler):
    """An anonymous upstream whose manifests stall after a few bytes and whose blobs are 1 GiB long."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()  # set when the module ends: stalled answers give up

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/v2/":
            self._head(200, "application/json", 2)
            self.wfile.write(b"{}")
        elif "/manifests/" in path:
            self._head(200, STALL_TYPE, 2000)  # small: kept, so buffered by the proxy
            self.wfile.write(b'{"schemaVersion": 2, "config": ')
            self.release.wait(60)
            self.close_connection = True
        elif path.endswith(f"/blobs/{BIG_DIGEST}"):
            self._head(200, "application/octet-stream", BIG_BLOB)
            chunk = bytes(range(256)) * 4096  # 1 MiB
            try:
                for _ in range(BIG_BLOB // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                self.close_connection = True
        else:
            self._head(404, "application/json", 2)
            self.wfile.write(b"{}")

    def _head(self, status: int, ctype: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", str(length))
        self.end_headers()


class UpdatesTap:
    """A client of mitmweb's /updates WebSocket (what a browser showing mitmweb receives), on its own thread.

    mitmweb pushes each flow when it sees it (at `requestheaders`) and again when it changes
    (`response`, `error`): what a browser receives before a flow is over counts as much as what is stored.
    """

    def __init__(self, web: MitmWeb, timeout: float = 15.0) -> None:
        self.messages: list[str] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._conn: tornado.websocket.WebSocketClientConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        request = tornado.httpclient.HTTPRequest(
            f"ws://{LOOPBACK}:{web.web_port}/updates",
            headers={"Authorization": f"Bearer {web.password}"},
            connect_timeout=10,
        )
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(request),), name="updates-tap")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(timeout) or self._conn is None:
            raise AssertionError(f"no WebSocket connection to mitmweb's /updates: {self._error!r}")

    async def _run(self, request: tornado.httpclient.HTTPRequest) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._conn = await tornado.websocket.websocket_connect(request)
        except Exception as e:  # noqa: BLE001 - reported by __init__
            self._error = e
            return
        finally:
            self._ready.set()
        while True:
            msg = await self._conn.read_message()
            if msg is None:
                return
            self.messages.append(msg if isinstance(msg, str) else msg.decode("utf-8", "replace"))

    def wait_for_final_updates(self, flow_ids: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until each flow's last update (its response or error) has arrived."""

        def arrived() -> bool:
            done = set()
            for m in list(self.messages):
                msg = json.loads(m)
                flow = msg.get("payload", {}).get("flow") if msg.get("type") == "flows/update" else None
                if flow and ("response" in flow or "error" in flow):
                    done.add(flow["id"])
            return set(flow_ids) <= done

        wait_until(arrived, timeout, "mitmweb's last update of every flow")

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop listening; returns every message received."""
        if self._loop is not None and self._conn is not None:
            self._loop.call_soon_threadsafe(self._conn.close)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the /updates client did not stop"
        return self.messages


@dataclass
class Scene:
    """What the module's clients did through mitmweb, and what must never show in it."""

    web: MitmWeb = field(repr=False)
    labels: dict[str, str]  # mapping key -> its label as the addon prints it
    upstream_ports: dict[int, set[str]]  # upstream port -> keys of the mappings onto it
    by_port: dict[int, registry.Upstream]  # upstream port -> the session upstream listening there
    blob_store: str  # host:port the redirect upstream sends blobs to
    pulls: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # ref -> (got, expected) digest
    answers: dict[str, httpx.Response] = field(default_factory=dict)  # what the crafted requests got
    took: dict[str, float] = field(default_factory=dict)  # seconds some of them took
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)  # what -> bytes that must not appear
    upstream_tokens: list[str] = field(default_factory=list, repr=False)
    updates: list[str] = field(default_factory=list, repr=False)  # what mitmweb pushed to its UI meanwhile


@pytest.fixture(scope="module")
def drop_after_ping() -> Iterator[HandlerServer]:
    with HandlerServer("drop-after-ping", DropAfterPing) as server:
        yield server


@pytest.fixture(scope="module")
def awkward() -> Iterator[HandlerServer]:
    Awkward.release.clear()
    server = HandlerServer("awkward", Awkward).start()
    yield server
    Awkward.release.set()
    server.stop()


@pytest.fixture(scope="module")
def web(
    upstreams: dict[str, registry.Upstream],
    drop_after_ping: HandlerServer,
    awkward: HandlerServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MitmWeb]:
    basic, tok, redir = upstreams["basic"], upstreams["token"], upstreams["redirect"]
    config = {
        "secretkey": KEY_HEX,
        "upstream_timeout": 5,
        "proxies": {
            "basic/": {"registry": basic.url, "remote": "platform", "username": basic.username,
                       "password": basic.password},
            "tok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
            f"{CAP}/app": {"registry": tok.url, "remote": APP, "username": tok.username,
                           "password_env": "RP_WEB_CAP_PASSWORD"},
            "dead/": {"registry": f"http://{LOOPBACK}:{free_port()}", "remote": "platform"},
            "drop/": {"registry": f"http://{LOOPBACK}:{drop_after_ping.port}", "remote": "platform"},
            "redir/": {"registry": redir.url, "remote": "platform", "username": redir.username,
                       "password": redir.password},
            "odd/": {"registry": f"http://{LOOPBACK}:{awkward.port}", "remote": "platform"},
        },
    }  # fmt: skip
    env = {"RP_WEB_CAP_PASSWORD": tok.password or ""}
    w = start_mitmweb(config, tmp_path_factory.mktemp("mitmweb"), env=env)
    yield w
    w.stop()
    sys.stdout.write(f"--- mitmweb output:\n{w.output()}\n")


def _token(web: MitmWeb, name: str, **kw: Any) -> httpx.Response:
    return httpx.get(f"{web.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30, **kw)


def _manifest(web: MitmWeb, name: str, token: str | None) -> httpx.Response:
    headers = list(MANIFEST_ACCEPT)
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return httpx.get(f"{web.url}/v2/{name}/manifests/v1", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def scene(
    web: MitmWeb,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, dict[tuple[str, str], str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Scene:
    basic, tok = upstreams["basic"], upstreams["token"]
    assert tok.token_issuer is not None
    issued_before = len(tok.token_issuer.issued())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RP_WEB_CAP_PASSWORD", tok.password or "")
        cfg = load_file(str(web.config_path))
    ports: dict[int, set[str]] = {}
    for m in cfg.mappings:
        ports.setdefault(m.upstream.port, set()).add(m.key)
    by_port = {int(u.host.rsplit(":", 1)[1]): u for u in upstreams.values()}
    blob_server = upstreams["redirect"].blob_server
    assert blob_server is not None
    s = Scene(web, {m.key: m.label for m in cfg.mappings}, ports, by_port, f"{LOOPBACK}:{blob_server.port}")
    out = tmp_path_factory.mktemp("pulls")
    tap = UpdatesTap(web)
    try:
        _act(s, web, upstreams, image_digests, out)
        tap.wait_for_final_updates(f["id"] for f in web.flows())
    finally:
        s.updates = tap.close()

    password = (tok.password or "").encode()
    s.secrets = {
        "upstream password": password,
        "upstream Basic credentials": base64.b64encode(f"{basic.username}:{basic.password}".encode()),
        "secret key": KEY_HEX.encode(),
        "capability key": CAP.encode(),
        "capability key (hex only)": CAP.replace("-", "").encode(),
        "PASETO": b"v4.local.",
        "the forged client token": FORGED.encode(),
        **{f"the share link of {key}": link.encode() for key, link in LINKS.items()},
    }
    s.upstream_tokens = tok.token_issuer.issued()[issued_before:]  # signed while the module ran
    return s


def _act(
    s: Scene,
    web: MitmWeb,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, dict[tuple[str, str], str]],
    out: Path,
) -> None:
    """The clients' part: pulls that work, that fail, and requests that are refused."""
    basic = upstreams["basic"]
    # Pulls that work: Basic upstream, token upstream, capability mapping, blobs redirected to a blob store.
    pulls = [("basic/app", "basic"), ("tok/app", "token"), (f"{CAP}/app", "token"), ("redir/app", "redirect")]
    for i, (name, kind) in enumerate(pulls):
        res = clients.skopeo_copy(f"{web.host}/{name}:v1", out / f"pull{i}", tag="v1")
        s.pulls[name] = (res.digest, image_digests[kind][(APP, "v1")])
    # A multi-arch index with every platform, and a Docker v2 schema 2 image.
    res = clients.skopeo_copy(f"{web.host}/basic/app:multi", out / "multi", all=True, tag="multi")
    s.pulls["basic/app:multi"] = (res.digest, image_digests["basic"][(APP, "multi")])
    res = clients.skopeo_copy(f"{web.host}/tok/app:v2s2", out / "v2s2", tag="v2s2")
    s.pulls["tok/app:v2s2"] = (res.digest, image_digests["token"][(APP, "v2s2")])

    # Share links: pulls through a namespace's and the capability mapping's, and a link in a challenge's scope.
    for i, (key, link) in enumerate(LINKS.items()):
        res = clients.skopeo_copy(f"{web.host}/{link}/app:v1", out / f"link{i}", tag="v1")
        s.pulls[f"<link of {key}>/app"] = (res.digest, image_digests["token"][(APP, "v1")])
    s.answers["link challenge"] = _manifest(web, f"{LINKS['tok/']}/app", None)

    # Failures: a dead upstream (skopeo), an upstream that drops the connection, one that stalls a manifest.
    rc, _, _ = clients.skopeo_inspect(f"{web.host}/dead/app:v1")
    s.pulls["dead/app"] = (None if rc else "pulled", "failure")
    drop_token = _token(web, "drop/app")
    s.answers["drop token"] = drop_token
    if drop_token.status_code == 200:
        s.answers["drop manifest"] = _manifest(web, "drop/app", drop_token.json()["token"])
    odd_token = _token(web, "odd/app").json()["token"]
    started = time.monotonic()
    s.answers["stalled manifest"] = _manifest(web, "odd/app", odd_token)
    s.took["stalled manifest"] = time.monotonic() - started

    # Refusals: a forged token, a token for another repository, an almost-right capability key.
    s.answers["forged"] = _manifest(web, "basic/app", FORGED)
    basic_token = _token(web, "basic/app").json()["token"]
    s.answers["other repo"] = _manifest(web, "tok/app", basic_token)
    cap_token = _token(web, f"{CAP}/app", auth=(basic.username or "", basic.password or "")).json()["token"]
    s.answers["almost cap"] = _manifest(web, f"{ALMOST_CAP}/app", cap_token)
    # The capability name in a challenge's scope, and in a path with a token in its query string.
    s.answers["cap challenge"] = _manifest(web, f"{CAP}/app", None)
    s.answers["cap query"] = httpx.get(f"{web.url}/v2/{CAP}/app/tags/list", params={"token": cap_token}, timeout=30)
    # An upstream error: the flow shows the registry error the client got.
    s.answers["unknown tag"] = httpx.get(
        f"{web.url}/v2/basic/app/manifests/nope",
        headers=[*MANIFEST_ACCEPT, ("Authorization", f"Bearer {basic_token}")],
        timeout=30,
    )


def _dump(web: MitmWeb) -> list[HTTPFlow]:
    flows = []
    for f in mitmio.FlowReader(io.BytesIO(web.api("/flows/dump").content)).stream():
        assert not isinstance(f, tcp.TCPFlow)
        assert isinstance(f, HTTPFlow), f
        flows.append(f)
    return flows


def _describe(f: HTTPFlow) -> str:
    status = f.response.status_code if f.response else None
    return f"{f.request.method} {f.request.host}:{f.request.port}{f.request.path} -> {status} ({f.comment!r})"


def test_pulls_through_mitmweb_work(scene: Scene) -> None:
    for name, (got, expected) in scene.pulls.items():
        if expected == "failure":
            assert got is None, f"{name}: a pull from a dead upstream succeeded"
        else:
            assert got == expected, f"{name}: skopeo recorded {got}, the upstream serves {expected}"
    assert scene.answers["drop token"].status_code == 200, scene.answers["drop token"].text
    assert scene.answers["drop manifest"].status_code == 502
    assert scene.answers["stalled manifest"].status_code == 502
    assert scene.answers["unknown tag"].status_code == 404
    for what in ("forged", "other repo", "almost cap", "cap challenge", "cap query", "link challenge"):
        assert scene.answers[what].status_code in (401, 404), (what, scene.answers[what].status_code)
    assert scene.upstream_tokens, "the token upstream issued no token: nothing was checked for leaks"


def test_every_flow_is_annotated(scene: Scene) -> None:
    flows = _dump(scene.web)
    assert len(flows) >= 20, [_describe(f) for f in flows]
    labels_seen: set[str] = set()
    for f in flows:
        c = f.comment
        assert c.startswith("registryproxy: "), _describe(f)
        assert re.search(r"\btoken [\w:]", c), f"no token outcome: {_describe(f)}"
        status = f.response.status_code if f.response else None
        keys = scene.upstream_ports.get(f.request.port)
        if keys is None:
            # Answered by the proxy itself: the flow names the proxy as the client did, not the dead default target.
            assert f"{f.request.host}:{f.request.port}" == scene.web.host, _describe(f)
            assert f.request.scheme == ("https" if f.client_conn.tls_established else "http"), _describe(f)
            assert f"answered locally ({status if status is not None else 'error'})" in c, _describe(f)
            continue
        labels = [scene.labels[k] for k in keys if scene.labels[k] in c]
        assert len(labels) == 1, f"the mapping label is not (only) one of {keys}: {_describe(f)}"
        labels_seen.update(labels)
        assert f"-> {f.request.host}:{f.request.port}/" in c, f"no upstream: {_describe(f)}"
        assert re.search(r"\bupstream (\d{3}|failed|timeout|error)\b", c), f"no upstream status: {_describe(f)}"
    proxied = {scene.labels[k] for k in ("basic/", "tok/", f"{CAP}/app", "drop/", "redir/", "odd/")}
    assert proxied <= labels_seen, f"never proxied: {proxied - labels_seen}"
    cap_label = scene.labels[f"{CAP}/app"]
    assert cap_label.startswith("cap:"), cap_label


def test_failed_and_refused_flows_are_marked(scene: Scene) -> None:
    flows = _dump(scene.web)
    kinds: dict[str, list[str]] = {"failed": [], "refused": [], "challenge": [], "ok": []}
    for f in flows:
        status = f.response.status_code if f.response else None
        challenge = f.response.headers.get("www-authenticate", "") if f.response else ""
        if f.error is not None or status is None or status >= 500:
            kind, expected = "failed", RED
        elif status == 401 and "error=" not in challenge:
            kind, expected = "challenge", ""  # the plain first challenge of every pull
        elif status >= 400:
            kind, expected = "refused", WARNING
        else:
            kind, expected = "ok", ""
        kinds[kind].append(_describe(f))
        assert f.marked == expected, f"{kind} flow marked {f.marked!r}, expected {expected!r}: {_describe(f)}"
    assert len(kinds["failed"]) >= 3, kinds  # the dead upstream, the dropped connection, the stalled manifest
    assert len(kinds["refused"]) >= 3, kinds  # forged token, other repository, almost-right key
    assert kinds["challenge"] and kinds["ok"], kinds
    # What mitmweb's flow list shows for the marks.
    shown = {f["id"]: f["marked"] for f in scene.web.flows()}
    for f in flows:
        assert shown[f.id] == (emoji[f.marked] if f.marked else ""), _describe(f)


def _leaks(answers: dict[str, bytes], scene: Scene) -> list[str]:
    secrets = dict(scene.secrets)
    for i, t in enumerate(scene.upstream_tokens):
        secrets[f"upstream token #{i}"] = t.encode()
    leaks = []
    for where, data in answers.items():
        for what, secret in secrets.items():
            if secret and secret in data:
                leaks.append(f"{what} in {where} at offset {data.index(secret)}")
        for m in JWT_RE.finditer(data):
            leaks.append(f"a JWT ({hashlib.sha256(m[0]).hexdigest()[:12]}) in {where}")
    return leaks


def test_no_secret_in_any_mitmweb_answer(scene: Scene) -> None:
    web = scene.web
    flows = web.flows()
    answers: dict[str, bytes] = {
        "GET /flows": json.dumps(flows).encode(),
        "GET /flows/dump": web.api("/flows/dump").content,
        "GET /events": web.api("/events").content,
    }
    for f in flows:
        for part in ("request", "response"):
            if f.get(part, {}).get("contentLength") is None:
                continue  # streamed: mitmweb holds no body
            path = f"/flows/{f['id']}/{part}/content.data"
            answers[f"GET {path}"] = web.api(path).content
            view = f"/flows/{f['id']}/{part}/content/auto.json"  # what mitmweb shows of it (e.g. the OCI view)
            answers[f"GET {view}"] = web.api(view).content
    assert len(answers) > len(flows), "no flow content was read"
    leaks = _leaks(answers, scene)
    assert not leaks, "\n".join(leaks)


def test_no_secret_in_anything_pushed_to_the_mitmweb_ui(scene: Scene) -> None:
    """Every message mitmweb pushed to its UI while the pulls ran, not only the final states."""
    kinds = [json.loads(m).get("type") for m in scene.updates]
    assert kinds.count("flows/add") >= 20, kinds
    pushed = {
        json.loads(m)["payload"]["flow"]["id"] for m in scene.updates if "flow" in json.loads(m).get("payload", {})
    }
    assert pushed >= {f["id"] for f in scene.web.flows()}
    answers = {f"message #{i}": m.encode() for i, m in enumerate(scene.updates)}
    leaks = _leaks(answers, scene)
    assert not leaks, "\n".join(leaks)


# --- bodies a person reads, and the OCI view ----------------------------------------------------


def _responses(scene: Scene, route: str, status: int = 200, port: int | None = None) -> list[dict[str, Any]]:
    """mitmweb's flows of GET requests whose path holds `route`, answered `status` (from upstream `port`)."""
    found = []
    for f in scene.web.flows():
        req, resp = f["request"], f.get("response")
        if req["method"] != "GET" or route not in req["path"] or not resp or resp["status_code"] != status:
            continue
        if f.get("error"):
            continue  # e.g. the stalled manifest: the upstream's head, then nothing
        if port is None or req["port"] == port:
            found.append(f)
    return found


def _body(scene: Scene, flow: dict[str, Any]) -> bytes:
    return scene.web.api(f"/flows/{flow['id']}/response/content.data").content


def _view(scene: Scene, flow: dict[str, Any]) -> tuple[str, str]:
    """(view name, text) of the response as mitmweb shows it, its content view picked by itself."""
    shown = scene.web.api(f"/flows/{flow['id']}/response/content/auto.json").json()
    return str(shown["view_name"]), str(shown["text"])


def _port(scene: Scene, key: str) -> int:
    """The upstream port of the mapping `key`."""
    (port,) = [p for p, keys in scene.upstream_ports.items() if key in keys]
    return port


def test_kept_manifests_are_the_upstreams_bytes(scene: Scene) -> None:
    checked = 0
    for f in _responses(scene, "/manifests/"):
        up = scene.by_port.get(f["request"]["port"])
        if up is None:
            continue
        m = re.fullmatch(r"/v2/(.+)/manifests/([^/?]+)", f["request"]["path"])
        assert m is not None, f["request"]["path"]
        upstream_bytes, _, _ = images.get_manifest(up, m[1], m[2])
        assert f["response"]["contentLength"] == len(upstream_bytes), f["request"]["path"]
        assert _body(scene, f) == upstream_bytes, f["request"]["path"]
        checked += 1
    assert checked >= 8  # v1 through four mappings, the index and its two images, v2s2


def test_what_is_kept_and_what_streams(scene: Scene) -> None:
    blobs = _responses(scene, "/blobs/")
    assert blobs
    for f in blobs:
        size = int(f["response"]["contentLength"] or 0)
        assert f["response"]["contentLength"] is not None and size <= DEFAULT_KEEP_BLOB_SIZE, f["request"]["path"]
    for f in _responses(scene, "/manifests/"):
        assert 0 < f["response"]["contentLength"] <= MAX_KEPT_BODY
    # An upstream error: the flow shows the registry error the client got (it streamed, replaced at once).
    (unknown,) = _responses(scene, "/manifests/nope", status=404)
    assert _body(scene, unknown) == scene.answers["unknown tag"].content
    assert json.loads(_body(scene, unknown))["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert _view(scene, unknown)[0] == "JSON"


def test_the_oci_view_lists_each_platform_of_an_index(scene: Scene) -> None:
    (index,) = _responses(scene, "/manifests/multi")
    name, text = _view(scene, index)
    assert name == "OCI" and text.startswith("OCI image index: 2 manifests")
    listed = json.loads(_body(scene, index))["manifests"]
    platforms = set()
    for entry in listed:
        platform = f"{entry['platform']['os']}/{entry['platform']['architecture']}"
        (line,) = [ln for ln in text.splitlines() if short_digest(entry["digest"]) in ln]
        assert line.split()[0] == platform, line
        platforms.add(platform)
    assert platforms == {"linux/amd64", "linux/arm64"}


def test_the_oci_view_lists_config_and_layers_of_a_manifest(scene: Scene) -> None:
    basic = _port(scene, "basic/")
    (manifest,) = _responses(scene, "/manifests/v1", port=basic)
    name, text = _view(scene, manifest)
    doc = json.loads(_body(scene, manifest))
    assert name == "OCI" and text.startswith(f"OCI image manifest: {len(doc['layers'])} layers, ")
    assert " in all " in text.splitlines()[0]
    (config_line,) = [ln for ln in text.splitlines() if ln.split()[:1] == ["config"]]
    assert short_digest(doc["config"]["digest"]) in config_line
    for i, layer in enumerate(doc["layers"], 1):
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(f"layer {i} ")]
        assert short_digest(layer["digest"]) in line and layer["mediaType"] in line

    # Its config: a small blob, kept and read as a config (environment variable names, never their values).
    (config,) = _responses(scene, f"/blobs/{doc['config']['digest']}", port=basic)
    name, text = _view(scene, config)
    assert name == "OCI" and text.startswith("Image config: linux/amd64")
    assert "env:" in text and "PATH (values elided)" in text and "/usr/bin" not in text
    assert "history: 2 steps" in text

    # A Docker v2 schema 2 manifest reads the same.
    (v2s2,) = _responses(scene, "/manifests/v2s2")
    name, text = _view(scene, v2s2)
    assert name == "OCI" and text.startswith("Docker image manifest (v2 schema 2): 2 layers")


def test_the_oci_view_says_where_a_redirect_goes_host_only(scene: Scene) -> None:
    redirects = _responses(scene, "/blobs/", status=307, port=_port(scene, "redir/"))
    assert redirects
    for f in redirects:
        name, text = _view(scene, f)
        assert name == "OCI", text
        assert text.startswith(f"Redirect 307: the client fetches this from {scene.blob_store}\n"), text
        assert "sha256" not in text and "?" not in text and "/blobs" not in text


def test_a_stalled_kept_manifest_is_cut_off_at_upstream_timeout(scene: Scene) -> None:
    answer = scene.answers["stalled manifest"]
    assert answer.status_code == 502 and answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert 4.5 <= scene.took["stalled manifest"] <= 5 + 5, scene.took  # upstream_timeout: 5
    odd = _port(scene, "odd/")
    (flow,) = [f for f in _dump(scene.web) if f.request.port == odd and "/manifests/" in f.request.path]
    assert flow.marked == RED and "upstream timeout" in flow.comment, _describe(flow)


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_a_1_gib_blob_still_streams_with_flat_memory(scene: Scene) -> None:
    web = scene.web
    token = _token(web, "odd/app").json()["token"]
    pid = web.proc.pid
    before = peak = _rss_kb(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received = 0
    try:
        url = f"{web.url}/v2/odd/app/blobs/{BIG_DIGEST}"
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(BIG_BLOB)
            for part in r.iter_raw(1 << 20):
                received += len(part)
    finally:
        done.set()
        sampler.join(5)
    assert received == BIG_BLOB
    assert peak - before < 96 * 1024, f"mitmweb grew from {before} kB to {peak} kB streaming 1 GiB"
    (flow,) = _responses(scene, f"/blobs/{BIG_DIGEST}")
    assert flow["response"]["contentLength"] is None  # streamed: mitmweb holds no body


def _png_size_and_rows(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct filtered scanlines) of an 8-bit RGB/RGBA PNG, with the stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        assert zlib.crc32(kind + chunk) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    stride = 1 + width * (3 if colour == 2 else 4)
    raw = zlib.decompress(idat)
    assert len(raw) == stride * height
    rows = {raw[i : i + stride] for i in range(0, len(raw), stride)}
    return width, height, len(rows)


def test_screenshot_script_writes_plausible_pngs(tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    res = run(
        [sys.executable, str(REPO / "tests" / "screenshot" / "shoot.py"), "--out", str(out)],
        timeout=240,
        env_extra={"PYTHONPATH": f"{REPO / 'addon'}:{REPO / 'tests'}", "TMPDIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.describe()
    for png in (out, manifest_path(out)):
        data = png.read_bytes()
        width, height, distinct_rows = _png_size_and_rows(data)
        assert (width, height) == (1400, 900)
        assert len(data) > 20_000, len(data)  # a blank page compresses to a few KB
        assert distinct_rows > 100, distinct_rows  # a flow list and a detail pane, not a flat page
    assert not list(tmp_path.glob("rp-shoot-*")), "the script left its work directory behind"
