"""A throwaway certificate authority for TLS tests: a CA and a server certificate for loopback.

`make_ca(dir)` writes (the certificates come from pki.py, the rig's one PKI builder):
- `ca.crt`: the CA certificate (PEM), what clients are told to trust;
- `server.pem`: the server certificate for 127.0.0.1, ::1 and localhost, then the CA
  certificate, then the server's private key: the file mitmproxy's `--set certs=*=FILE` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import pki


@dataclass(frozen=True)
class TestCA:
    __test__ = False  # not a pytest test class

    dir: Path
    ca_cert: Path
    server_pem: Path

    def certs_option(self) -> list[str]:
        """mitmdump arguments that make the proxy present the server certificate."""
        return ["--set", f"certs=*={self.server_pem}"]


def make_ca(directory: Path, hosts: tuple[str, ...] = pki.LOOPBACK_NAMES) -> TestCA:
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.new_ca("registryproxy test CA")
    server = ca.issue(hosts)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.cert_pem())
    server_path = pki.write_private(directory / "server.pem", server.cert_pem() + ca.cert_pem() + server.key_pem())
    return TestCA(directory, ca_path, server_path)
