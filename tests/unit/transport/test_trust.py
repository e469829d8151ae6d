"""Which CAs upstream connections trust (transport/trust.py), with handshakes against a real local TLS server."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest
from regproxy.transport import trust
from regproxy.transport.trust import DefaultStore, Trust, TrustError
from rig import badcerts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> badcerts.Pki:
    return badcerts.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> badcerts.Pki:
    return badcerts.make_pki(tmp_path_factory.mktemp("other-pki"), "another test CA")


def served(cert: badcerts.ServerCert) -> Iterator[badcerts.TlsHttpServer]:
    with badcerts.TlsHttpServer(cert) as server:
        yield server


@pytest.fixture(scope="module")
def good(pki: badcerts.Pki) -> Iterator[badcerts.TlsHttpServer]:
    yield from served(pki.good())


@pytest.fixture(scope="module")
def wrong_host(pki: badcerts.Pki) -> Iterator[badcerts.TlsHttpServer]:
    yield from served(pki.wrong_host())


@pytest.fixture(scope="module")
def expired(pki: badcerts.Pki) -> Iterator[badcerts.TlsHttpServer]:
    yield from served(pki.expired())


def with_ca(pki: badcerts.Pki) -> Trust:
    return Trust(True, str(pki.ca_cert), trust.read_ca_file(pki.ca_cert), trust.default_store())


def handshake(t: Trust, port: int, name: str = "localhost") -> str | None:
    """None when the handshake with trust `t` succeeds, else the failure reason transport/trust.py gives."""
    ctx = trust.ssl_context(t)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls_sock,
        ):
            tls_sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            tls_sock.recv(100)
    except (ssl.SSLError, OSError) as e:
        return trust.tls_failure(e) or f"not TLS: {e!r}"
    return None


# --- ca_file ---


def test_read_ca_file_keeps_only_certificates(pki: badcerts.Pki, other_pki: badcerts.Pki, tmp_path: Path) -> None:
    cert = pki.good()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        b"# a comment\n" + pki.ca_cert.read_bytes() + cert.key.read_bytes() + other_pki.ca_cert.read_bytes()
    )
    pem = trust.read_ca_file(bundle)
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert b"PRIVATE KEY" not in pem


def test_read_ca_file_missing(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="no such file"):
        trust.read_ca_file(tmp_path / "nope.pem")


def test_read_ca_file_directory(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="is a directory"):
        trust.read_ca_file(tmp_path)


def test_read_ca_file_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("x")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(TrustError, match="cannot read \\(Permission denied\\)"):
        trust.read_ca_file(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello", b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n", b"\x00\xff" * 100],
)
def test_read_ca_file_without_certificate(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    with pytest.raises(TrustError, match="no PEM certificate"):
        trust.read_ca_file(path)


def test_read_ca_file_malformed_certificate(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(TrustError, match="malformed"):
        trust.read_ca_file(path)


def test_read_ca_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * trust.MAX_CA_FILE)
    with pytest.raises(TrustError, match="larger than"):
        trust.read_ca_file(path)


# --- the default store ---


def test_default_store_is_the_systems_when_it_has_one() -> None:
    paths = ssl.get_default_verify_paths()
    if not os.path.isfile(paths.openssl_cafile):
        pytest.skip("this machine has no system CA store (ca-certificates)")
    store = trust.default_store({})
    assert store.source == "system"
    assert store.cafile == paths.openssl_cafile and store.capath == paths.openssl_capath
    assert store.stamp


def test_ssl_cert_file_and_dir_move_the_system_store(pki: badcerts.Pki, tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "x.pem").write_bytes(pki.ca_cert.read_bytes())
    store = trust.default_store({"SSL_CERT_FILE": str(pki.ca_cert), "SSL_CERT_DIR": str(tmp_path / "certs")})
    assert store == DefaultStore(str(pki.ca_cert), str(tmp_path / "certs"), "system", store.stamp)


@pytest.mark.parametrize("var", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_ssl_cert_variables_naming_nothing_are_refused(var: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for value in (str(tmp_path / "missing"), str(tmp_path / "empty")):
        with pytest.raises(TrustError, match=f"^{var}: "):
            trust.default_store({var: value})


def test_certifi_only_when_the_system_has_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ssl.get_default_verify_paths()
    (tmp_path / "certs").mkdir()  # an empty directory is no store (Debian without ca-certificates)
    fake = ssl.DefaultVerifyPaths(
        "",
        "",
        real.openssl_cafile_env,
        str(tmp_path / "cert.pem"),
        real.openssl_capath_env,
        str(tmp_path / "certs"),
    )
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: fake)
    assert trust.default_store({}) == DefaultStore(certifi.where(), None, "certifi")


def test_a_changed_store_is_another_store(tmp_path: Path, pki: badcerts.Pki) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes())
    before = trust.default_store({"SSL_CERT_FILE": str(bundle)})
    bundle.write_bytes(pki.ca_cert.read_bytes() * 2)
    os.utime(bundle, ns=(1, 1))
    assert trust.default_store({"SSL_CERT_FILE": str(bundle)}) != before


# --- handshakes (the token client's contexts) ---


def test_ca_file_is_trusted_in_addition_to_the_system_store(pki: badcerts.Pki, good: badcerts.TlsHttpServer) -> None:
    t = with_ca(pki)
    assert handshake(t, good.port) is None
    assert handshake(t, good.port, "127.0.0.1") is None  # an IP address is checked against IP SANs
    assert t.store is not None and t.store.source == "system"


def test_system_store_alone_does_not_know_a_private_ca(good: badcerts.TlsHttpServer) -> None:
    reason = handshake(Trust(store=trust.default_store()), good.port)
    assert reason is not None and reason.startswith("unknown CA (")


def test_another_ca_file_does_not_help(other_pki: badcerts.Pki, good: badcerts.TlsHttpServer) -> None:
    reason = handshake(with_ca(other_pki), good.port)
    assert reason is not None and reason.startswith("unknown CA (")


def test_host_name_mismatch(pki: badcerts.Pki, wrong_host: badcerts.TlsHttpServer) -> None:
    for name in ("localhost", "127.0.0.1"):
        reason = handshake(with_ca(pki), wrong_host.port, name)
        assert reason is not None and reason.startswith("host name mismatch ("), reason


def test_expired_certificate(pki: badcerts.Pki, expired: badcerts.TlsHttpServer) -> None:
    reason = handshake(with_ca(pki), expired.port)
    assert reason is not None and reason.startswith("expired certificate (")


def test_tls_verify_false_accepts_anything(wrong_host: badcerts.TlsHttpServer, expired: badcerts.TlsHttpServer) -> None:
    for server in (wrong_host, expired):
        assert handshake(Trust(False), server.port) is None


def test_verification_is_openssls_default_not_python_strict() -> None:
    """The same rules as mitmproxy's side (pyOpenSSL with OpenSSL's defaults), so both sides agree."""
    ctx = trust.ssl_context(Trust(store=trust.default_store()))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_contexts_are_shared_per_trust(pki: badcerts.Pki) -> None:
    assert trust.ssl_context(with_ca(pki)) is trust.ssl_context(with_ca(pki))
    assert trust.ssl_context(Trust(False)) is not trust.ssl_context(with_ca(pki))


# --- mitmproxy's CA locations ---


def test_openssl_locations_without_ca_file_bundle_the_store(tmp_path: Path) -> None:
    store = trust.default_store()
    assert store.cafile is not None
    cafile, capath = trust.openssl_locations(Trust(store=store), tmp_path)
    assert capath == store.capath
    assert cafile is not None and Path(cafile).read_bytes().rstrip(b"\n") == Path(store.cafile).read_bytes().rstrip(
        b"\n"
    )


def test_a_changed_system_store_is_a_new_bundle(pki: badcerts.Pki, other_pki: badcerts.Pki, tmp_path: Path) -> None:
    """mitmproxy caches a context per file name: after update-ca-certificates and a reload, a new name."""
    bundle = tmp_path / "system.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes())
    before = trust.openssl_locations(Trust(store=trust.default_store({"SSL_CERT_FILE": str(bundle)})), tmp_path)
    bundle.write_bytes(pki.ca_cert.read_bytes() + other_pki.ca_cert.read_bytes())
    os.utime(bundle, ns=(1, 1))
    after = trust.openssl_locations(Trust(store=trust.default_store({"SSL_CERT_FILE": str(bundle)})), tmp_path)
    assert before[0] != after[0]


def test_a_bundle_that_went_missing_is_written_again(pki: badcerts.Pki, tmp_path: Path) -> None:
    cafile, _ = trust.openssl_locations(with_ca(pki), tmp_path)
    assert cafile is not None
    Path(cafile).unlink()
    assert trust.openssl_locations(with_ca(pki), tmp_path)[0] == cafile and Path(cafile).exists()


def test_no_file_at_all_when_the_store_is_only_a_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "x").write_text("x")
    store = DefaultStore(None, str(tmp_path / "certs"), "system")
    assert trust.openssl_locations(Trust(store=store), tmp_path) == (None, str(tmp_path / "certs"))


def test_openssl_locations_bundle_the_store_and_the_ca_file(pki: badcerts.Pki, tmp_path: Path) -> None:
    t = with_ca(pki)
    assert t.store is not None and t.store.cafile is not None
    cafile, capath = trust.openssl_locations(t, tmp_path)
    assert capath == t.store.capath
    assert cafile is not None and Path(cafile).parent == tmp_path
    content = Path(cafile).read_bytes()
    assert content.startswith(Path(t.store.cafile).read_bytes().rstrip(b"\n"))
    assert content.endswith(t.ca_pem)
    # The same certificates from another path: the same bundle.
    copy = tmp_path / "copy.pem"
    copy.write_bytes(pki.ca_cert.read_bytes())
    again = Trust(True, str(copy), trust.read_ca_file(copy), t.store)
    assert trust.openssl_locations(again, tmp_path)[0] == cafile
    ssl.create_default_context(cafile=cafile)  # OpenSSL reads it


def test_openssl_locations_differ_per_ca_file(pki: badcerts.Pki, other_pki: badcerts.Pki, tmp_path: Path) -> None:
    a = trust.openssl_locations(with_ca(pki), tmp_path)[0]
    b = trust.openssl_locations(with_ca(other_pki), tmp_path)[0]
    assert a != b


# --- reasons ---


@pytest.mark.parametrize(
    ("code", "category"),
    [
        (20, "unknown CA"),
        (18, "unknown CA"),
        (19, "unknown CA"),
        (21, "unknown CA"),
        (2, "unknown CA"),
        (62, "host name mismatch"),
        (64, "host name mismatch"),
        (10, "expired certificate"),
        (9, "certificate not yet valid"),
        (26, "certificate refused"),
    ],
)
def test_verify_failure_categories(code: int, category: str) -> None:
    assert trust.verify_failure(code) == category
    assert trust.verify_failure(code, "some  text\nhere") == f"{category} (some text here)"
    assert trust.failure_category(trust.verify_failure(code, "x (y)")) == category


def test_tls_failure_follows_the_cause_chain() -> None:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_code = 10
    err.verify_message = "certificate has expired"
    try:
        try:
            raise err
        except ssl.SSLError as inner:
            raise ConnectionError("wrapped") from inner
    except ConnectionError as outer:
        assert trust.tls_failure(outer) == "expired certificate (certificate has expired)"


def test_tls_failure_is_none_for_other_errors() -> None:
    assert trust.tls_failure(ConnectionRefusedError(111, "refused")) is None


def test_tls_failure_for_a_non_certificate_tls_error() -> None:
    e = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    e.reason = "WRONG_VERSION_NUMBER"
    assert trust.tls_failure(e) == "TLS handshake failed (WRONG_VERSION_NUMBER)"


# --- Trust ---


def test_trust_describes_itself_without_certificates(pki: badcerts.Pki) -> None:
    t = with_ca(pki)
    assert t.describe() == f"system store + {pki.ca_cert}"
    assert Trust(False).describe() == "no verification (tls_verify: false)"
    assert "BEGIN" not in repr(t)


def test_same_as_compares_certificates_not_paths(pki: badcerts.Pki, other_pki: badcerts.Pki) -> None:
    t = with_ca(pki)
    moved = Trust(True, "/elsewhere/ca.pem", t.ca_pem, t.store)
    assert t.same_as(moved)
    assert not t.same_as(with_ca(other_pki))
    assert not t.same_as(Trust(False))
    assert Trust(False).same_as(Trust(False, store=t.store))
