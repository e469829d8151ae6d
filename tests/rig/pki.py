"""The rig's one test PKI builder: a private CA (EC P-256) and the server certificates it issues.

Certificates satisfy Python 3.13's strict checks, so a TLS failure in a test is always the one the
test made: the CA has `basicConstraints` critical `CA:TRUE` (path length 0), critical `keyUsage`
keyCertSign + cRLSign + digitalSignature, and a subject key identifier; a server certificate has a
subjectAltName (IP addresses as IP entries, the rest as DNS names), critical `CA:FALSE`,
extendedKeyUsage serverAuth and an authority key identifier.

tls.py (`make_ca`: one CA, one server certificate, mitmproxy's `certs=` file) and badcerts.py
(`make_pki`: a CA that issues right, wrong-name and expired certificates) are both built on it.
Also here: the server-side SSL context the rig's servers present, and the `ca.crt` directory
skopeo/podman (`--cert-dir`) and dockerd (`certs.d`) take.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
PEM = serialization.Encoding.PEM


def alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltName entries: an IP entry for what parses as an address, a DNS name for the rest."""
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class CertificateAuthority(Issued):
    """A self-signed test CA that issues server certificates."""

    def issue(
        self,
        names: Sequence[str],
        *,
        not_before: datetime.timedelta = datetime.timedelta(hours=-1),
        not_after: datetime.timedelta = datetime.timedelta(days=2),
    ) -> Issued:
        """A server certificate for `names` (the first is also its common name), valid from
        now+not_before to now+not_after (negative values: in the past)."""
        if not names:
            raise ValueError("a server certificate needs at least one name")
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + not_before)
            .not_valid_after(now + not_after)
            .add_extension(x509.SubjectAlternativeName(alt_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert, key)


def new_ca(
    name: str,
    *,
    not_before: datetime.timedelta = datetime.timedelta(hours=-1),
    not_after: datetime.timedelta = datetime.timedelta(days=2),
) -> CertificateAuthority:
    """A fresh CA called `name`, valid from now+not_before to now+not_after."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before)
        .not_valid_after(now + not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def write_private(path: Path, data: bytes) -> Path:
    """Write a file holding a private key: mode 0600 before any byte of it is there."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)
    return path


def server_context(cert_chain: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server-side context presenting `cert_chain` (with `key`, or the key inside it), ALPN
    http/1.1 only (the rig's servers speak HTTP/1.1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_chain), str(key) if key is not None else None)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def cert_dir(ca_cert: Path, directory: Path) -> Path:
    """`directory` holding only `ca.crt`, a copy of `ca_cert`: what skopeo/podman `--cert-dir` and a
    dockerd `certs.d/HOST` directory take."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_cert, directory / "ca.crt")
    return directory


__all__ = [
    "LOOPBACK_NAMES",
    "CertificateAuthority",
    "Issued",
    "alt_names",
    "cert_dir",
    "new_ca",
    "server_context",
    "write_private",
]
