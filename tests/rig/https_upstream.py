"""HTTPS upstreams that look like production: TLS from a test CA, the token service and the blob store
on servers of their own, and optionally distance (a delay relay in front of each server).

Four kinds (`HTTPS_KINDS`), the HTTPS counterparts of registry.KINDS:
- "https-anon": anonymous registry;
- "https-basic": htpasswd Basic;
- "https-token": token auth; the token service is its own HTTPS server under the registry's host name:
  registry `https://localhost:P1`, realm `https://localhost:P2/token` (the proxy sends credentials to a
  loopback realm only on the upstream's own host name);
- "https-redirect": token auth, and blob GET/HEAD answered with 307 to an HTTPS blob store under the
  OTHER name, `https://127.0.0.1:P3/…`, which refuses requests carrying Authorization (as S3 does).

How one upstream is put together (every server binds 127.0.0.1 on a kernel-chosen port):

    client -> [delay relay "registry"] -> TLS front -> RequestTap -> docker-registry (plain HTTP)
    client -> [delay relay "token"]    -> TokenIssuer (HTTPS)
    client -> [delay relay "blobs"]    -> BlobServer (HTTPS)

The TLS front is an in-process Relay that terminates TLS (the test CA's server certificate for
127.0.0.1 and localhost, ALPN http/1.1 only: the upstream speaks HTTP/1.1) so that the RequestTap still
sees every request head (`access_log()`); the registry is told its public URL (`http.host`), so the
absolute URLs it writes (upload Locations) are https ones on the public port. The delay relays exist
when the upstream is started with `delay` (0.0 gives relays that only count connections); their ports
are bound first, so the registry's configuration names the relayed realm and blob-store base URL.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import daemons, pki, tls
from .blobserver import BlobServer
from .procs import LOOPBACK, RigError
from .registry import (
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    Upstream,
    launch_registry,
    make_htpasswd,
    registry_config,
)
from .relay import Relay
from .tap import RequestTap
from .token_issuer import TokenIssuer

HTTPS_KINDS = ("https-anon", "https-basic", "https-token", "https-redirect")
# The plain-HTTP kind (registry.KINDS) each HTTPS kind mirrors.
BASE_KIND = {"https-anon": "anonymous", "https-basic": "basic", "https-token": "token", "https-redirect": "redirect"}
REGISTRY_NAME = "localhost"  # the registry and its token service
BLOBS_NAME = LOOPBACK  # the blob store: the other name
RELAY_NAMES = ("registry", "token", "blobs")


def server_context(ca: tls.TestCA) -> ssl.SSLContext:
    """A server-side context presenting `ca`'s server certificate, ALPN http/1.1 only."""
    return pki.server_context(ca.server_pem)


def client_context(ca: tls.TestCA | Path) -> ssl.SSLContext:
    """A client-side context trusting only the test CA (strict checks as Python 3.13 has them)."""
    cafile = ca.ca_cert if isinstance(ca, tls.TestCA) else ca
    return ssl.create_default_context(cafile=str(cafile))


def cert_dir_for(ca: tls.TestCA, directory: Path) -> Path:
    """A directory holding only `ca.crt` (skopeo/podman `--src-cert-dir`/`--cert-dir`)."""
    return pki.cert_dir(ca.ca_cert, directory)


@dataclass
class HttpsUpstream(Upstream):
    """An Upstream (same logs and helpers) reached over HTTPS; `url`/`host` are what the proxy's
    `registry:` and clients use (`https://localhost:P1`; P1 is the registry relay's port when there
    are relays)."""

    ca: tls.TestCA | None = None
    cert_dir: Path | None = None  # holds only ca.crt
    front: Relay | None = None  # the TLS front before the tap
    relays: dict[str, Relay] = field(default_factory=dict)  # "registry", "token", "blobs" (as present)

    @property
    def registry_url(self) -> str:
        return self.url

    @property
    def direct_url(self) -> str:
        """The TLS front's URL: the registry without its delay relay (the realm still is relayed)."""
        assert self.front is not None
        return f"https://{REGISTRY_NAME}:{self.front.port}"

    @property
    def token_realm(self) -> str | None:
        return self.token_issuer.realm if self.token_issuer is not None else None

    @property
    def blobs_url(self) -> str | None:
        """The blob store's base URL as the registry redirects to it ("https-redirect" only)."""
        return self.blob_server.url if self.blob_server is not None else None

    # -- distance and connections -------------------------------------------------------------
    def _need_relays(self) -> dict[str, Relay]:
        if not self.relays:
            raise RigError(f"{self.kind} upstream was started without relays (delay=None)")
        return self.relays

    @property
    def delay(self) -> float:
        return self._need_relays()["registry"].delay

    def set_delay(self, delay: float) -> None:
        """One-way delay D (seconds) for every relay of this upstream (a round trip is 2*D)."""
        for r in self._need_relays().values():
            r.set_delay(delay)

    @contextmanager
    def delayed(self, delay: float) -> Iterator[HttpsUpstream]:
        """`set_delay(delay)` for the block, the previous delay afterwards."""
        before = self.delay
        self.set_delay(delay)
        try:
            yield self
        finally:
            self.set_delay(before)

    def connections(self) -> dict[str, int]:
        """Connections each relay accepted since the last reset: {"registry": n, "token": n, "blobs": n}
        (token/blobs only for the kinds that have those servers)."""
        return {name: r.connections() for name, r in self._need_relays().items()}

    def bytes_down(self) -> dict[str, int]:
        """Bytes each relay carried from its server towards clients since it started (monotonic; the TLS
        bytes on the wire, what crossed the "WAN")."""
        return {name: r.bytes_down() for name, r in self._need_relays().items()}

    def reset_connections(self) -> dict[str, int]:
        """Reset every relay's counter; returns the counts before."""
        return {name: r.reset_connections() for name, r in self._need_relays().items()}

    def clear_logs(self) -> None:
        """Forget the access log, the token and blob requests, and the connection counts."""
        self.clear_access_log()
        if self.token_issuer is not None:
            self.token_issuer.clear()
        if self.blob_server is not None:
            self.blob_server.clear()
        for r in self.relays.values():
            r.reset_connections()
        if self.front is not None:
            self.front.reset_connections()

    # -- client helpers -----------------------------------------------------------------------
    def ctr_hosts_dir(self, directory: Path) -> Path:
        """A ctr `--hosts-dir` naming this upstream https with the test CA."""
        return daemons.ctr_hosts_dir(directory, self.host, ca=self.ca_cert)

    def stop(self) -> None:
        if self._stopped:
            return
        try:
            for r in self.relays.values():
                r.stop()
            if self.front is not None:
                self.front.stop()
        finally:
            super().stop()


@dataclass
class HttpsRig:
    """The HTTPS upstreams, one per kind, with the standard test images (the `https_rig` fixture)."""

    upstreams: dict[str, HttpsUpstream]
    digests: dict[str, dict[tuple[str, str], str]]  # kind -> {(name, tag): digest}, as standard.populate
    ca: tls.TestCA  # the upstreams' CA

    def __getitem__(self, kind: str) -> HttpsUpstream:
        return self.upstreams[kind]


def start_https_upstream(
    kind: str,
    workdir: Path,
    delay: float | None = None,
    *,
    ca: tls.TestCA | None = None,
    username: str = DEFAULT_USER,
    password: str = DEFAULT_PASSWORD,
    public_repos: Collection[str] = (),
    public_prefixes: Collection[str] = (),
    token_expires_in: int = 300,
    timeout: float = 20.0,
) -> HttpsUpstream:
    """Start one HTTPS upstream of `kind` (see HTTPS_KINDS) with its files under `workdir`.

    `ca`: the test CA to use (a new one under workdir/ca when None). `delay`: None for no relays;
    else a delay relay (one-way delay `delay` s, changeable with `set_delay`) in front of each server.
    """
    if kind not in BASE_KIND:
        raise ValueError(f"unknown https upstream kind {kind!r}; one of {HTTPS_KINDS}")
    base = BASE_KIND[kind]
    workdir.mkdir(parents=True, exist_ok=True)
    storage_root = workdir / "storage"
    storage_root.mkdir(exist_ok=True)
    if ca is None:
        ca = tls.make_ca(workdir / "ca")
    cert_dir = cert_dir_for(ca, workdir / "certs")
    server_tls = server_context(ca)
    users = {username: password}
    has_creds = base != "anonymous"

    relays: dict[str, Relay] = {}
    started: list[Any] = []  # things to stop if anything fails (Relay, TokenIssuer, BlobServer, ...)

    def relay_for(name: str) -> Relay | None:
        if delay is None:
            return None
        r = Relay(delay=delay, name=f"{kind}-{name}")
        relays[name] = r
        started.append(r)
        return r

    try:
        registry_relay = relay_for("registry")
        front = Relay(name=f"{kind}-tls", server_tls=server_tls)
        started.append(front)
        public_port = registry_relay.port if registry_relay is not None else front.port
        public_host = f"{REGISTRY_NAME}:{public_port}"

        htpasswd: Path | None = None
        if base == "basic":
            htpasswd = workdir / "htpasswd"
            make_htpasswd(htpasswd, users)

        issuer: TokenIssuer | None = None
        if base in ("token", "redirect"):
            issuer = TokenIssuer(
                workdir,
                users,
                service=f"rig-{kind}-registry",
                issuer=f"rig-{kind}-issuer",
                public_repos=public_repos,
                public_prefixes=public_prefixes,
                expires_in=token_expires_in,
                tls=server_tls,
            ).start()
            started.append(issuer)
            token_relay = relay_for("token")
            port = issuer.port if token_relay is None else token_relay.start((LOOPBACK, issuer.port)).port
            issuer.public_url = f"https://{REGISTRY_NAME}:{port}"

        blobs: BlobServer | None = None
        if base == "redirect":
            blobs = BlobServer(storage_root, tls=server_tls).start()
            started.append(blobs)
            blobs_relay = relay_for("blobs")
            port = blobs.port if blobs_relay is None else blobs_relay.start((LOOPBACK, blobs.port)).port
            blobs.public_url = f"https://{BLOBS_NAME}:{port}/"

        def make_config(port: int) -> dict[str, Any]:
            cfg = registry_config(base, port, storage_root, htpasswd=htpasswd, issuer=issuer, blob_server=blobs)
            cfg["http"]["host"] = f"https://{public_host}"
            return cfg

        proc, registry_port = launch_registry(f"registry-{kind}", workdir, workdir / "config.yml", make_config, timeout)
        started.append(proc)
        tap = RequestTap(registry_port)
        started.append(tap)
        front.start((LOOPBACK, tap.port))
        if registry_relay is not None:
            registry_relay.start((LOOPBACK, front.port))
    except BaseException:
        for thing in reversed(started):
            thing.stop()
        raise
    return HttpsUpstream(
        kind=kind,
        host=public_host,
        url=f"https://{public_host}",
        username=username if has_creds else None,
        password=password if has_creds else None,
        storage_root=storage_root,
        config_path=workdir / "config.yml",
        registry_port=registry_port,
        proc=proc,
        tap=tap,
        token_issuer=issuer,
        blob_server=blobs,
        ca_cert=ca.ca_cert,
        ca=ca,
        cert_dir=cert_dir,
        front=front,
        relays=relays,
    )


__all__ = [
    "BASE_KIND",
    "HTTPS_KINDS",
    "HttpsRig",
    "HttpsUpstream",
    "cert_dir_for",
    "client_context",
    "server_context",
    "start_https_upstream",
]
