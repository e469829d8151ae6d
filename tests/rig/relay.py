"""A user-space TCP relay that puts distance between a client and a server (this kernel has no netem).

`Relay(delay=D)` listens on 127.0.0.1 (a kernel-chosen port, bound at construction so the port can be
written into configurations before anything runs) and, once `start(target)`ed, for every accepted
connection:
- waits one round trip (2*D after the accept) before connecting to the target: the TCP handshake;
- forwards every chunk in both directions, each delivered D after it was read, in order, with no
  bandwidth cap; what the client sends before its simulated handshake is complete counts as sent at
  the end of it, so a new connection's first request/response costs 4*D (handshake + round trip);
- half-closes correctly: an EOF is delivered (as a write EOF) D after it was read, and the connection
  is closed when both directions are done; when one side is closed for good (a TLS side after
  close_notify, or a reset or error), data for it is dropped, and the other side gets what it was
  owed and then its end: closed, or aborted (a reset, delivered behind the data like a RST);
- bounds its buffers: a direction that holds `buffer_limit` bytes in flight (or whose destination
  does not drain) stops reading its source until it has delivered half of them.

The relay counts the connections it accepted (`connections()`, `reset_connections()`) and the bytes its
targets sent back (`bytes_down()`, never reset: take differences); `delay` may be
changed while it runs (`set_delay`): new chunks use the new value, never overtaking older ones.

With `server_tls` the relay terminates TLS (it is then a TLS front for a plain server: use delay 0 and
put a delaying relay in front of it); with `client_tls` it speaks TLS to its target.

Everything runs on one asyncio loop in a thread of its own ("relay-NAME-PORT"); `stop()` aborts every
connection, closes the listener and joins the thread. Throughput (loopback, 2 cores): hundreds of MB/s
at D <= 10 ms; one connection cannot exceed buffer_limit/D (8 MiB / 50 ms: about 160 MiB/s).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Self

from .procs import LOOPBACK, RigError

DEFAULT_BUFFER_LIMIT = 8 << 20  # bytes in flight per direction: 160 MB/s at a 50 ms one-way delay
_EOF = None


class Relay:
    """See the module docstring. Construct (binds), `start(target)`, `stop()`."""

    def __init__(
        self,
        target: tuple[str, int] | None = None,
        delay: float = 0.0,
        *,
        name: str = "relay",
        host: str = LOOPBACK,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.name = name
        self.host = host
        self.target = target
        self._delay = float(delay)
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.server_hostname = server_hostname
        self.buffer_limit = buffer_limit
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, 0))
            self._sock.listen(256)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._count_lock = threading.Lock()
        self._accepted = 0
        self._bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._stopped = False

    # -- addresses ----------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    # -- delay and counters -------------------------------------------------------------------
    @property
    def delay(self) -> float:
        """The one-way delay D in seconds (a round trip is 2*D)."""
        return self._delay

    def set_delay(self, delay: float) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(delay)

    def connections(self) -> int:
        """Connections accepted since the start or the last reset_connections()."""
        with self._count_lock:
            return self._accepted

    def reset_connections(self) -> int:
        """Set the counter to 0; returns what it was."""
        with self._count_lock:
            n, self._accepted = self._accepted, 0
            return n

    def bytes_down(self) -> int:
        """Bytes read from the target (towards clients) since the relay started; on the TLS side when the
        target speaks TLS (wire bytes, records and all). Monotonic: callers subtract two readings."""
        with self._count_lock:
            return self._bytes_down

    def active(self) -> int:
        """Connections open right now (a snapshot)."""
        return len(self._conns)

    def _count(self) -> None:
        with self._count_lock:
            self._accepted += 1

    def _count_down(self, n: int) -> None:
        with self._count_lock:
            self._bytes_down += n

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, target: tuple[str, int] | None = None, timeout: float = 10.0) -> Relay:
        if target is not None:
            self.target = target
        if self.target is None:
            raise RigError(f"relay {self.name}: no target")
        if self._loop is not None or self._sock is None:
            raise RigError(f"relay {self.name}: already started or stopped")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.name}-{self.port}", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        sock, self._sock = self._sock, None
        assert sock is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Side(_Conn(self, loop), client=True),
            sock=sock,
            ssl=self.server_tls,
            ssl_handshake_timeout=30 if self.server_tls is not None else None,
        )

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            abort_clients = getattr(self._server, "abort_clients", None)  # 3.13: TLS handshakes in progress
            if abort_clients is not None:
                abort_clients()
        for conn in list(self._conns):
            conn.abort()
        for _ in range(3):  # let aborted transports run their connection_lost (closing the sockets)
            await asyncio.sleep(0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every connection, close the listener, stop and join the thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
            if thread.is_alive():
                raise RigError(f"relay {self.name}: its thread did not stop")
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Side(asyncio.Protocol):
    """One end of a relayed connection (the accepted client, or the connection to the target)."""

    def __init__(self, conn: _Conn, *, client: bool) -> None:
        self.conn = conn
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.gone = False  # connection_lost seen
        self.is_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(high=256 * 1024)
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.received(self, data)

    def eof_received(self) -> bool:
        return self.conn.eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.conn.lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.update_flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.update_flow()


class _Direction:
    """Chunks read from `src`, waiting for their delivery time to be written to `dst`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_deadline = 0.0
        self.eof_queued = False
        self.reset = False  # the source failed: deliver its EOF as an abort of both sides
        self.done = False  # EOF delivered (or the destination is gone)
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False


class _Conn:
    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop
        self.client: _Side | None = None
        self.server: _Side | None = None
        self.up = _Direction("client->server")
        self.down = _Direction("server->client")
        self.t0 = 0.0
        self.handshake_done = 0.0  # when the simulated TCP handshake completes
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None
        self.connect_timer: asyncio.TimerHandle | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _src_dst(self, d: _Direction) -> tuple[_Side | None, _Side | None]:
        return (self.client, self.server) if d is self.up else (self.server, self.client)

    def _dir_from(self, side: _Side) -> _Direction:
        return self.up if side.client else self.down

    def _dir_to(self, side: _Side) -> _Direction:
        return self.down if side.client else self.up

    # -- events -------------------------------------------------------------------------------
    def made(self, side: _Side) -> None:
        if side.client:
            self.client = side
            self.relay._count()
            self.relay._conns.add(self)
            self.t0 = self.loop.time()
            delay = self.relay.delay
            self.handshake_done = self.t0 + 2 * delay
            if delay > 0:
                self.connect_timer = self.loop.call_at(self.handshake_done, self._start_connect)
            else:
                self._start_connect()
        else:
            self.server = side
            if self.closed:
                if side.transport is not None:
                    side.transport.abort()
                return
            for d in (self.up, self.down):
                self._flush(d)
            self.update_flow()

    def _start_connect(self) -> None:
        self.connect_timer = None
        if self.closed:
            return
        self.connect_task = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        target = self.relay.target
        assert target is not None
        try:
            await self.loop.create_connection(
                lambda: _Side(self, client=False),
                target[0],
                target[1],
                ssl=self.relay.client_tls,
                server_hostname=self.relay.server_hostname if self.relay.client_tls is not None else None,
                ssl_handshake_timeout=30 if self.relay.client_tls is not None else None,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            self.abort()

    def received(self, side: _Side, data: bytes) -> None:
        if not side.client:
            self.relay._count_down(len(data))
        d = self._dir_from(side)
        now = self.loop.time()
        delay = self.relay.delay
        sent = max(now, self.handshake_done) if side.client else now
        deadline = max(sent + delay, d.last_deadline)
        d.last_deadline = deadline
        d.queue.append((deadline, data))
        d.queued += len(data)
        self._flush(d)
        self.update_flow()

    def eof(self, side: _Side) -> bool:
        self._queue_eof(self._dir_from(side))
        return not side.is_tls  # a TLS transport cannot stay half open

    def _queue_eof(self, d: _Direction) -> None:
        if d.eof_queued or d.done:
            return
        d.eof_queued = True
        src, _ = self._src_dst(d)
        sent = max(self.loop.time(), self.handshake_done) if src is self.client else self.loop.time()
        deadline = max(sent + self.relay.delay, d.last_deadline)
        d.last_deadline = deadline
        d.queue.append((deadline, _EOF))
        self._flush(d)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if self.closed:
            return
        # Closed for good (not half): nothing more can be delivered to it; what it sent is still owed,
        # and so is its end: an EOF, or after an error (a reset) an abort of both sides, which travels
        # behind the data like a RST.
        to = self._dir_to(side)
        to.queue.clear()
        to.queued = 0
        to.done = True
        self._cancel_timer(to)
        frm = self._dir_from(side)
        if exc is not None:
            if frm.done:
                self.abort()
                return
            frm.reset = True
        self._queue_eof(frm)
        self._maybe_finish()

    # -- delivery -----------------------------------------------------------------------------
    def _cancel_timer(self, d: _Direction) -> None:
        if d.timer is not None:
            d.timer.cancel()
            d.timer = None

    def _flush(self, d: _Direction) -> None:
        if self.closed or d.done:
            return
        _, dst = self._src_dst(d)
        if dst is None or dst.transport is None or dst.gone:
            return  # not connected yet: flushed from made()
        now = self.loop.time()
        chunks: list[bytes] = []
        eof = False
        while d.queue and d.queue[0][0] <= now:
            _, data = d.queue.popleft()
            if data is None:
                eof = True
                break
            chunks.append(data)
            d.queued -= len(data)
        for chunk in chunks:  # write(), not writelines(): 3.13's writelines never pauses the protocol
            dst.transport.write(chunk)
        if eof:
            d.done = True
            d.queue.clear()
            d.queued = 0
            self._cancel_timer(d)
            if d.reset:
                self.abort()
                return
            try:
                if dst.transport.can_write_eof():
                    dst.transport.write_eof()
                else:
                    dst.transport.close()
            except OSError:  # the peer is gone already (ENOTCONN)
                self.abort()
                return
            self._maybe_finish()
            return
        if d.queue and d.timer is None:
            d.timer = self.loop.call_at(d.queue[0][0], self._on_timer, d)
        self.update_flow()

    def _on_timer(self, d: _Direction) -> None:
        d.timer = None
        self._flush(d)

    def update_flow(self) -> None:
        if self.closed:
            return
        for d in (self.up, self.down):
            src, dst = self._src_dst(d)
            if src is None or src.transport is None or src.gone:
                continue
            blocked = d.queued >= self.relay.buffer_limit or (dst is not None and dst.write_paused)
            if blocked and not d.reading_paused:
                d.reading_paused = True
                src.transport.pause_reading()
            elif d.reading_paused and not blocked and d.queued < self.relay.buffer_limit // 2:
                d.reading_paused = False
                src.transport.resume_reading()

    # -- closing ------------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        if self.up.done and self.down.done:
            self._close(lambda t: t.close())

    def abort(self) -> None:
        self._close(lambda t: t.abort())

    def _close(self, how: Callable[[asyncio.Transport], None]) -> None:
        if self.closed:
            return
        self.closed = True
        for d in (self.up, self.down):
            self._cancel_timer(d)
            d.queue.clear()
            d.queued = 0
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.client, self.server):
            if side is not None and side.transport is not None and not side.gone:
                how(side.transport)
        self.relay._conns.discard(self)


__all__ = ["DEFAULT_BUFFER_LIMIT", "Relay"]
