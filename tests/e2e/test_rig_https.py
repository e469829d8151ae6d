"""The production-like rig, proven directly (no proxy): HTTPS upstreams from a test CA with the token
service and the blob store on servers of their own (rig/https_upstream.py), the delay relay
(rig/relay.py) and the timed pulls of rig/wan.py."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from rig import clients, daemons, procs, wan
from rig.https_upstream import HTTPS_KINDS, HttpsRig, HttpsUpstream, client_context
from rig.httpserver import TcpServer
from rig.relay import Relay
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


# -- the relay on its own -----------------------------------------------------------------------------


class _Server(TcpServer):
    """A threaded TCP server on 127.0.0.1 running `handle(conn)` per connection (bounded; stop())."""

    def __init__(self, run: Callable[[socket.socket], None]) -> None:
        super().__init__("test-tcp")
        self.run = run
        self.start()

    def handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.settimeout(20)
        try:
            self.run(conn)
        finally:
            self.forget(conn)
            conn.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[_Server]:
    s = _Server(_echo)
    yield s
    s.stop()


def _connect(relay: Relay) -> socket.socket:
    c = socket.create_connection(relay.address, timeout=20)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = c.recv(n - len(buf))
        if not data:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return buf


def _recv_all(c: socket.socket) -> bytes:
    chunks = []
    while data := c.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_relay_delays_handshake_and_every_chunk(echo_server: _Server) -> None:
    with Relay((procs.LOOPBACK, echo_server.port), delay=D, name="t").start() as relay:
        t0 = time.perf_counter()
        with _connect(relay) as c:
            c.sendall(b"first")
            assert _recv_exactly(c, 5) == b"first"
            first = time.perf_counter() - t0
            gaps = []
            for i in range(5):
                t1 = time.perf_counter()
                msg = f"chunk-{i}".encode()
                c.sendall(msg)
                assert _recv_exactly(c, len(msg)) == msg
                gaps.append(time.perf_counter() - t1)
            # Several chunks in flight come back in order.
            for i in range(20):
                c.sendall(b"%03d" % i)
            assert _recv_exactly(c, 60) == b"".join(b"%03d" % i for i in range(20))
        assert relay.connections() == 1
    assert 4 * D <= first < 4 * D + 0.5, first
    assert all(2 * D <= g < 2 * D + 0.5 for g in gaps), gaps


def test_relay_counts_and_resets(echo_server: _Server) -> None:
    with Relay((procs.LOOPBACK, echo_server.port), name="t").start() as relay:
        for _ in range(3):
            with _connect(relay) as c:
                c.sendall(b"x")
                assert _recv_exactly(c, 1) == b"x"
        assert relay.connections() == 3
        assert relay.reset_connections() == 3 and relay.connections() == 0
        with _connect(relay) as c:
            c.sendall(b"y")
            _recv_exactly(c, 1)
        assert relay.connections() == 1
        procs.wait_until(lambda: relay.active() == 0, 5, "the relay to close its finished connections")


def test_relay_half_close_both_ways() -> None:
    """The client's EOF reaches the server as an EOF (not a close): the server still answers; and
    the server's EOF reaches the client while the client can still send."""

    def count_then_answer(conn: socket.socket) -> None:
        n = len(_recv_all(conn))
        conn.sendall(f"got {n}".encode())

    late: list[bytes] = []

    def greet_then_read(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        late.append(_recv_all(conn))

    s1, s2 = _Server(count_then_answer), _Server(greet_then_read)
    try:
        with Relay((procs.LOOPBACK, s1.port), delay=0.002, name="t1").start() as relay, _connect(relay) as c:
            c.sendall(b"a" * 100_000)
            c.shutdown(socket.SHUT_WR)
            assert _recv_all(c) == b"got 100000"
        with Relay((procs.LOOPBACK, s2.port), delay=0.002, name="t2").start() as relay, _connect(relay) as c:
            assert _recv_all(c) == b"hello"  # the server's EOF arrived...
            c.sendall(b"late data")  # ...and the other direction still works
            c.shutdown(socket.SHUT_WR)
            procs.wait_until(lambda: bool(late), 5, "the server to read to its EOF")
            assert late == [b"late data"]
            procs.wait_until(lambda: relay.active() == 0, 5, "the relay to close the connection")
    finally:
        s1.stop()
        s2.stop()


def test_relay_closes_the_client_when_the_server_closes() -> None:
    def answer_and_close(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"bye")

    s = _Server(answer_and_close)
    try:
        with Relay((procs.LOOPBACK, s.port), delay=0.002, name="t").start() as relay:
            with _connect(relay) as c:
                c.sendall(b"hi")
                assert _recv_all(c) == b"bye"
            procs.wait_until(lambda: relay.active() == 0, 5, "the relay to drop the connection")
        # An unreachable target: the client is closed at once (after the simulated handshake).
        port = procs.free_port()
        with Relay((procs.LOOPBACK, port), name="dead").start() as relay, _connect(relay) as c:
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
    finally:
        s.stop()


def test_relay_throughput_and_bounded_buffer() -> None:
    """Tens of MB/s at least with a delay; a receiver that does not read stops the sender once the
    relay holds its bound (plus the kernels' socket buffers), and then everything arrives."""
    block = os.urandom(1 << 20)
    total = 64 << 20

    def source(conn: socket.socket) -> None:
        _recv_exactly(conn, 2)  # all of it: closing with unread data would reset the connection
        for _ in range(total // len(block)):
            conn.sendall(block)

    s = _Server(source)
    try:
        with Relay((procs.LOOPBACK, s.port), delay=D, name="t").start() as relay:
            t0 = time.perf_counter()
            with _connect(relay) as c:
                c.sendall(b"go")
                got = len(_recv_all(c))
            rate = got / (time.perf_counter() - t0) / 1e6
        assert got == total
        assert rate >= 20, f"{rate:.0f} MB/s"
    finally:
        s.stop()

    release = threading.Event()
    received: list[int] = []

    def stalled_sink(conn: socket.socket) -> None:
        release.wait(30)
        received.append(len(_recv_all(conn)))

    s = _Server(stalled_sink)
    try:
        with Relay((procs.LOOPBACK, s.port), delay=0.001, name="t", buffer_limit=1 << 20).start() as relay:
            with _connect(relay) as c:
                c.settimeout(1.0)
                sent = 0
                try:
                    while sent < 256 << 20:
                        sent += c.send(block)
                except TimeoutError:
                    pass
                assert sent < 64 << 20, f"the relay took {sent >> 20} MiB without a reader"
                release.set()
                c.settimeout(20)
                c.shutdown(socket.SHUT_WR)
                assert _recv_all(c) == b""
            procs.wait_until(lambda: bool(received), 10, "the sink to read everything")
            assert received == [sent]
    finally:
        release.set()
        s.stop()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _relay_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"relay-{name}-")]


def test_relay_stop_leaves_nothing_behind(echo_server: _Server) -> None:
    assert not _relay_threads("t") and not _relay_threads("slow")
    fds_before = _fds()
    relay = Relay((procs.LOOPBACK, echo_server.port), delay=0.005, name="t").start()
    assert _relay_threads("t") == [f"relay-t-{relay.port}"]
    clients_ = [_connect(relay) for _ in range(3)]
    for c in clients_:
        c.sendall(b"ping")
        assert _recv_exactly(c, 4) == b"ping"
    clients_[0].shutdown(socket.SHUT_WR)  # one half-closed
    slow = Relay((procs.LOOPBACK, echo_server.port), delay=5.0, name="slow").start()
    pending = _connect(slow)  # still in its simulated handshake
    relay.stop()
    slow.stop()
    relay.stop()  # idempotent
    assert not _relay_threads("t") and not _relay_threads("slow")
    for c in [*clients_, pending]:
        try:
            assert c.recv(10) == b""
        except ConnectionResetError:
            pass
        c.close()
    with pytest.raises(OSError):
        socket.create_connection(relay.address, timeout=2).close()
    procs.wait_until(lambda: _fds() <= fds_before, 5, f"file descriptors back to {fds_before} (now {_fds()})")


def test_unstarted_relay_closes_its_listener() -> None:
    fds_before = _fds()
    relay = Relay(name="unused")
    assert relay.port > 0 and _fds() == fds_before + 1
    relay.stop()
    assert _fds() == fds_before and not _relay_threads("unused")
