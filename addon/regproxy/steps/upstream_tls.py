"""mitmproxy's TLS connections to mapped upstreams, verified with each mapping's trust.

mitmproxy's own `TlsConfig` verifies every upstream against one store for the whole process
(certifi, or `ssl_verify_upstream_trusted_ca`/`_confdir`). The proxy instead verifies an upstream
the way its mapping says (`ca_file`, `tls_verify`; see transport/trust.py), and the token client
(upstream/client.py) does the same for the registry and its realm.

`UpstreamTls.tls_start_server` runs before TlsConfig's (the addon chain puts it first) and, for a
connection to an https upstream that a mapping names, builds the `SSL.Connection` itself the way
TlsConfig would (its ciphers, TLS versions, client certificate, SNI, host name check and ALPN),
but with the mapping's CA locations and verification (the copy of TlsConfig's code, and the private
pyOpenSSL calls it needs, are in mitm/tls.py). TlsConfig's `tls_start_server` returns at
once when `tls_start.ssl_conn` is already set, so it leaves that connection alone. Connections to
hosts that are no mapping's upstream stay TlsConfig's. mitmproxy's `ssl_insecure` option does
not apply to mapped upstreams: `tls_verify: false` does, per mapping. Loaded after TlsConfig, the
addon can do nothing, and says so at start-up (an error, which ends the start-up, when a mapping
sets ca_file or tls_verify).

A failed handshake (`tls_failed_server`) is logged as one line naming the mapping and the reason;
mitmproxy then answers the request 502, which mitm/error_pages.py renders as a registry error. Nothing
ever falls back to plain HTTP or to another trust: if the connection cannot be set up as
configured, it is set up so that it fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import connection, ctx, tls
from OpenSSL import SSL

from ..config import Config
from ..mitm import tls as mitm_tls
from ..transport import trust as trust_module
from ..transport.trust import Trust

logger = logging.getLogger("registryproxy")


@dataclass(frozen=True)
class Target:
    """An https upstream some mappings name: how to verify it, and the mappings to name in logs."""

    host: str
    netloc: str
    trust: Trust
    labels: tuple[str, ...]

    @property
    def mappings(self) -> str:
        return ", ".join(self.labels)


def targets(config: Config) -> dict[tuple[str, int], Target]:
    """(host, port) -> Target for every https upstream of the configuration.

    config/mappings.py refuses mappings of one upstream that trust it differently, so the first mapping's
    trust is every mapping's.
    """
    found: dict[tuple[str, int], Target] = {}
    for m in config.mappings:
        up = m.upstream
        if up.scheme != "https":
            continue
        address = (up.host.lower(), up.port)
        seen = found.get(address)
        if seen is None:
            found[address] = Target(up.host, up.netloc, m.trust, (m.label,))
        elif m.label not in seen.labels:
            found[address] = Target(seen.host, seen.netloc, seen.trust, (*seen.labels, m.label))
    return found


class UpstreamTls:
    """Provides the TLS connection to each mapped upstream (see the module docstring)."""

    def __init__(self, current: Callable[[], Config | None]) -> None:
        self._current = current
        self._config: Config | None = None
        self._targets: dict[tuple[str, int], Target] = {}
        self._warned: set[tuple[str, str]] = set()
        self._store_logged: str | None = None
        self._dir: Path | None = None
        self._refused: set[str] = set()  # connections whose setup failed (already logged)
        self._late = False  # mitmproxy's TlsConfig runs before this addon (see `_complain_about_order`)

    # --- lifecycle -----------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "ssl_insecure" in updated and ctx.options.ssl_insecure:
            logger.warning(
                "registryproxy: ssl_insecure does not apply to the mappings' upstreams "
                "(set tls_verify: false on a mapping to stop verifying its upstream)"
            )

    def running(self) -> None:
        self._late = mitm_tls.runs_after_tlsconfig(self)
        self._config = None  # announce (and check the order against) the configuration in force now
        self._index()

    def done(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # --- hooks ---------------------------------------------------------------------------

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        """Build the TLS connection to a mapped upstream with its mapping's trust."""
        if tls_start.ssl_conn is not None or tls_start.is_dtls:
            return  # set by an addon before this one, or not TLS over TCP: not ours
        target = self._target(tls_start.conn)
        if target is None:
            return  # not a mapped upstream: TlsConfig's
        assert isinstance(tls_start.conn, connection.Server)
        try:
            tls_start.ssl_conn = self._connection(tls_start, tls_start.conn, target)
        except Exception as e:  # noqa: BLE001 - fail closed: the connection must not fall to TlsConfig
            logger.error(
                "registryproxy: upstream TLS to %s for mapping %s could not be set up (%s); the request fails",
                target.netloc,
                target.mappings,
                _one_line(e),
            )
            self._refused.add(tls_start.conn.id)
            tls_start.ssl_conn = mitm_tls.failing_connection()

    def tls_failed_server(self, tls_start: tls.TlsData) -> None:
        """One log line: the upstream, the mapping and why the handshake failed."""
        conn = tls_start.conn
        target = self._target(conn)
        if target is None:
            return
        if conn.id in self._refused:
            self._refused.discard(conn.id)
            return
        logger.warning(
            "registryproxy: upstream TLS to %s failed for mapping %s: %s",
            target.netloc,
            target.mappings,
            failure_reason(tls_start.ssl_conn, conn.error, verified=target.trust.verify),
        )

    # --- internals -----------------------------------------------------------------------

    def _index(self) -> dict[tuple[str, int], Target]:
        config = self._current()
        if config is not self._config:
            self._config = config
            self._targets = targets(config) if config is not None else {}
            if config is not None:
                self._announce(config)
        return self._targets

    def _target(self, conn: connection.Connection) -> Target | None:
        if not isinstance(conn, connection.Server) or conn.address is None:
            return None
        host, port = conn.address[0], conn.address[1]
        return self._index().get((str(host).lower(), int(port)))

    def _announce(self, config: Config) -> None:
        """Log the store in use (when it changes) and warn once about each unverified upstream."""
        if self._late and self._targets:
            self._complain_about_order(config)
        store = config.trust_store.describe() if config.trust_store is not None else None
        if store is not None and store != self._store_logged and self._targets and not self._late:
            self._store_logged = store
            logger.info("registryproxy: upstream TLS trusts the %s, plus any ca_file", store)
        for m in config.mappings:
            if m.upstream.scheme != "https" or m.trust.verify:
                continue
            key = (m.label, m.upstream.origin)
            if key in self._warned:
                continue
            self._warned.add(key)
            logger.warning(
                "registryproxy: mapping %s does not verify the TLS certificate of %s (tls_verify: false); "
                "anyone on the way can read and change its traffic, credentials included",
                m.label,
                m.upstream.netloc,
            )

    def _complain_about_order(self, config: Config) -> None:
        """TlsConfig runs first, so it builds every upstream connection: say what that breaks.

        An error when a mapping sets ca_file or tls_verify (mitmproxy's error check then refuses the
        start-up: the configured trust cannot be honoured); otherwise a warning, as mitmproxy then
        trusts its own store (certifi), not the system's.
        """
        configured = [m.label for m in config.mappings if m.upstream.scheme == "https" and m.trust.ca_pem]
        configured += [m.label for m in config.mappings if m.upstream.scheme == "https" and not m.trust.verify]
        if configured:
            logger.error(
                "registryproxy: the upstream TLS addon runs after mitmproxy's TlsConfig, so ca_file and "
                "tls_verify cannot apply to proxied requests (mappings %s); load it before TlsConfig",
                ", ".join(dict.fromkeys(configured)),
            )
        else:
            logger.warning(
                "registryproxy: the upstream TLS addon runs after mitmproxy's TlsConfig, so proxied "
                "requests trust mitmproxy's store (certifi), not the system's; load it before TlsConfig"
            )

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="registryproxy-trust-"))
        return self._dir

    def _connection(self, tls_start: tls.TlsData, server: connection.Server, target: Target) -> SSL.Connection:
        """What TlsConfig.tls_start_server builds, with the target's trust (mitm/tls.py keeps the copy)."""
        ca_pemfile, ca_path = trust_module.openssl_locations(target.trust, self._workdir())
        return mitm_tls.server_connection(
            tls_start, server, target.host, verify=target.trust.verify, ca_pemfile=ca_pemfile, ca_path=ca_path
        )


def failure_reason(ssl_conn: SSL.Connection | None, error: str | None, *, verified: bool) -> str:
    """Why a handshake failed: the certificate check's verdict when there is one, else mitmproxy's words."""
    if verified and ssl_conn is not None:
        failed = mitm_tls.verify_result(ssl_conn)
        if failed is not None:
            return trust_module.verify_failure(*failed)
    return f"TLS handshake failed ({_one_line(error or 'no reason given')})"


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:200]
