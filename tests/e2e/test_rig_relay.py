"""The delay relay (rig/relay.py) on its own, against small local TCP servers: delays, counters,
half-closes, throughput with a bounded buffer, and nothing left behind once stopped."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from rig import procs
from rig.httpserver import TcpServer
from rig.relay import Relay

pytestmark = pytest.mark.e2e

D = 0.010  # the one-way delay the timing tests use (20 ms round trip)


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
