"""Which certificate authorities the proxy trusts on its connections to upstreams.

Every connection the proxy makes on a mapping's behalf is verified the same way: mitmproxy's
connection to the registry (`steps/upstream_tls.py`) and the token client's connections to the registry
and its token realm (`upstream/client.py`). A mapping's `Trust` says how:

- the **default store**, plus the certificates of the mapping's `ca_file` (or the top-level one)
  in addition to it; or
- nothing at all, with `tls_verify: false` (labs only; the proxy warns about it at start-up).

The default store is the **system store**: OpenSSL's default verify paths, which is what
`update-ca-certificates` (Debian, Ubuntu, Alpine), `update-ca-trust` (Fedora, RHEL) and a
container image's `ca-certificates` package manage, and what curl, git and the docker and
containerd daemons on the same machine trust. `SSL_CERT_FILE` and `SSL_CERT_DIR` move it, as they
do for OpenSSL itself. So a CA installed the usual way for the platform is trusted by the proxy
too, and an operator removes a CA in one place. certifi's bundle (Mozilla's list, shipped with the
Python packages; what mitmproxy and httpx trust by default) is used only when the system has no
store at all (a bare container without `ca-certificates`), so that public registries still work.
The store is read when the configuration is loaded: after `update-ca-certificates`, reload
(SIGHUP) or restart.

Verification is OpenSSL's default on both sides (the chain must end at a trusted certificate; the
host name, validity dates and purpose are checked), as with curl and mitmproxy. Python 3.13's
stricter `create_default_context` flags (`VERIFY_X509_STRICT`, `VERIFY_X509_PARTIAL_CHAIN`) are
not used for the token client, so that the same certificate is never accepted by one side of the
proxy and refused by the other.

No mitmproxy import: `steps/upstream_tls.py` turns a `Trust` into mitmproxy's TLS settings.
"""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import certifi
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

# OpenSSL's X509_V_ERR_* codes (include/openssl/x509_vfy.h), grouped by what an operator does about them.
UNKNOWN_CA_CODES = frozenset(
    {
        2,  # unable to get issuer certificate
        18,  # self-signed certificate
        19,  # self-signed certificate in certificate chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
        24,  # invalid CA certificate
        27,  # certificate not trusted
    }
)
EXPIRED_CODES = frozenset({10})  # certificate has expired
NOT_YET_VALID_CODES = frozenset({9})  # certificate is not yet valid
HOST_MISMATCH_CODES = frozenset({62, 64})  # hostname mismatch, IP address mismatch

MAX_CA_FILE = 4 * 1024 * 1024


class TrustError(ValueError):
    """A trust setting that cannot work, as a short reason (the caller names the key)."""


@dataclass(frozen=True)
class DefaultStore:
    """The store every mapping trusts (plus its ca_file): the system's, or certifi's when it has none."""

    cafile: str | None
    capath: str | None
    source: Literal["system", "certifi"]
    # When the store's files last changed: a store rewritten by update-ca-certificates is another store.
    stamp: tuple[int, ...] = ()

    def describe(self) -> str:
        where = ", ".join(p for p in (self.cafile, self.capath) if p)
        return f"{self.source} store ({where})"


@dataclass(frozen=True)
class Trust:
    """How the proxy verifies one mapping's upstream (and its token realm)."""

    verify: bool = True
    ca_file: str | None = None  # the file the certificates came from (for messages)
    # The certificates of `ca_file` (PEM), read when the configuration was loaded.
    ca_pem: bytes = field(default=b"", repr=False)
    store: DefaultStore | None = None  # None: the default store, found when first needed

    def describe(self) -> str:
        if not self.verify:
            return "no verification (tls_verify: false)"
        store = self.store.source if self.store else "system"
        return f"{store} store + {self.ca_file}" if self.ca_file else f"{store} store"

    def same_as(self, other: Trust) -> bool:
        """Whether both trust exactly the same certificates (wherever their files are)."""
        return self.verify == other.verify and (not self.verify or self.ca_pem == other.ca_pem)


def read_ca_file(path: str | os.PathLike[str]) -> bytes:
    """The certificates of a PEM bundle, re-encoded (anything else in the file is left out).

    Raises TrustError when the file is missing, unreadable, not PEM or holds no certificate.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CA_FILE + 1)
    except FileNotFoundError:
        raise TrustError(f"{os.fspath(path)}: no such file") from None
    except IsADirectoryError:
        raise TrustError(f"{os.fspath(path)}: is a directory, not a PEM file") from None
    except OSError as e:
        raise TrustError(f"{os.fspath(path)}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_CA_FILE:
        raise TrustError(f"{os.fspath(path)}: larger than {MAX_CA_FILE // (1024 * 1024)} MiB, not a CA bundle")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TrustError(f"{os.fspath(path)}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TrustError(f"{os.fspath(path)}: a PEM certificate in it is malformed") from None
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def default_store(environ: Mapping[str, str] | None = None) -> DefaultStore:
    """The system store (OpenSSL's default paths, moved by SSL_CERT_FILE / SSL_CERT_DIR), else certifi.

    Raises TrustError when SSL_CERT_FILE or SSL_CERT_DIR is set but names nothing usable: an
    explicit setting that silently did nothing would leave the operator's CA untrusted.
    """
    env = os.environ if environ is None else environ
    paths = ssl.get_default_verify_paths()
    file_env, dir_env = paths.openssl_cafile_env, paths.openssl_capath_env
    cafile = env.get(file_env) or paths.openssl_cafile
    capath = env.get(dir_env) or paths.openssl_capath
    file_ok = _usable_file(cafile)
    dirs_ok = [d for d in capath.split(os.pathsep) if _usable_dir(d)] if capath else []
    if env.get(file_env) and not file_ok:
        raise TrustError(f"{file_env}: {env[file_env]} is not a readable, non-empty file")
    if env.get(dir_env) and not dirs_ok:
        raise TrustError(f"{dir_env}: {env[dir_env]} names no directory with certificates")
    stamp: list[int] = []
    for p in ([cafile] if file_ok else []) + dirs_ok:
        try:
            st = os.stat(p)
        except OSError:
            continue
        stamp += [st.st_mtime_ns, st.st_size]
    if file_ok or dirs_ok:
        return DefaultStore(cafile if file_ok else None, capath if dirs_ok else None, "system", tuple(stamp))
    return DefaultStore(certifi.where(), None, "certifi")


def _usable_file(path: str | None) -> bool:
    if not path:
        return False
    try:
        return os.path.isfile(path) and os.path.getsize(path) > 0 and os.access(path, os.R_OK)
    except OSError:
        return False


def _usable_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and any(True for _ in os.scandir(path))
    except OSError:
        return False


def _store(trust: Trust) -> DefaultStore:
    return trust.store if trust.store is not None else default_store()


@functools.lru_cache(maxsize=64)
def ssl_context(trust: Trust) -> ssl.SSLContext:
    """A client-side ssl.SSLContext for the token client (httpx): the default store plus ca_file.

    Host names are checked; with `tls_verify: false` nothing is. Contexts are shared per trust.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not trust.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    store = _store(trust)
    ctx.load_verify_locations(cafile=store.cafile, capath=store.capath)
    if trust.ca_pem:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
    return ctx


def openssl_locations(trust: Trust, directory: Path) -> tuple[str | None, str | None]:
    """(CA file, CA directory) for OpenSSL's `load_verify_locations`, as mitmproxy takes them.

    OpenSSL takes one file and one directory: the file is a bundle of the default store's file and
    the ca_file's certificates, written into `directory` under a name that is its content's digest.
    mitmproxy caches a context per file name, so a changed ca_file or system store (after a reload)
    is a new file and a new context, never a stale one. A bundle that went missing is written again.
    """
    name, content = _bundle(trust)
    capath = _store(trust).capath
    if name is None:
        return None, capath
    path = directory / name
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    return str(path), capath


@functools.lru_cache(maxsize=64)
def _bundle(trust: Trust) -> tuple[str | None, bytes]:
    store = _store(trust)
    base = Path(store.cafile).read_bytes() if store.cafile else b""
    if base and not base.endswith(b"\n"):
        base += b"\n"
    content = base + trust.ca_pem
    if not content:
        return None, b""
    return f"trust-{hashlib.sha256(content).hexdigest()[:32]}.pem", content


def verify_failure(code: int, text: str = "") -> str:
    """What a certificate verification failure means to an operator: a category, then OpenSSL's words."""
    if code in UNKNOWN_CA_CODES:
        category = "unknown CA"
    elif code in HOST_MISMATCH_CODES:
        category = "host name mismatch"
    elif code in EXPIRED_CODES:
        category = "expired certificate"
    elif code in NOT_YET_VALID_CODES:
        category = "certificate not yet valid"
    else:
        category = "certificate refused"
    return f"{category} ({_one_line(text)})" if text else category


def failure_category(reason: str) -> str:
    """The category alone (what `verify_failure` put before the parenthesis)."""
    return reason.split(" (", 1)[0]


def tls_failure(exc: BaseException) -> str | None:
    """The TLS reason behind an exception (httpx wraps ssl's own), or None when it is not TLS."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return verify_failure(e.verify_code, e.verify_message or "")
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed ({_one_line(e.reason or type(e).__name__)})"
        e = e.__cause__ or e.__context__
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
