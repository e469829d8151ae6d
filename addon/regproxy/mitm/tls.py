"""mitmproxy's TLS to an upstream, built the way its TlsConfig builds it but with a trust of our own.

- `server_connection` is a copy of what `TlsConfig.tls_start_server` (mitmproxy 12.3.x,
  mitmproxy/addons/tlsconfig.py) builds for a server connection: its ALPN offers, ciphers (TlsConfig's
  private `_default_ciphers`), TLS versions, curve and client certificate, from the same options; what differs
  is the verification (the CA file and directory given, or none) and that SNI and the checked name are always
  the host given. Kept in step with TlsConfig by hand; compat.py checks the functions it calls.
- `_set_peer_name` and `verify_result` use pyOpenSSL's private OpenSSL bindings (`SSL._lib`, `SSL._ffi`,
  `Connection._ssl`), as TlsConfig does: pyOpenSSL has no API for the host name check during the handshake
  or for the verification's result code.
- `runs_after_tlsconfig` reads the master's addon chain (`addons.chain`, `traverse`).
"""

from __future__ import annotations

import ipaddress
import os

from mitmproxy import connection, ctx, tls
from mitmproxy.addonmanager import traverse
from mitmproxy.addons import tlsconfig
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from .chain_addon import ChainAddon


def server_connection(
    tls_start: tls.TlsData,
    server: connection.Server,
    host: str,
    *,
    verify: bool,
    ca_pemfile: str | None,
    ca_path: str | None,
) -> SSL.Connection:
    """What TlsConfig.tls_start_server builds for `server`, verified against the given CA locations (with
    `verify`) and for `host`, which is also the SNI."""
    client = tls_start.context.client
    mode = net_tls.Verify.VERIFY_PEER if verify else net_tls.Verify.VERIFY_NONE
    # Always the configured name: the certificate must be valid for the upstream the operator named.
    server.sni = host

    if not server.alpn_offers:
        if client.alpn_offers:
            if ctx.options.http2:
                server.alpn_offers = tuple(client.alpn_offers)
            else:
                server.alpn_offers = tuple(x for x in client.alpn_offers if x != b"h2")
        else:
            server.alpn_offers = []

    if not server.cipher_list and ctx.options.ciphers_server:
        server.cipher_list = ctx.options.ciphers_server.split(":")
    cipher_list = server.cipher_list or tlsconfig._default_ciphers(net_tls.Version[ctx.options.tls_version_server_min])

    client_cert: str | None = None
    if ctx.options.client_certs:
        client_certs = os.path.expanduser(ctx.options.client_certs)
        if os.path.isfile(client_certs):
            client_cert = client_certs
        else:
            p = os.path.join(client_certs, f"{host}.pem")
            if os.path.isfile(p):
                client_cert = p

    ssl_ctx = net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD,
        min_version=net_tls.Version[ctx.options.tls_version_server_min],
        max_version=net_tls.Version[ctx.options.tls_version_server_max],
        cipher_list=tuple(cipher_list),
        ecdh_curve=net_tls.get_curve(ctx.options.tls_ecdh_curve_server),
        verify=mode,
        ca_path=ca_path,
        ca_pemfile=ca_pemfile,
        client_cert=client_cert,
        legacy_server_connect=False,
    )
    ssl_conn = SSL.Connection(ssl_ctx)
    _set_peer_name(ssl_conn, host, check=verify)
    if server.alpn_offers:
        ssl_conn.set_alpn_protos(list(server.alpn_offers))
    ssl_conn.set_connect_state()
    return ssl_conn


def _set_peer_name(ssl_conn: SSL.Connection, host: str, *, check: bool) -> None:
    """SNI for a host name (never for an IP address, RFC 6066), and the name the certificate must match."""
    try:
        ip: bytes | None = ipaddress.ip_address(host).packed
    except ValueError:
        ip = None
    if ip is None:
        ssl_conn.set_tlsext_host_name(host.encode("idna"))
    if not check:
        return
    # As TlsConfig does: OpenSSL checks the name during the handshake; no partial wildcards, no CN.
    param = SSL._lib.SSL_get0_param(ssl_conn._ssl)  # type: ignore[attr-defined]
    SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, tlsconfig.DEFAULT_HOSTFLAGS)  # type: ignore[attr-defined]
    if ip is None:
        name = host.encode("idna")
        ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))  # type: ignore[attr-defined]
    else:
        ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))  # type: ignore[attr-defined]
    SSL._openssl_assert(ok == 1)


def verify_result(ssl_conn: SSL.Connection) -> tuple[int, str] | None:
    """The certificate verification's failure (OpenSSL's X509_V_ERR_* code and its words), or None if it
    passed (or has not run)."""
    code = int(SSL._lib.SSL_get_verify_result(ssl_conn._ssl))  # type: ignore[attr-defined]
    if code == 0:  # X509_V_OK
        return None
    text = SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(code)).decode()  # type: ignore[attr-defined]
    return code, text


def failing_connection() -> SSL.Connection:
    """A client connection that cannot complete: it verifies against an empty store."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_PEER, None)
    conn = SSL.Connection(context)
    conn.set_connect_state()
    return conn


def runs_after_tlsconfig(addon: object) -> bool:
    """Whether the master runs mitmproxy's TlsConfig before `addon` (itself, or a step of a `ChainAddon`);
    False when `addon` is not in the master's chain."""
    order = list(traverse(ctx.master.addons.chain))
    mine = next(
        (i for i, a in enumerate(order) if a is addon or (isinstance(a, ChainAddon) and addon in a.steps)),
        None,
    )
    return mine is not None and any(isinstance(a, tlsconfig.TlsConfig) for a in order[:mine])
