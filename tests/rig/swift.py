"""A real S3-compatible server for the tests: OpenStack Swift (Debian 12's `swift-*` packages, 2.30.1) as one
node on 127.0.0.1 with the `s3api` middleware (SigV4, presigned URLs, multipart uploads) and `tempauth`.

    with Swift(tmp_path / "swift") as s3:       # or the session fixture `swift_s3` (tests/e2e/conftest.py)
        s3.create_bucket("cache")
        async with s3.client() as c:            # aiobotocore, with the settings Swift 2.30 needs (below)
            await c.put_object(Bucket="cache", Key="k", Body=b"v")

Everything lives under the work dir: rings, configs, the one device. Nothing is read from or written to
/etc/swift or /srv, nothing needs root, and every process is stopped through its own process group.

How the node is put together (the non-obvious parts):
- swift.conf: every Swift server reads /etc/swift/swift.conf (hash path prefix/suffix, storage policies,
  constraints) whatever its own config says. `swift_dir` only moves the rings (and mime.types), no
  environment variable changes it, and Debian ships that file with `changeme` values. So each server runs
  under a small launcher (`_LAUNCHER`, with Debian's /usr/bin/python3, 3.11) that calls Swift's own
  `utils.set_swift_dir(WORK)`, reloads the storage policies and constraints from WORK/swift.conf, and then
  calls `run_wsgi` exactly as /usr/bin/swift-*-server do. WORK/swift.conf has a random prefix and suffix.
- Rings: account, container and object, each with part power 6, 1 replica, min_part_hours 0 and one device
  `d1` (region 1, zone 1, 127.0.0.1 and that server's port), built by the launcher with Swift's RingBuilder,
  the code behind `swift-ring-builder` (its create/add/rebalance are one interpreter start, ~0.75 s, each:
  nine of them took 7 s). The device is the directory WORK/srv/d1: `devices = WORK/srv` and
  `mount_check = false` (Swift otherwise insists that a device is a mount point). The object server keeps
  metadata in user xattrs: the work dir's file system needs them (ext4 has them; tmpfs before Linux 6.6
  does not).
- Servers: account, container, object and proxy, each with `workers = 0` (no fork: the server is the one
  process of its process group), `bind_ip = 127.0.0.1` and a free port, `user` = the current user (Swift
  otherwise drops privileges to `swift`, who cannot write to a root-owned 0700 temp dir). Chunk sizes of
  1 MiB instead of 64 KiB (proxy `object_chunk_size`/`client_chunk_size`, backends `network_chunk_size`/
  `disk_chunk_size`): a 256 MiB GET went from ~140 to ~200-400 MiB/s here, uploads did not change.
  Not started: replicators, auditors, updaters, reaper, sharder, expirer, reconciler. With one replica
  there is nothing to replicate; object servers update containers and container servers update accounts
  synchronously (the updaters only retry updates that failed, and refresh account stats); nothing here
  uses X-Delete-At, deletes accounts or changes storage policies.
- memcached (Debian's `memcached -l 127.0.0.1 -p PORT -U 0`): tempauth refuses requests without a memcache
  client, and without a server each request logs a connection error and the proxy asks the backends for
  account and container info every time.
- Proxy pipeline: `catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth
  copy slo dlo versioned_writes proxy-logging proxy-server`: s3api right before its auth; `slo` after it
  (s3api turns multipart uploads off without it); `copy` for CopyObject; `versioned_writes` would be added
  by the proxy anyway. `account_autocreate = true` (the account AUTH_test is made on the first bucket
  PUT). tempauth: `user_test_tester = testing .admin`, so the S3 access key is `test:tester` and the secret
  `testing`; a second user of the same account, `test:proxy<random hex>` with a random secret
  (`proxy_access_key_id`, `proxy_secret_access_key`), sees the same buckets: what a proxy under test is
  given, so that a search of its output for these values finds only leaks. s3api: `location = us-east-1` (the region SigV4 credential scopes must name), no
  `storage_domain` (path-style addressing only), `s3_acl` off (Swift ACLs: buckets are private to the
  account). `error_suppression_limit` is raised: with one node, error-limiting it after 10 failed
  connections (a backend restarted by a test, say) would make the whole store answer 503 for a minute.
- HTTPS (`tls=`): the proxy's `cert_file`/`key_file` (eventlet wraps the listening socket); clients verify
  with the CA (`client()` does).
- Logs: Swift logs only to syslog (a console handler only with `-v`), and the proxy's access logger takes
  `log_udp_host`/`log_udp_port` but no `log_address`; all servers send to a UDP socket on 127.0.0.1 that
  this rig reads (nothing to /dev/log or port 514). The access log (`access_log_name = proxy-access`,
  `log_msg_template` below) gives `requests()`: the client requests the proxy answered (subrequests made by
  middlewares carry a `swift.source` and are left out).

Client settings (`client_config()`), and what was found with botocore 1.43.117 (aiobotocore 3.10.0):
- SigV4 (`signature_version="s3v4"`, presigned URLs included), path-style addressing, no retries (a test
  sees the first answer).
- `request_checksum_calculation="when_required"`, `response_checksum_validation="when_required"`. With
  botocore's default ("when_supported") PutObject and UploadPart over HTTPS are sent as
  `Content-Encoding: aws-chunked` with `x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER` and a CRC32
  trailer, which Swift 2.30 answers with 501 NotImplemented ("Transfering payloads in multiple chunks using
  aws-chunked is not supported"). Over plain HTTP botocore signs the payload and sends the CRC32 as an
  `x-amz-checksum-crc32` header instead, which Swift accepts and ignores (it does not check it). With
  "when_required" both work: the body is signed (HTTP) or UNSIGNED-PAYLOAD (HTTPS), no checksum header.
- DeleteObjects: Swift 2.30 requires Content-MD5 on it (400 InvalidRequest "Missing required header for
  this request: Content-MD5"); botocore >= 1.36 sends a CRC32 checksum instead in both modes, so `client()`
  registers `add_content_md5` on `before-call.s3.DeleteObjects` (off with `delete_objects_md5=False`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import pwd
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from .procs import LOOPBACK, Proc, RigError, clean_env, free_port, run_checked, wait_until

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from types_aiobotocore_s3 import S3Client

    from .tls import TestCA

SWIFT_PYTHON = "/usr/bin/python3"  # Debian's python3 (3.11), where python3-swift lives
SWIFT_PACKAGE = "/usr/lib/python3/dist-packages/swift"
MEMCACHED = "/usr/bin/memcached"
DEBIAN_PACKAGES = ("swift", "swift-proxy", "swift-account", "swift-container", "swift-object", "python3-swift")

REGION = "us-east-1"
ACCOUNT = "test"
USER = "tester"
ACCESS_KEY_ID = f"{ACCOUNT}:{USER}"
SECRET_ACCESS_KEY = "testing"

SERVERS = ("account", "container", "object")
PART_POWER = 6  # 64 partitions: a one-device ring gains nothing from more
DEVICE = "d1"
REFUSAL_GRACE = 5.0  # s that 4xx answers to the readiness probe are retried before they count as fatal

# Run with Debian's python3:
#   launch_swift.py rings WORK PART_POWER NAME=PORT...  NAME.ring.gz and NAME.builder with one device each,
#                                                       as `swift-ring-builder create/add/rebalance` make them
#   launch_swift.py serve WORK CONF SECTION             WORK/swift.conf in force, then run_wsgi(CONF, SECTION)
_LAUNCHER_TEMPLATE = """\
import sys
mode, swift_dir = sys.argv[1:3]
if mode == "rings":
    import os
    from swift.common.ring import RingBuilder
    part_power = int(sys.argv[3])
    for spec in sys.argv[4:]:
        name, port = spec.split("=")
        builder = RingBuilder(part_power, 1, 0)
        builder.add_dev({"region": 1, "zone": 1, "ip": "@IP@", "port": int(port),
                         "replication_ip": "@IP@", "replication_port": int(port),
                         "device": "@DEVICE@", "weight": 100})
        builder.rebalance()
        builder.get_ring().save(os.path.join(swift_dir, name + ".ring.gz"))
        builder.save(os.path.join(swift_dir, name + ".builder"))
    sys.exit(0)
conf_path, section = sys.argv[3:5]
from swift.common import utils
utils.set_swift_dir(swift_dir)
from swift.common import constraints, storage_policy
storage_policy.reload_storage_policies()
constraints.reload_constraints()
from swift.common.wsgi import run_wsgi
kwargs = {}
if section == "object-server":
    from swift.obj import server
    kwargs["global_conf_callback"] = server.global_conf_callback
sys.exit(run_wsgi(conf_path, section, **kwargs))
"""
_LAUNCHER = _LAUNCHER_TEMPLATE.replace("@IP@", LOOPBACK).replace("@DEVICE@", DEVICE)

# What the proxy's access log says about each request (values url-quoted, '-' when empty); Swift's log
# formatter appends " (txn: ...)".
_ACCESS_TEMPLATE = "{method} {path} {status_int} {bytes_recvd} {bytes_sent} {source} {request_time}"
_ACCESS_LINE = re.compile(
    r"^proxy-access: (?P<method>\S+) (?P<path>\S+) (?P<status>\d{3}) (?P<recvd>\S+) (?P<sent>\S+) "
    r"(?P<source>\S+) (?P<secs>\S+)(?: \(txn: \S+\))?$"
)
_SYSLOG_PRI = re.compile(r"^<\d+>")


def available() -> bool:
    """Whether Debian's swift packages and memcached are installed."""
    paths = [SWIFT_PYTHON, SWIFT_PACKAGE, MEMCACHED] + [f"/usr/bin/swift-{s}-server" for s in (*SERVERS, "proxy")]
    return all(os.path.exists(p) for p in paths)


def add_content_md5(params: dict[str, Any], **_: Any) -> None:
    """A botocore `before-call` handler: set Content-MD5 from the serialized request body."""
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes | bytearray):
        params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


class SwiftRequest(NamedTuple):
    """One client request the proxy answered, from its access log."""

    method: str
    path: str  # url-quoted, with the query: "/bucket/key%3FuploadId%3D..."
    status: int
    bytes_received: int
    bytes_sent: int
    seconds: float


def _int(field: str) -> int:
    return 0 if field == "-" else int(field)


def parse_access_log(lines: list[str]) -> list[SwiftRequest]:
    """The client requests in `lines` (proxy-access lines without a swift.source)."""
    out = []
    for line in lines:
        m = _ACCESS_LINE.match(line)
        if m is None or m.group("source") != "-":
            continue
        out.append(
            SwiftRequest(
                m.group("method"),
                m.group("path"),
                int(m.group("status")),
                _int(m.group("recvd")),
                _int(m.group("sent")),
                float(m.group("secs")),
            )
        )
    return out


class _LogSink:
    """A UDP socket on 127.0.0.1 that the servers' syslog handlers send to, drained by a thread."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # capped by net.core.rmem_max
        self._sock.bind((LOOPBACK, 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._drain, name="swift-log", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            text = _SYSLOG_PRI.sub("", data.decode("utf-8", errors="replace").rstrip("\x00\n"))
            with self._lock:
                self._lines.append(text)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def clear(self) -> None:
        with self._lock:
            self._lines.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _ini(sections: dict[str, dict[str, str | int]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {v}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


@dataclass
class SwiftServer:
    name: str  # "account", "container", "object", "proxy"
    port: int
    conf: Path
    proc: Proc


class Swift:
    """One Swift node with s3api on 127.0.0.1 (see the module's docstring); a context manager."""

    region = REGION
    access_key_id = ACCESS_KEY_ID
    secret_access_key = SECRET_ACCESS_KEY

    def __init__(self, workdir: Path, *, tls: TestCA | None = None, start_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.tls = tls  # HTTPS with this CA's server certificate (127.0.0.1, localhost) when given
        self.start_timeout = start_timeout
        self.port = 0
        self.start_seconds = 0.0  # how long start() took, rings and configs included
        self.servers: list[SwiftServer] = []
        self.memcached: Proc | None = None
        self._sink: _LogSink | None = None
        # A second admin of the account, with values no one else uses (see the module's docstring).
        self._proxy_user = f"proxy{secrets.token_hex(6)}"
        self.proxy_secret_access_key = secrets.token_hex(20)

    # -- what clients need ----------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def proxy_access_key_id(self) -> str:
        """The second user's access key id (its secret: `proxy_secret_access_key`)."""
        return f"{ACCOUNT}:{self._proxy_user}"

    def client_config(self, **overrides: Any) -> AioConfig:
        """The aiobotocore Config that works against this Swift (see the module's docstring)."""
        from aiobotocore.config import AioConfig

        settings: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "retries": {"total_max_attempts": 1},
            "connect_timeout": 5,
            "read_timeout": 60,
        }
        settings.update(overrides)
        return AioConfig(**settings)

    def client(
        self, *, delete_objects_md5: bool = True, **config_overrides: Any
    ) -> AbstractAsyncContextManager[S3Client]:
        """An aiobotocore S3 client for this node: `async with s3.client() as c:`.

        `delete_objects_md5`: add the Content-MD5 that Swift 2.30 requires on DeleteObjects (botocore >= 1.36
        sends a CRC32 instead); False shows the refusal. `config_overrides` go to client_config()."""
        return self._client(delete_objects_md5, config_overrides)

    @contextlib.asynccontextmanager
    async def _client(self, delete_objects_md5: bool, config_overrides: dict[str, Any]) -> AsyncIterator[S3Client]:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            verify=str(self.tls.ca_cert) if self.tls else None,
            config=self.client_config(**config_overrides),
        ) as c:
            if delete_objects_md5:
                c.meta.events.register("before-call.s3.DeleteObjects", add_content_md5)
            yield c

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` (3 to 63 characters: s3api checks DNS-compliant names). Synchronous: not
        for use inside a running event loop (there, `await c.create_bucket(Bucket=name)`)."""

        async def create() -> None:
            async with self.client() as c:
                await c.create_bucket(Bucket=name)

        asyncio.run(create())

    # -- what it served ------------------------------------------------------------------------------
    def log_lines(self) -> list[str]:
        """Every line the servers logged so far ("proxy-access: GET /b 200 ...", "object-server: ...")."""
        return self._sink.lines() if self._sink is not None else []

    def requests(self) -> list[SwiftRequest]:
        """The client requests the proxy answered, in order of completion (middlewares' subrequests left
        out). A line is logged once the answer was sent: wait_requests() waits for it."""
        return parse_access_log(self.log_lines())

    def wait_requests(self, count: int, timeout: float = 5.0) -> list[SwiftRequest]:
        """requests() once it holds at least `count` entries."""
        wait_until(lambda: len(self.requests()) >= count, timeout, f"{count} requests in Swift's access log")
        return self.requests()

    def request_count(self, method: str | None = None) -> int:
        """How many client requests (with `method`, if given) the proxy answered."""
        return sum(1 for r in self.requests() if method is None or r.method == method)

    def clear_log(self) -> None:
        if self._sink is not None:
            self._sink.clear()

    def describe(self) -> str:
        parts = [s.proc.describe() for s in self.servers]
        if self.memcached is not None:
            parts.append(self.memcached.describe())
        parts.append("--- swift log (last 200 lines):\n" + "\n".join(self.log_lines()[-200:]))
        return "\n".join(parts)

    def pids(self) -> list[int]:
        """The process (= process group) ids of the four servers and memcached."""
        procs = [s.proc for s in self.servers] + ([self.memcached] if self.memcached else [])
        return [p.pid for p in procs]

    def running(self) -> bool:
        return bool(self.servers) and all(s.proc.running() for s in self.servers)

    # -- life cycle ----------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if not available():
            raise RigError(f"Swift is not installed (Debian packages {' '.join(DEBIAN_PACKAGES)} memcached)")
        t0 = time.monotonic()
        try:
            self._start(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def _start(self, deadline: float) -> None:
        work = self.workdir
        (work / "srv" / DEVICE).mkdir(parents=True, exist_ok=True)
        self._sink = _LogSink()
        log_port = self._sink.port
        ports = {name: free_port() for name in (*SERVERS, "proxy")}
        self.port = ports["proxy"]
        memcached_port = free_port()
        (work / "swift.conf").write_text(
            _ini(
                {
                    "swift-hash": {
                        "swift_hash_path_prefix": secrets.token_hex(8),
                        "swift_hash_path_suffix": secrets.token_hex(8),
                    },
                    "storage-policy:0": {"name": "Policy-0", "default": "yes"},
                }
            )
        )
        launcher = work / "launch_swift.py"
        launcher.write_text(_LAUNCHER)
        as_root = ["-u", "root"] if os.getuid() == 0 else []  # memcached refuses to run as root without -u
        self.memcached = Proc("memcached").start(
            [MEMCACHED, "-l", LOOPBACK, "-p", str(memcached_port), "-U", "0", "-m", "64", "-t", "1", *as_root],
            env=clean_env(),
            cwd=work,
        )

        def start_server(name: str) -> None:
            conf = work / f"{name}-server.conf"
            conf.write_text(self._server_conf(name, ports[name], log_port, memcached_port))
            proc = Proc(f"swift-{name}-server")
            self.servers.append(SwiftServer(name, ports[name], conf, proc))
            proc.start(
                [SWIFT_PYTHON, str(launcher), "serve", str(work), str(conf), f"{name}-server"],
                env=clean_env({"PYTHONDONTWRITEBYTECODE": "1"}),
                cwd=work,
            )

        # The backends never read the rings: they start while the rings are built; the proxy needs them.
        for name in SERVERS:
            start_server(name)
        specs = [f"{name}={ports[name]}" for name in SERVERS]
        run_checked([SWIFT_PYTHON, str(launcher), "rings", str(work), str(PART_POWER), *specs], timeout=60)
        start_server("proxy")

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        self.memcached.wait_for_port(LOOPBACK, memcached_port, timeout=left())
        # The backends first: the proxy would count their refused connections as errors.
        for s in self.servers[:-1]:
            s.proc.wait_for_port(LOOPBACK, s.port, timeout=left())
        self._wait_s3_ready(deadline)

    def _server_conf(self, name: str, port: int, log_port: int, memcached_port: int) -> str:
        default: dict[str, str | int] = {
            "bind_ip": LOOPBACK,
            "bind_port": port,
            "workers": 0,
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "swift_dir": str(self.workdir),
            "devices": str(self.workdir / "srv"),
            "mount_check": "false",
            "log_name": f"{name}-server",
            "log_udp_host": LOOPBACK,
            "log_udp_port": log_port,
            "log_level": "INFO",
        }
        if name != "proxy":
            return _ini(
                {
                    "DEFAULT": default,
                    "pipeline:main": {"pipeline": f"{name}-server"},
                    f"app:{name}-server": {
                        "use": f"egg:swift#{name}",
                        "network_chunk_size": 1 << 20,
                        "disk_chunk_size": 1 << 20,
                    },
                }
            )
        if self.tls is not None:
            default["cert_file"] = str(self.tls.server_pem)  # the certificate, its CA and the key
            default["key_file"] = str(self.tls.server_pem)
        pipeline = (
            "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth "
            "copy slo dlo versioned_writes proxy-logging proxy-server"
        )
        return _ini(
            {
                "DEFAULT": default,
                "pipeline:main": {"pipeline": pipeline},
                "app:proxy-server": {
                    "use": "egg:swift#proxy",
                    "account_autocreate": "true",
                    "error_suppression_limit": 1000000,
                    "object_chunk_size": 1 << 20,
                    "client_chunk_size": 1 << 20,
                },
                "filter:catch_errors": {"use": "egg:swift#catch_errors"},
                "filter:gatekeeper": {"use": "egg:swift#gatekeeper"},
                "filter:healthcheck": {"use": "egg:swift#healthcheck"},
                "filter:proxy-logging": {
                    "use": "egg:swift#proxy_logging",
                    "access_log_name": "proxy-access",
                    "log_msg_template": _ACCESS_TEMPLATE,
                },
                "filter:cache": {"use": "egg:swift#memcache", "memcache_servers": f"{LOOPBACK}:{memcached_port}"},
                "filter:listing_formats": {"use": "egg:swift#listing_formats"},
                "filter:s3api": {"use": "egg:swift#s3api", "location": REGION, "s3_acl": "false"},
                "filter:tempauth": {
                    "use": "egg:swift#tempauth",
                    f"user_{ACCOUNT}_{USER}": f"{SECRET_ACCESS_KEY} .admin",
                    f"user_{ACCOUNT}_{self._proxy_user}": f"{self.proxy_secret_access_key} .admin",
                },
                "filter:copy": {"use": "egg:swift#copy"},
                "filter:slo": {"use": "egg:swift#slo"},
                "filter:dlo": {"use": "egg:swift#dlo"},
                "filter:versioned_writes": {"use": "egg:swift#versioned_writes"},
            }
        )

    def _wait_s3_ready(self, deadline: float) -> None:
        """Until a signed ListBuckets answers 200. Refused connections, resets and 5xx are waited out until
        `deadline`; 4xx answers for REFUSAL_GRACE s; a server that exits ends the wait at once."""
        asyncio.run(self._probe(deadline))

    async def _probe(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        last = "no answer yet"
        refused_since: float | None = None
        async with self.client(connect_timeout=2, read_timeout=5) as c:
            for _attempt in range(100_000):  # bounded by the deadline; the count only bounds the loop
                for s in self.servers:
                    if not s.proc.running():
                        raise RigError(f"{s.proc.name} exited during start\n{self.describe()}")
                try:
                    await c.list_buckets()
                    return
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    last = f"HTTP {status}: {e}"
                    if status < 500:
                        refused_since = refused_since or time.monotonic()
                        if time.monotonic() - refused_since > REFUSAL_GRACE:
                            raise RigError(f"Swift kept refusing the readiness probe: {e}\n{self.describe()}") from e
                except (BotoCoreError, OSError) as e:
                    last = f"{type(e).__name__}: {e}"
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
        raise RigError(f"Swift's S3 API not ready after {self.start_timeout:.0f}s (last: {last})\n{self.describe()}")

    def stop(self) -> None:
        """Stop every server and memcached through their process groups (SIGTERM, then SIGKILL)."""
        for s in reversed(self.servers):
            s.proc.stop()
        if self.memcached is not None:
            self.memcached.stop()
        if self._sink is not None:
            self._sink.close()
