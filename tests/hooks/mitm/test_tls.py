"""mitm/tls.py: where an addon runs relative to TlsConfig (inside the chain too), and the pyOpenSSL helpers.
The connection it builds is tested through the step, in tests/hooks/test_upstream_tls.py."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import master, options
from mitmproxy.addons import tlsconfig
from mitmproxy.test import taddons
from OpenSSL import SSL
from regproxy.config import loads
from regproxy.mitm import tls as mitm_tls
from regproxy.mitm.chain_addon import ChainAddon
from regproxy.steps.upstream_tls import UpstreamTls


class Step:
    pass


@pytest.mark.parametrize("tlsconfig_first", [True, False])
def test_runs_after_tlsconfig_finds_a_step_inside_the_chain(tlsconfig_first: bool) -> None:
    step = Step()

    async def check() -> bool:
        m = master.Master(options.Options())
        chain = ChainAddon([Step(), step])
        m.addons.add(*((tlsconfig.TlsConfig(), chain) if tlsconfig_first else (chain, tlsconfig.TlsConfig())))
        return mitm_tls.runs_after_tlsconfig(step)

    assert asyncio.run(check()) is tlsconfig_first


def test_runs_after_tlsconfig_is_false_for_an_addon_the_master_does_not_run() -> None:
    with taddons.context(tlsconfig.TlsConfig()):
        assert mitm_tls.runs_after_tlsconfig(Step()) is False


def test_the_step_in_a_chain_after_tlsconfig_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The step used to look for itself among the master's addons only, never inside the chain, so a chain
    loaded after TlsConfig went unremarked."""
    config = loads("proxies:\n  'lab/':\n    registry: https://lab.example.com\n    tls_verify: false\n")
    step = UpstreamTls(lambda: config)

    async def start() -> None:
        m = master.Master(options.Options())
        m.addons.add(tlsconfig.TlsConfig(), ChainAddon([step]))
        step.running()

    asyncio.run(start())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        (
            "registryproxy: the upstream TLS addon runs after mitmproxy's TlsConfig, so ca_file and tls_verify "
            "cannot apply to proxied requests (mappings lab/); load it before TlsConfig"
        )
    ]


def test_a_connection_before_its_handshake_has_no_verification_failure() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    assert mitm_tls.verify_result(conn) is None


def test_the_failing_connection_verifies_against_nothing() -> None:
    conn = mitm_tls.failing_connection()
    assert conn.get_context().get_verify_mode() == SSL.VERIFY_PEER
