"""An HTTPS token-auth upstream at a test namespace's `remote` address (rig/netns.py): production-like
for egress tests, where loopback would never go through a forward proxy.

It serves what an `https_rig` token upstream ("https-token") already holds, with that upstream's own
token service, so nothing is pushed again:

    https://REGISTRY:P1  Relay in the namespace (TLS, REMOTE's certificate) -> RequestTap -> docker-registry
    https://REALM:P2     Relay in the namespace (TLS, REMOTE's certificate) -> the source's TokenIssuer (TLS)

REGISTRY and REALM are REMOTE (the address) unless host names are given, which the namespace resolves
to REMOTE (`Netns.create(hostnames=...)`): a registry and a token service on hosts of their own, as
registry-1.docker.io and auth.docker.io, that only the forward proxy can find.

The registry is a second `docker-registry` over the source's storage (pulls only read it), whose
challenge names the realm `https://REALM:P2/token` (on a private address the proxy sends the mapping's
credentials only to a realm on the registry's own host, so REALM is REGISTRY unless both are names).
Both relays count the connections they accept; `ca` signs REMOTE's certificate (the address and the
names; the proxy's `ca_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import https_upstream, tls
from .https_upstream import HttpsUpstream
from .netns import Netns
from .procs import LOOPBACK, Proc
from .registry import launch_registry, registry_config
from .relay import Relay
from .tap import AccessLogEntry, RequestTap


@dataclass
class RemoteUpstream:
    source: HttpsUpstream
    ca: tls.TestCA
    registry: Relay  # REGISTRY:P1
    token: Relay  # REALM:P2
    proc: Proc
    tap: RequestTap
    registry_netloc: str  # "REGISTRY:P1", as the proxy's `registry:` and CONNECT lines name it
    realm_netloc: str  # "REALM:P2"

    @property
    def url(self) -> str:
        return f"https://{self.registry_netloc}"

    @property
    def realm(self) -> str:
        return f"https://{self.realm_netloc}/token"

    def connections(self) -> dict[str, int]:
        """Connections accepted since the last `clear()`: {"registry": n, "token": n}."""
        return {"registry": self.registry.connections(), "token": self.token.connections()}

    def access_log(self) -> list[AccessLogEntry]:
        return self.tap.entries()

    def clear(self) -> None:
        self.registry.reset_connections()
        self.token.reset_connections()
        self.tap.clear()

    def stop(self) -> None:
        """The registry and its tap (the relays belong to the namespace, which stops them)."""
        self.tap.stop()
        self.proc.stop()


def start_remote_upstream(
    net: Netns, source: HttpsUpstream, workdir: Path, *, registry_host: str | None = None, realm_host: str | None = None
) -> RemoteUpstream:
    issuer = source.token_issuer
    if issuer is None or source.ca is None:
        raise ValueError(f"{source.kind}: a remote upstream needs an https upstream with a token service")
    workdir.mkdir(parents=True, exist_ok=True)
    registry_host = registry_host or net.remote
    realm_host = realm_host or registry_host
    ca = tls.make_ca(workdir / "ca", hosts=tuple(dict.fromkeys((net.remote, registry_host, realm_host))))
    front = https_upstream.server_context(ca)
    registry = net.relay("remote-registry", server_tls=front)
    token = net.relay(
        "remote-token",
        server_tls=front,
        client_tls=https_upstream.client_context(source.ca),
        server_hostname="localhost",
    )

    def make_config(port: int) -> dict[str, Any]:
        cfg = registry_config("token", port, source.storage_root, issuer=issuer)
        cfg["auth"]["token"]["realm"] = f"https://{realm_host}:{token.port}/token"
        cfg["http"]["host"] = f"https://{registry_host}:{registry.port}"
        return cfg

    proc, port = launch_registry("registry-remote", workdir, workdir / "config.yml", make_config)
    try:
        tap = RequestTap(port)
    except BaseException:
        proc.stop()
        raise
    netlocs = (f"{registry_host}:{registry.port}", f"{realm_host}:{token.port}")
    remote = RemoteUpstream(source, ca, registry, token, proc, tap, *netlocs)
    try:
        registry.start((LOOPBACK, tap.port))
        token.start((LOOPBACK, issuer.port))
    except BaseException:
        remote.stop()
        raise
    return remote


__all__ = ["RemoteUpstream", "start_remote_upstream"]
