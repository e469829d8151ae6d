"""Faults: upstreams, token servers and clients that misbehave, against a real mitmdump with the addon.

One proxy serves most of the module: a healthy mapping onto the real token-auth upstream, one
mapping per upstream fault (rig/faults.py servers on loopback), an upstream serving a real image
whose blob bodies are cut, a real docker-registry whose token server fails on demand, and an
upstream of this module's own with a multi-MB blob. The client-side faults (disconnects mid-blob,
slowloris) get proxies of their own so that their descriptor counts and options stand alone.

Throughout each fault the proxy must keep serving: a normal authorized manifest GET through the
healthy mapping is made WHILE the fault is under way. After each test the proxy's output must hold
no credential, upstream token, PASETO, secret key or traceback.
(tests/e2e/test_pull.py covers a dead and a silent upstream, a stall mid-blob and a blackholed
connect; /tmp/briefs/faults-table.md lists what covers which fault.)
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import pytest
from regproxy.config import load_file
from regproxy.tokens.paseto import Grant, TokenCodec
from rig import clients, faults, images, proxy, registry, standard
from rig.procs import wait_quiet, wait_until
from rig.standard import APP

pytestmark = pytest.mark.e2e

KEY_HEX = "c4" * 16 + "5b" * 16
UPSTREAM_TIMEOUT = 2
CLIENT_TIMEOUT = 2
SLACK = 2.0  # seconds allowed over a time bound (a shared 2-core machine)
HEALTHY_BOUND = 3.0
PING_BOUND = 10.0  # seconds for a /v2/ ping during the 200-client storm (seen: median 0.4 s, max 2-4 s, loaded)  # seconds for the healthy manifest GET made during a fault
FAULT_USERS = {"fault-user": "fault-password-93"}
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]
HEADERS_SO_FAR = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDocker-Content-Digest: sha256:"
# Upstreams that fail at once: the proxy must answer 502 UNAVAILABLE without waiting for its timeout.
INSTANT_FAULTS: dict[str, faults.Behaviour | None] = {
    "refused": None,  # a port bound but not listening
    "rst-after-request": faults.reset_after(b""),
    "rst-on-accept": faults.reset_after(b"", read_request=False),
    "rst-mid-status-line": faults.reset_after(b"HTTP/1.1 20"),
    "rst-mid-headers": faults.reset_after(HEADERS_SO_FAR),
    "fin-mid-headers": faults.close_after(HEADERS_SO_FAR),
    "not-http": faults.close_after(b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n"),
}
# Upstreams that stop talking part-way through the head: cut at upstream_timeout.
STALL_FAULTS: dict[str, faults.Behaviour] = {
    "stall-mid-status-line": faults.stall_after(b"HTTP/1.1 2"),
    "stall-mid-headers": faults.stall_after(HEADERS_SO_FAR),
}
STORM_BLOB_SIZE = 2 * 1024 * 1024
STORM_CLIENTS = 200


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Rig:
    servers: dict[str, faults.FaultServer | faults.ClosedPort]
    images: faults.ImageServer
    image_digest: str
    layer: str
    layer_size: int
    tokens: faults.TokenRegistry
    own: registry.Upstream
    storm_blob: str

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop()
        self.images.stop()
        self.tokens.stop()
        self.own.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("faults")
    started: list[Callable[[], None]] = []
    try:
        servers: dict[str, faults.FaultServer | faults.ClosedPort] = {}
        for name, behaviour in {**INSTANT_FAULTS, **STALL_FAULTS}.items():
            servers[name] = faults.ClosedPort() if behaviour is None else faults.FaultServer(behaviour, name)
            started.append(servers[name].stop)
        # An image with a 1 MiB layer (random bytes, so gzip keeps it about that big).
        layout = base / "layout"
        info = images.build_image(layout, "big", layers=(1 << 20,), seed="faults-big")
        image_server = faults.ImageServer.from_layout(layout, info.manifest, images.OCI_MANIFEST, 1 << 20)
        started.append(image_server.stop)
        tokens = faults.start_token_registry(base / "token-registry", FAULT_USERS)
        started.append(tokens.stop)
        own = registry.start_upstream("anonymous", base / "own")
        started.append(own.stop)
        block = hashlib.sha256(b"storm").digest() * 2048  # 64 KiB

        def storm_chunks() -> Iterator[bytes]:
            return (block for _ in range(STORM_BLOB_SIZE // len(block)))

        storm_blob = faults.push_blob(own.url, "platform/storm", storm_chunks)
        layer = info.layers[0]
        yield Rig(servers, image_server, info.digest, layer.digest, layer.size, tokens, own, storm_blob)
    finally:
        for stop in reversed(started):
            stop()


def _config(up: dict[str, registry.Upstream], rig: Rig | None) -> dict[str, Any]:
    tok = up["token"]
    proxies: dict[str, Any] = {
        "tok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
    }
    if rig is not None:
        for name, server in rig.servers.items():
            proxies[f"{name}/"] = {"registry": server.url, "remote": "platform"}
        proxies["cut/"] = {"registry": rig.images.url, "remote": "platform"}
        user, password = next(iter(FAULT_USERS.items()))
        proxies["tokfault/"] = {
            "registry": rig.tokens.url,
            "remote": "platform",
            "username": user,
            "password": password,
        }
    return {"secretkey": KEY_HEX, "upstream_timeout": UPSTREAM_TIMEOUT, "proxies": proxies}


@pytest.fixture(scope="module")
def fp(
    upstreams: dict[str, registry.Upstream], rig: Rig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    p = proxy.start_proxy(_config(upstreams, rig), tmp_path_factory.mktemp("faults-proxy"))
    yield p
    p.stop()


@dataclass
class Healthy:
    """The normal authorized pull that must keep working through every fault."""

    proxy: proxy.ProxyProc
    token: str
    digest: str
    latencies: list[float] = field(default_factory=list)

    def check(self) -> float:
        started = time.monotonic()
        r = httpx.get(
            f"{self.proxy.url}/v2/tok/app/manifests/v1",
            headers=[("Accept", t) for t in MANIFEST_TYPES] + [("Authorization", f"Bearer {self.token}")],
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.headers["docker-content-digest"] == self.digest
        self.latencies.append(elapsed)
        return elapsed


def healthy_for(p: proxy.ProxyProc, image_digests: dict[str, standard.Digests]) -> Healthy:
    r = httpx.get(f"{p.url}/token", params={"scope": "repository:tok/app:pull"}, timeout=30)
    assert r.status_code == 200, r.text
    h = Healthy(p, r.json()["token"], image_digests["token"][(APP, "v1")])
    h.check()
    return h


@pytest.fixture(scope="module")
def healthy(fp: proxy.ProxyProc, image_digests: dict[str, standard.Digests]) -> Healthy:
    return healthy_for(fp, image_digests)


def secrets_of(up: dict[str, registry.Upstream]) -> set[str]:
    found = {KEY_HEX, *FAULT_USERS.values()}
    for u in up.values():
        if u.password:
            found |= {u.password, u.basic_auth_header() or ""}
    return found


def assert_no_leak(p: proxy.ProxyProc, secrets: set[str]) -> None:
    output = p.output()
    assert "Traceback" not in output, output[-4000:]
    assert "eyJ" not in output  # no upstream JWT
    assert "v4.local." not in output  # no PASETO
    for s in filter(None, secrets):
        assert s not in output, f"a secret ({len(s)} chars) appears in the proxy's output"
    assert p.running(), "the proxy exited"


@pytest.fixture(autouse=True)
def _no_leak_after_each_test(request: pytest.FixtureRequest, upstreams: dict[str, registry.Upstream]) -> Iterator[None]:
    yield
    if "fp" in request.fixturenames:
        assert_no_leak(request.getfixturevalue("fp"), secrets_of(upstreams))


def mint(p: proxy.ProxyProc, prefix: str) -> str:
    """A valid client token for `prefix/app` (the proxy's own /token cannot reach a broken upstream)."""
    config = load_file(p.config_path, {"REGISTRYPROXY_SECRETKEY": KEY_HEX})
    identity = next(m.identity for m in config.mappings if m.key == f"{prefix}/")  # what a grant is bound to
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    return codec.issue_access(p.url, (Grant(identity, (f"{prefix}/app",), None),), 120)


R = TypeVar("R")


class Repeating(Generic[R]):
    """Calls `fn` again and again on a thread until stopped; keeps each result (re-raises the first error)."""

    def __init__(self, fn: Callable[[], R]) -> None:
        self.fn = fn
        self.results: list[R] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.fn())
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e
                return

    def __enter__(self) -> Repeating[R]:
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the fault loop did not finish"
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class Answer:
    what: str
    status: int
    body: bytes
    elapsed: float


def fault_requests(p: proxy.ProxyProc, prefix: str) -> list[Answer]:
    """A manifest GET and HEAD, a blob GET and a token request for `prefix/app`, all at once."""
    tok = mint(p, prefix)
    auth = {"Authorization": f"Bearer {tok}"}
    asks: list[tuple[str, str, str, dict[str, str]]] = [
        ("manifest GET", "GET", f"/v2/{prefix}/app/manifests/v1", auth),
        ("manifest HEAD", "HEAD", f"/v2/{prefix}/app/manifests/v1", auth),
        ("blob GET", "GET", f"/v2/{prefix}/app/blobs/sha256:{'2' * 64}", auth),
        ("token", "GET", f"/token?scope=repository:{prefix}/app:pull", {}),
    ]

    def one(ask: tuple[str, str, str, dict[str, str]]) -> Answer:
        what, method, path, headers = ask
        started = time.monotonic()
        r = httpx.request(method, f"{p.url}{path}", headers=headers, timeout=30)
        return Answer(what, r.status_code, r.content, time.monotonic() - started)

    with ThreadPoolExecutor(len(asks)) as pool:
        return list(pool.map(one, asks))


def check_unavailable(a: Answer, statuses: tuple[int, ...], port: int) -> None:
    assert a.status in statuses, (a.what, a.status, a.body[:300])
    if a.what != "manifest HEAD":
        assert httpx.Response(200, content=a.body).json()["errors"][0]["code"] == "UNAVAILABLE", a
    assert str(port).encode() not in a.body and b"127.0.0.1" not in a.body, a  # nothing names the upstream


# --- upstream faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(INSTANT_FAULTS))
def test_upstream_failing_at_once_answers_502_without_waiting(
    fp: proxy.ProxyProc, rig: Rig, healthy: Healthy, fault: str
) -> None:
    """Refused, reset (RST) on accept / after the request / mid status line / mid headers, FIN mid
    headers, a non-HTTP answer: 502 UNAVAILABLE at once, for manifests, blobs and the token endpoint."""
    server = rig.servers[fault]
    with Repeating(lambda: fault_requests(fp, fault)) as load:
        wait_until(lambda: bool(load.results) or not load.running(), 20, "a first round of fault requests")
        for _ in range(3):
            assert load.running()
            assert healthy.check() < HEALTHY_BOUND
    rounds = load.results
    assert rounds, "no fault round ran"
    for answers in rounds:
        for a in answers:
            check_unavailable(a, (502,), server.port)
            assert a.elapsed < UPSTREAM_TIMEOUT + SLACK, f"{a.what} took {a.elapsed:.2f}s"
    if isinstance(server, faults.FaultServer):
        assert server.counts()[0] >= 4 * len(rounds)  # every request really reached the faulty upstream
    print(f"{fault}: {len(rounds)} rounds; slowest answer {max(a.elapsed for r in rounds for a in r):.3f}s")


@pytest.mark.parametrize("fault", list(STALL_FAULTS))
def test_upstream_stalling_mid_head_is_cut_at_upstream_timeout(
    fp: proxy.ProxyProc, rig: Rig, healthy: Healthy, fault: str
) -> None:
    server = rig.servers[fault]
    assert isinstance(server, faults.FaultServer)
    before = server.counts()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fault_requests, fp, fault)
        server.wait_accepted(before[0] + 4)  # every request is stuck in the stalled head now
        for _ in range(3):
            assert not pending.done()
            assert healthy.check() < HEALTHY_BOUND
        answers = pending.result(timeout=UPSTREAM_TIMEOUT + 30)
    for a in answers:
        check_unavailable(a, (502, 504), server.port)
        assert UPSTREAM_TIMEOUT - 0.3 < a.elapsed < UPSTREAM_TIMEOUT + SLACK, (a.what, a.elapsed)
    # The proxy gave up on every stalled upstream connection (nothing left open on its side).
    wait_until(lambda: server.counts()[1] >= before[1] + 4, 5, "the proxy to close the stalled connections")


@pytest.mark.parametrize("mode", faults.CUT_MODES)
def test_upstream_closing_mid_blob_fails_the_transfer(
    fp: proxy.ProxyProc, rig: Rig, healthy: Healthy, tmp_path: Path, mode: str
) -> None:
    """The upstream stops half-way through a layer (Content-Length or chunked; FIN or RST): the
    client sees a failed transfer, never a short blob that looks complete. `whole` is the control."""
    name = f"cut/{mode}"
    tok = httpx.get(f"{fp.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30).json()["token"]

    def fetch_layer() -> tuple[int, int, bytes | None, str | None]:
        """(status, bytes received, body if complete, transport error)."""
        received = bytearray()
        url = f"{fp.url}/v2/{name}/blobs/{rig.layer}"
        try:
            with httpx.stream("GET", url, headers={"Authorization": f"Bearer {tok}"}, timeout=30) as r:
                for part in r.iter_bytes():
                    received += part
                return r.status_code, len(received), bytes(received), None
        except httpx.TransportError as e:
            return -1, len(received), None, type(e).__name__

    with Repeating(fetch_layer) as load:
        wait_until(lambda: bool(load.results) or not load.running(), 20, "a first blob fetch")
        copied = clients.skopeo_copy(f"{fp.host}/{name}:v1", tmp_path / "copy", tag="v1", timeout=60)
        assert load.running()
        healthy.check()
    expected = rig.images.blobs[rig.layer]
    for status, size, body, error in load.results:
        if mode == "whole":
            assert (status, body) == (200, expected)
        else:
            assert error is not None, f"a cut blob came through as a complete {status} of {size}/{len(expected)} bytes"
            assert size < len(expected)
    if mode == "whole":
        assert copied.check().digest == rig.image_digest
    else:
        assert not copied.ok, copied.describe()
        assert copied.digest is None
    print(f"{mode}: {len(load.results)} fetches, first: {load.results[0][1:2]} bytes, {load.results[0][3]}")


@pytest.mark.parametrize("mode", [*faults.TOKEN_FAULTS, "ok"])
def test_upstream_token_server_faults_answer_registry_errors_in_bounded_time(
    fp: proxy.ProxyProc, rig: Rig, healthy: Healthy, mode: str
) -> None:
    """The upstream's token server answers 500, garbage, an empty close, a 200 that is not JSON,
    nothing, a head without its body, or a body one byte at a time: the proxy's /token answers a
    registry JSON error within upstream_timeout (+ slack). `ok` is the control: a real token."""
    name = "tokfault/app" if mode == "ok" else f"tokfault/fault-{mode}"
    server = rig.tokens.tokens.server
    before = server.counts()[0]
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(httpx.get, f"{fp.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
        wait_until(lambda: server.counts()[0] > before or pending.done(), 10, "the proxy to ask the token server")
        healthy.check()
        # The token endpoint itself keeps serving other mappings meanwhile (a fetch no cache can answer).
        other = httpx.get(f"{fp.url}/token", params={"scope": f"repository:tok/during-{mode}:pull"}, timeout=30)
        assert other.status_code == 200, other.text
        r = pending.result(timeout=UPSTREAM_TIMEOUT + 30)
        elapsed = time.monotonic() - started
    print(f"{mode}: {r.status_code} after {elapsed:.2f}s")
    if mode == "ok":
        assert r.status_code == 200 and r.json()["token"].startswith("v4.local."), r.text
        return
    slow = mode in ("hang", "headhang", "trickle")
    assert r.status_code == (504 if slow else 502), r.text
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert str(server.port) not in r.text
    assert elapsed < UPSTREAM_TIMEOUT + SLACK, f"/token took {elapsed:.2f}s"
    if slow:
        assert elapsed > UPSTREAM_TIMEOUT - 0.3
        # ...and the proxy let go of the token server's connection.
        wait_until(lambda: server.counts()[1] > 0, 5, "the proxy to close the token server connection")


# --- client faults ------------------------------------------------------------------------------


def _get_head(p: proxy.ProxyProc, path: str, tok: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {p.host}\r\nAuthorization: Bearer {tok}\r\n\r\n".encode()


def _read_some(sock: socket.socket, at_least: int) -> int:
    got = 0
    deadline = time.monotonic() + 20
    while got < at_least and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        got += len(data)
    return got


def test_clients_disconnecting_mid_blob_release_the_upstream_connection(
    upstreams: dict[str, registry.Upstream],
    rig: Rig,
    make_proxy: Any,
    image_digests: dict[str, standard.Digests],
) -> None:
    """Clients that go away mid-blob (FIN or RST), from a paced upstream and from a real registry:
    the proxy closes each upstream connection still mid-body (never pooled), and its open descriptors
    return to the baseline, plus at most the finished ones now idle in the upstream pool."""
    paced = faults.FaultServer(faults.paced_body(256 << 20), "paced-blob")
    try:
        config = _config(upstreams, None)
        config["proxies"]["paced/"] = {"registry": paced.url, "remote": "platform"}
        config["proxies"]["storm/"] = {"registry": rig.own.url, "remote": "platform"}
        p = make_proxy(config)
        h = healthy_for(p, image_digests)
        storm_tok = httpx.get(f"{p.url}/token", params={"scope": "repository:storm/storm:pull"}, timeout=30)
        cases = [(mint(p, "paced"), "/v2/paced/app/blobs/sha256:" + "3" * 64)] * 8
        cases += [(storm_tok.json()["token"], f"/v2/storm/storm/blobs/{rig.storm_blob}")] * 4
        wait_quiet(lambda: faults.open_fds(p.proc.pid), 0.5)  # let the warm-up connections close
        baseline = faults.open_fds(p.proc.pid)
        socks = []
        for tok, path in cases:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=20)
            s.sendall(_get_head(p, path, tok))
            assert _read_some(s, 256 * 1024) >= 256 * 1024  # mid-body now
            socks.append(s)
        assert faults.open_fds(p.proc.pid) > baseline
        h.check()  # served while a dozen blobs are in flight
        for i, s in enumerate(socks):
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.close()
        h.check()
        wait_until(lambda: paced.counts()[1] >= 8, 5, "the proxy to close its paced upstream connections")
        # A storm blob (2 MiB) may have reached the proxy whole before its client left: that upstream
        # connection finished its exchange cleanly and waits in the upstream pool for the next request.
        pooled = 4
        wait_until(
            lambda: faults.open_fds(p.proc.pid) <= baseline + pooled,
            5,
            f"the proxy's descriptors to return to {baseline} (+ {pooled} pooled)",
            lambda: f"open: {faults.open_fds(p.proc.pid)}",
        )
        h.check()
        assert_no_leak(p, secrets_of(upstreams))
    finally:
        paced.stop()


def test_slowloris_clients_are_cut_at_client_timeout(
    upstreams: dict[str, registry.Upstream], make_proxy: Any, image_digests: dict[str, standard.Digests]
) -> None:
    """50 sockets each sending one header byte a second, and a keep-alive connection left idle: with
    registryproxy_client_timeout=2 each is closed after 2-4 s, while normal clients are served."""
    p = make_proxy(_config(upstreams, None), extra_args=["--set", f"registryproxy_client_timeout={CLIENT_TIMEOUT}"])
    h = healthy_for(p, image_digests)
    wait_quiet(lambda: faults.open_fds(p.proc.pid), 0.5)  # let the warm-up connections close
    baseline = faults.open_fds(p.proc.pid)
    head = f"GET /v2/ HTTP/1.1\r\nHost: {p.host}\r\nUser-Agent: slowloris/1.0\r\nAccept: */*\r\n\r\n".encode()
    idle = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    idle.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
    answer = b""
    while not _complete(answer):  # the head and the body may come in separate reads
        chunk = idle.recv(65536)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 401")
    idle_since = time.monotonic()
    loris = faults.Slowloris("127.0.0.1", p.port, 50, head, interval=1.0)
    try:
        deadline = time.monotonic() + CLIENT_TIMEOUT + 2 * SLACK
        while any(c is None for c in loris.closed_after()) and time.monotonic() < deadline:
            h.check()  # normal clients are served meanwhile
            time.sleep(0.2)
        closed = loris.closed_after()
    finally:
        loris.stop()
    idle.settimeout(CLIENT_TIMEOUT + 2 * SLACK)
    try:
        idle_closed = idle.recv(1) == b""
    except OSError:
        idle_closed = True
    idle_after = time.monotonic() - idle_since
    idle.close()
    done = [c for c in closed if c is not None]
    print(
        f"slowloris: {len(done)}/{len(closed)} closed, after {min(done, default=0):.2f}-{max(done, default=0):.2f}s;"
        f" idle keep-alive closed after {idle_after:.2f}s; healthy GET max {max(h.latencies):.3f}s"
    )
    assert len(done) == len(closed), f"{len(closed) - len(done)} slowloris sockets still open"
    assert all(CLIENT_TIMEOUT - 0.5 <= c <= CLIENT_TIMEOUT + SLACK for c in done), done
    assert max(loris.sent) < len(head)  # none of them ever finished its request head
    assert idle_closed and idle_after <= CLIENT_TIMEOUT + SLACK
    assert max(h.latencies) < HEALTHY_BOUND
    wait_until(lambda: faults.open_fds(p.proc.pid) <= baseline, 5, f"the proxy's descriptors to return to {baseline}")
    assert_no_leak(p, secrets_of(upstreams))


# --- load ---------------------------------------------------------------------------------------


def test_200_concurrent_blob_downloads_while_pinging(
    upstreams: dict[str, registry.Upstream],
    rig: Rig,
    make_proxy: Any,
    image_digests: dict[str, standard.Digests],
) -> None:
    """200 concurrent GETs of a 2 MiB blob: every body's sha256 is its digest, and a /v2/ ping made
    meanwhile on its own connection is answered in bounded time.

    Its own proxy with the default upstream_timeout (30 s): the 2 s of the fault proxy count from the
    request's headers, so on a saturated machine they also time the proxy's own queueing (seen: a
    few 502 "upstream sent no answer within 2.0s" among the 200)."""
    config = _config(upstreams, None)
    config["upstream_timeout"] = 30
    config["proxies"]["storm/"] = {"registry": f"http://127.0.0.1:{rig.own.registry_port}", "remote": "platform"}
    fp = make_proxy(config)
    healthy = healthy_for(fp, image_digests)
    tok = httpx.get(f"{fp.url}/token", params={"scope": "repository:storm/storm:pull"}, timeout=30).json()["token"]
    url = f"{fp.url}/v2/storm/storm/blobs/{rig.storm_blob}"
    pings: list[float] = []
    storm_done = threading.Event()

    def ping_loop() -> None:
        while not storm_done.is_set():
            started = time.monotonic()
            r = httpx.get(f"{fp.url}/v2/", timeout=30)
            pings.append(time.monotonic() - started)
            assert r.status_code == 401
            time.sleep(0.05)

    async def one(client: httpx.AsyncClient) -> tuple[int, str, int]:
        digest = hashlib.sha256()
        size = 0
        async with client.stream("GET", url, headers={"Authorization": f"Bearer {tok}"}) as r:
            async for part in r.aiter_bytes():
                digest.update(part)
                size += len(part)
        return r.status_code, f"sha256:{digest.hexdigest()}", size

    async def storm() -> list[tuple[int, str, int]]:
        limits = httpx.Limits(max_connections=STORM_CLIENTS, max_keepalive_connections=STORM_CLIENTS)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return list(await asyncio.gather(*(one(client) for _ in range(STORM_CLIENTS))))

    pinger = threading.Thread(target=ping_loop, daemon=True)
    started = time.monotonic()
    pinger.start()
    with ThreadPoolExecutor(1) as pool:
        results_f = pool.submit(asyncio.run, storm())
        wait_until(lambda: len(pings) >= 3 or results_f.done(), 30, "pings during the storm")
        healthy.check()
        results = results_f.result(timeout=120)
    elapsed = time.monotonic() - started
    storm_done.set()
    pinger.join(timeout=30)
    assert not pinger.is_alive()
    print(
        f"storm: {STORM_CLIENTS} x {STORM_BLOB_SIZE >> 20} MiB in {elapsed:.1f}s; /v2/ ping during it: "
        f"{len(pings)} pings, median {statistics.median(pings) * 1000:.0f} ms, max {max(pings) * 1000:.0f} ms; "
        f"manifest GET {healthy.latencies[-1] * 1000:.0f} ms"
    )
    failed = [line for line in fp.output().splitlines() if "storm/storm/blobs" in line and "status=200" not in line]
    assert all(r == (200, rig.storm_blob, STORM_BLOB_SIZE) for r in results), ({r[:1] for r in results}, failed[:5])
    assert len(pings) >= 3
    assert max(pings) < PING_BOUND


def _complete(answer: bytes) -> bool:
    """Whether `answer` holds a whole HTTP/1.1 response with a Content-Length body."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True
