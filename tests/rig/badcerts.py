"""TLS upstreams whose certificates are right or wrong in one way each, for the upstream-trust tests.

- `make_pki(dir)`: a private test CA (`ca.crt`, from pki.py) that can issue server certificates: for
  the right names (`localhost`, `127.0.0.1`), for another name only (a host name mismatch), or expired.
  Certificates satisfy Python 3.13's strict checks (see pki.py), so a failure is always the one the
  test made.
- `start_tls_registry(...)`: a real `docker-registry` serving TLS itself (`http.tls`) with one of those
  certificates, anonymous or with token auth whose token service (`TokenIssuer` over HTTPS) is on
  its own port under the registry's host name (`https://localhost:P1`, realm `https://localhost:P2/token`).
  Several registries may share one storage root: push once, serve the same images with each certificate.
- `TlsHttpServer`: a tiny in-process HTTPS server answering `/v2/` (and `/token`), for unit tests
  of the token client against real TLS.

Every server binds 127.0.0.1 on a port the kernel picks; `stop()` ends what was started, by pid.
"""

from __future__ import annotations

import datetime
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from . import pki
from .httpserver import HttpServer
from .procs import Proc, run_checked
from .registry import launch_registry, registry_config
from .token_issuer import TokenIssuer

GOOD_NAMES = ("localhost", "127.0.0.1")
REGISTRY_NAME = "localhost"


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its key, as files (PEM)."""

    cert: Path
    key: Path
    names: tuple[str, ...]

    def server_context(self) -> ssl.SSLContext:
        return pki.server_context(self.cert, self.key)


@dataclass(frozen=True)
class Pki:
    """A test CA that issues server certificates (see `issue`)."""

    dir: Path
    ca_cert: Path  # PEM: what a client (or the proxy's ca_file) trusts
    authority: pki.CertificateAuthority = field(repr=False)

    def issue(
        self,
        stem: str,
        names: Sequence[str] = GOOD_NAMES,
        *,
        not_before: datetime.timedelta = datetime.timedelta(hours=-1),
        not_after: datetime.timedelta = datetime.timedelta(days=2),
    ) -> ServerCert:
        """A server certificate valid for `names` from now+not_before to now+not_after."""
        issued = self.authority.issue(names, not_before=not_before, not_after=not_after)
        cert_path = self.dir / f"{stem}.crt"
        cert_path.write_bytes(issued.cert_pem())
        key_path = pki.write_private(self.dir / f"{stem}.key", issued.key_pem())
        return ServerCert(cert_path, key_path, tuple(names))

    def good(self) -> ServerCert:
        return self.issue("good")

    def wrong_host(self) -> ServerCert:
        return self.issue("wrong-host", ("other.example", "10.255.255.1"))

    def expired(self) -> ServerCert:
        return self.issue("expired", not_before=datetime.timedelta(days=-30), not_after=datetime.timedelta(days=-1))


def make_pki(directory: Path, name: str = "registryproxy upstream-trust test CA") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    authority = pki.new_ca(name, not_before=datetime.timedelta(days=-60), not_after=datetime.timedelta(days=30))
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(authority.cert_pem())
    return Pki(directory, ca_path, authority)


# --- a real docker-registry over TLS -----------------------------------------------------------


@dataclass
class TlsRegistry:
    """A docker-registry serving TLS itself, reached as https://NAME:PORT."""

    proc: Proc
    port: int
    name: str
    cert: ServerCert
    issuer: TokenIssuer | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def netloc(self) -> str:
        return f"{self.name}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.netloc}"

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.proc.stop()
        if self.issuer is not None:
            self.issuer.stop()


def start_tls_registry(
    workdir: Path,
    cert: ServerCert,
    storage_root: Path,
    *,
    users: Mapping[str, str] | None = None,
    name: str = REGISTRY_NAME,
    timeout: float = 20.0,
) -> TlsRegistry:
    """A TLS docker-registry on `storage_root` with `cert`; with `users`, token auth whose token
    service is an HTTPS TokenIssuer (same certificate) on its own port under `name`."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage_root.mkdir(parents=True, exist_ok=True)
    issuer: TokenIssuer | None = None
    if users is not None:
        issuer = TokenIssuer(
            workdir, users, service="tls-token-registry", issuer="tls-token-issuer", tls=cert.server_context()
        ).start()
        issuer.public_url = f"https://{name}:{issuer.port}"

    def make_config(port: int) -> dict[str, Any]:
        cfg = registry_config("token" if issuer is not None else "anonymous", port, storage_root, issuer=issuer)
        cfg["http"]["tls"] = {"certificate": str(cert.cert), "key": str(cert.key)}
        cfg["http"]["host"] = f"https://{name}:{port}"
        return cfg

    try:
        proc, port = launch_registry(
            f"tls-registry-{workdir.name}", workdir, workdir / "config.yml", make_config, timeout
        )
    except BaseException:
        if issuer is not None:
            issuer.stop()
        raise
    return TlsRegistry(proc, port, name, cert, issuer)


def push(layout: Path, src_tag: str, reg: TlsRegistry, repo: str, tag: str, ca_dir: Path) -> str:
    """`skopeo copy oci:LAYOUT:SRC_TAG docker://REG/REPO:TAG`, verifying the registry with `ca_dir`."""
    digestfile = ca_dir.parent / f"digest-{reg.port}-{tag}"
    auth_file = ca_dir.parent / "auth.json"
    auth_file.write_text("{}")
    argv = ["skopeo", "copy", "--quiet", "--dest-cert-dir", str(ca_dir), "--digestfile", str(digestfile)]
    argv += [f"oci:{layout}:{src_tag}", f"docker://{reg.netloc}/{repo}:{tag}"]
    run_checked(argv, timeout=60, env_extra={"REGISTRY_AUTH_FILE": str(auth_file)})
    return digestfile.read_text().strip()


def cert_dir(ca: Pki, directory: Path) -> Path:
    """A directory holding `ca.crt`, as skopeo's --*-cert-dir takes it."""
    return pki.cert_dir(ca.ca_cert, directory)


# --- a tiny HTTPS server for unit tests --------------------------------------------------------


class TlsHttpServer(HttpServer):
    """HTTPS on 127.0.0.1: `/v2/` answers `status` with `challenge`; `/token` a token. Records paths."""

    def __init__(self, cert: ServerCert, *, status: int = 200, challenge: str | None = None) -> None:
        super().__init__("tls-http", tls=cert.server_context())
        self.cert = cert
        self.status = status
        self.challenge = challenge
        self.paths: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler(self)


def _handler(srv: TlsHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            srv.paths.append(self.path)
            if self.path.startswith("/token"):
                body = json.dumps({"token": "tls-token", "expires_in": 300}).encode()
                status = 200
            else:
                body, status = b"{}", srv.status
            self.send_response(status)
            if srv.challenge and status == 401:
                self.send_header("WWW-Authenticate", srv.challenge)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
