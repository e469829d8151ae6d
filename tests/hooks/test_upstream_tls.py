"""mitmproxy's TLS to mapped upstreams (steps/upstream_tls.py): which connection it builds, in-memory handshakes
against servers with good and bad certificates, and what it logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import connection, options
from mitmproxy.addonmanager import traverse
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import TlsData
from OpenSSL import SSL
from regproxy import chain
from regproxy.config import Config, parse
from regproxy.run import serve
from regproxy.steps.upstream_tls import UpstreamTls, targets
from regproxy.transport import trust as trust_module
from rig import badcerts

KEY = "00" * 32
PORT = 5443


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> badcerts.Pki:
    return badcerts.make_pki(tmp_path_factory.mktemp("pki"))


def config(proxies: dict[str, dict[str, Any]], **top: Any) -> Config:
    return parse({"secretkey": KEY, "proxies": proxies, **top}, {})


def one(pki: badcerts.Pki | None, host: str = "localhost", **extra: Any) -> Config:
    mapping: dict[str, Any] = {
        "registry": f"https://{host}:{PORT}",
        "remote": "org",
        "auth": "Basic dTpzM2NyZXQ=",
        **extra,
    }
    if pki is not None:
        mapping["ca_file"] = str(pki.ca_cert)
    return config({"tls/": mapping})


class Holder:
    """What `Configuration.state.config` is in the chain: replaced on reload."""

    def __init__(self, cfg: Config | None) -> None:
        self.config = cfg

    def __call__(self) -> Config | None:
        return self.config


@pytest.fixture
def setup() -> Iterator[tuple[UpstreamTls, Holder, taddons.context]]:
    holder = Holder(None)
    addon = UpstreamTls(holder)
    with taddons.context(addon, TlsConfig()) as tctx:
        yield addon, holder, tctx
    addon.done()


def tls_start(
    tctx: taddons.context, host: str = "localhost", port: int = PORT, client_alpn: tuple[bytes, ...] = ()
) -> TlsData:
    """What mitmproxy's HTTP layer hands `tls_start_server` for an upstream connection in reverse mode."""
    client = tflow.tclient_conn()
    client.alpn_offers = client_alpn
    ctxt = context.Context(client, tctx.options)
    server = connection.Server(address=(host, port))
    server.sni = host
    ctxt.server = server
    return TlsData(server, ctxt)


def handshake(client: SSL.Connection, cert: badcerts.ServerCert) -> str | None:
    """Drive both ends in memory; None when the client completed the handshake, else its error."""
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate_file(str(cert.cert))
    sctx.use_privatekey_file(str(cert.key))
    server = SSL.Connection(sctx)
    server.set_accept_state()
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, a, b in (("client", client, server), ("server", server, client)):
            if not done[name]:
                try:
                    a.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    if name == "client":
                        return repr(e)
                    done[name] = True  # the server failed: the client's alert says why
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done["client"] and done["server"]:
            return None
    return "handshake did not finish"


def tls_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "upstream TLS" in r.getMessage()]


# --- which connection ---


def test_mapped_upstream_gets_the_mappings_trust_and_tlsconfig_leaves_it(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    data = tls_start(tctx)
    addon.tls_start_server(data)
    ours = data.ssl_conn
    assert ours is not None
    assert ours.get_context().get_verify_mode() == SSL.VERIFY_PEER
    assert ours.get_servername() == b"localhost"
    TlsConfig().tls_start_server(data)  # returns at once: `if tls_start.ssl_conn is not None: return`
    assert data.ssl_conn is ours


def test_other_hosts_are_left_to_tlsconfig(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    for host, port in (("other.example", PORT), ("localhost", PORT + 1), ("127.0.0.1", PORT)):
        data = tls_start(tctx, host, port)
        addon.tls_start_server(data)
        assert data.ssl_conn is None


def test_no_configuration_leaves_everything_to_tlsconfig(setup: tuple[UpstreamTls, Holder, taddons.context]) -> None:
    addon, _, tctx = setup
    data = tls_start(tctx)
    addon.tls_start_server(data)
    assert data.ssl_conn is None


def test_a_connection_set_by_an_earlier_addon_is_kept(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    data = tls_start(tctx)
    theirs = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    data.ssl_conn = theirs
    addon.tls_start_server(data)
    assert data.ssl_conn is theirs


def test_tls_verify_false_does_not_verify(setup: tuple[UpstreamTls, Holder, taddons.context]) -> None:
    addon, holder, tctx = setup
    holder.config = one(None, tls_verify=False)
    data = tls_start(tctx)
    addon.tls_start_server(data)
    assert data.ssl_conn is not None and data.ssl_conn.get_context().get_verify_mode() == SSL.VERIFY_NONE
    assert data.ssl_conn.get_servername() == b"localhost"  # SNI is still sent


def test_sni_is_the_configured_upstream_and_never_for_an_address(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki, host="127.0.0.1")
    data = tls_start(tctx, "127.0.0.1")
    assert isinstance(data.conn, connection.Server)
    data.conn.sni = "client-supplied.example"
    addon.tls_start_server(data)
    assert data.ssl_conn is not None and data.ssl_conn.get_servername() is None
    assert data.conn.sni == "127.0.0.1"


@pytest.mark.parametrize(
    ("client_alpn", "http2", "offered"),
    [
        ((b"h2", b"http/1.1"), True, (b"h2", b"http/1.1")),
        ((b"h2", b"http/1.1"), False, (b"http/1.1",)),
        ((), True, ()),
    ],
)
def test_alpn_as_tlsconfig_offers_it(
    setup: tuple[UpstreamTls, Holder, taddons.context],
    pki: badcerts.Pki,
    client_alpn: tuple[bytes, ...],
    http2: bool,
    offered: tuple[bytes, ...],
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    tctx.options.http2 = http2
    ours, theirs = tls_start(tctx, client_alpn=client_alpn), tls_start(tctx, client_alpn=client_alpn)
    addon.tls_start_server(ours)
    TlsConfig().tls_start_server(theirs)
    assert isinstance(ours.conn, connection.Server) and isinstance(theirs.conn, connection.Server)
    assert tuple(ours.conn.alpn_offers) == tuple(theirs.conn.alpn_offers) == offered


def test_targets_name_every_mapping_of_an_upstream(pki: badcerts.Pki) -> None:
    up = {"registry": f"https://LocalHost:{PORT}", "remote": "o", "ca_file": str(pki.ca_cert)}
    cfg = config({"a/": up, "b/": {**up, "remote": "p"}, "c/": {"registry": "http://localhost:80", "remote": "q"}})
    (target,) = targets(cfg).values()
    assert target.labels == ("a/", "b/") and target.netloc == f"localhost:{PORT}"
    assert set(targets(cfg)) == {("localhost", PORT)}


# --- real handshakes: what is accepted, what is refused, and the one log line ---


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_private_ca_is_trusted_with_ca_file(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki, host: str
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki, host=host)
    data = tls_start(tctx, host)
    addon.tls_start_server(data)
    assert data.ssl_conn is not None
    assert handshake(data.ssl_conn, pki.good()) is None


@pytest.mark.parametrize(
    ("problem", "with_ca", "host", "category"),
    [
        ("good", False, "localhost", "unknown CA"),
        ("wrong_host", True, "localhost", "host name mismatch"),
        ("wrong_host", True, "127.0.0.1", "host name mismatch"),
        ("expired", True, "localhost", "expired certificate"),
    ],
)
def test_certificate_problems_fail_the_handshake_with_one_log_line(
    setup: tuple[UpstreamTls, Holder, taddons.context],
    pki: badcerts.Pki,
    caplog: pytest.LogCaptureFixture,
    problem: str,
    with_ca: bool,
    host: str,
    category: str,
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki if with_ca else None, host=host)
    data = tls_start(tctx, host)
    addon.tls_start_server(data)
    assert data.ssl_conn is not None
    error = handshake(data.ssl_conn, getattr(pki, problem)())
    assert error is not None and "certificate verify failed" in error
    data.conn.error = "Certificate verify failed: (what mitmproxy says)"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        addon.tls_failed_server(data)
    (line,) = tls_lines(caplog)
    assert line.startswith(f"registryproxy: upstream TLS to {host}:{PORT} failed for mapping tls/: {category} (")
    assert "s3cret" not in caplog.text and "dTpzM2NyZXQ=" not in caplog.text


def test_tls_verify_false_accepts_a_bad_certificate(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki
) -> None:
    addon, holder, tctx = setup
    holder.config = one(None, tls_verify=False)
    for cert in (pki.wrong_host(), pki.expired()):
        data = tls_start(tctx)
        addon.tls_start_server(data)
        assert data.ssl_conn is not None
        assert handshake(data.ssl_conn, cert) is None


def test_other_handshake_failures_name_mitmproxys_reason(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki, caplog: pytest.LogCaptureFixture
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    data = tls_start(tctx)
    addon.tls_start_server(data)
    data.conn.error = "The remote server does not speak TLS."
    addon.tls_failed_server(data)
    assert tls_lines(caplog) == [
        (
            f"registryproxy: upstream TLS to localhost:{PORT} failed for mapping tls/: "
            "TLS handshake failed (The remote server does not speak TLS.)"
        )
    ]


def test_failures_of_other_hosts_are_not_ours(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki, caplog: pytest.LogCaptureFixture
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)
    data = tls_start(tctx, "other.example")
    data.conn.error = "x"
    addon.tls_failed_server(data)
    assert tls_lines(caplog) == []


def test_a_connection_that_cannot_be_set_up_fails_closed(
    setup: tuple[UpstreamTls, Holder, taddons.context],
    pki: badcerts.Pki,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addon, holder, tctx = setup
    holder.config = one(pki)

    def broken(*args: object) -> tuple[str, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trust_module, "openssl_locations", broken)
    data = tls_start(tctx)
    addon.tls_start_server(data)
    assert data.ssl_conn is not None  # never left for TlsConfig to fill with another trust
    TlsConfig().tls_start_server(data)
    assert handshake(data.ssl_conn, pki.good()) is not None
    addon.tls_failed_server(data)  # already said: no second line
    (line,) = tls_lines(caplog)
    assert "could not be set up" in line and "mapping tls/" in line and "No space left" in line


# --- what is said once ---


def test_tls_verify_false_is_warned_about_once_per_mapping(
    setup: tuple[UpstreamTls, Holder, taddons.context], caplog: pytest.LogCaptureFixture
) -> None:
    addon, holder, tctx = setup
    lab = {
        "registry": "https://lab.example.com",
        "remote": "o",
        "tls_verify": False,
        "username": "u",
        "password": "pw1",
    }
    holder.config = config({"lab/": lab, "ok/": {"registry": "https://ok.example.com", "remote": "o"}})
    addon.running()
    for _ in range(3):
        addon.tls_start_server(tls_start(tctx, "lab.example.com", 443))
    holder.config = config({"lab/": lab})  # a reload: still the same mapping, not warned about again
    addon.tls_start_server(tls_start(tctx, "lab.example.com", 443))
    warnings = [r.getMessage() for r in caplog.records if "tls_verify: false" in r.getMessage()]
    assert warnings == [
        (
            "registryproxy: mapping lab/ does not verify the TLS certificate of lab.example.com (tls_verify: false); "
            "anyone on the way can read and change its traffic, credentials included"
        )
    ]


def test_the_store_in_use_is_said_once(
    setup: tuple[UpstreamTls, Holder, taddons.context], pki: badcerts.Pki, caplog: pytest.LogCaptureFixture
) -> None:
    addon, holder, _ = setup
    caplog.set_level(logging.INFO)
    holder.config = one(pki)
    addon.running()
    holder.config = one(pki)
    addon.running()
    lines = [r.getMessage() for r in caplog.records if "upstream TLS trusts" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("registryproxy: upstream TLS trusts the system store (")


def test_ssl_insecure_is_said_not_to_apply(
    setup: tuple[UpstreamTls, Holder, taddons.context], caplog: pytest.LogCaptureFixture
) -> None:
    addon, _, tctx = setup
    tctx.configure(addon, ssl_insecure=True)
    assert any("ssl_insecure does not apply" in r.getMessage() for r in caplog.records)


# --- order: before TlsConfig, or ca_file and tls_verify cannot work ---


def order_messages(first: object, second: object, cfg: Config | None, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with taddons.context(first, second):
        addon = first if isinstance(first, UpstreamTls) else second
        assert isinstance(addon, UpstreamTls)
        addon.running()
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if "TlsConfig" in r.getMessage()]


@pytest.mark.parametrize("setting", ["ca_file", "tls_verify"])
def test_after_tlsconfig_with_ca_file_or_tls_verify_is_an_error(
    pki: badcerts.Pki, caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    """An error during start-up: mitmproxy's error check then refuses to start."""
    cfg = one(pki) if setting == "ca_file" else one(None, tls_verify=False)
    (line,) = order_messages(TlsConfig(), UpstreamTls(lambda: cfg), cfg, caplog)
    assert line.startswith("ERROR registryproxy: the upstream TLS addon runs after mitmproxy's TlsConfig")
    assert "(mappings tls/)" in line


def test_after_tlsconfig_with_default_trust_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = one(None)
    (line,) = order_messages(TlsConfig(), UpstreamTls(lambda: cfg), cfg, caplog)
    assert line.startswith("WARNING registryproxy: the upstream TLS addon runs after") and "certifi" in line


@pytest.mark.parametrize("https", [False, None])
def test_after_tlsconfig_without_https_upstreams_is_quiet(caplog: pytest.LogCaptureFixture, https: bool | None) -> None:
    cfg = None if https is None else config({"p/": {"registry": "http://127.0.0.1:5000", "remote": "o"}})
    assert order_messages(TlsConfig(), UpstreamTls(lambda: cfg), cfg, caplog) == []


def test_before_tlsconfig_is_quiet(pki: badcerts.Pki, caplog: pytest.LogCaptureFixture) -> None:
    cfg = one(pki)
    assert order_messages(UpstreamTls(lambda: cfg), TlsConfig(), cfg, caplog) == []


def test_the_chain_has_it_once_and_mitmdump_loads_it_before_tlsconfig() -> None:
    """Under `mitmdump -s`, the script's addons run where the script loader stands: before TlsConfig."""
    addons = chain.addons()
    assert sum(isinstance(a, UpstreamTls) for a in addons) == 1
    with taddons.context() as tctx:
        script = tctx.script(str(Path(__file__).resolve().parents[2] / "addon" / "registryproxy.py"))
        steps = [s for a in traverse([script]) for s in getattr(a, "steps", [])]
        assert any(isinstance(a, UpstreamTls) for a in steps)


def test_lean_master_runs_it_before_tlsconfig() -> None:
    async def order() -> list[str]:
        m = serve.RegistryProxyMaster(options.Options(), with_termlog=False)
        return [type(s).__name__ for a in traverse(m.addons.chain) for s in [a, *getattr(a, "steps", [])]]

    names = asyncio.run(order())
    assert names.index("UpstreamTls") < names.index("TlsConfig")
