"""The compatibility check (mitm/compat.py): passes on the installed mitmproxy; one line naming the version and
what does not match when a target is missing, has other parameters, or the version is outside the range; and
both entry points then log that line instead of loading the chain."""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import hooks, options
from mitmproxy import version as mitmproxy_version
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import mode_servers, server
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.test import taddons
from OpenSSL import SSL
from regproxy import chain
from regproxy.mitm import compat, connections
from regproxy.mitm.chain_addon import ChainAddon
from regproxy.run import serve
from regproxy.steps.veil import Courier

ADDON_SCRIPT = Path(__file__).resolve().parents[3] / "addon" / "registryproxy.py"
PREFIX = f"registryproxy: cannot run on mitmproxy {mitmproxy_version.VERSION} (pyOpenSSL "


def one_line() -> str:
    line = compat.problem()
    assert line is not None and "\n" not in line
    return line


def test_the_installed_mitmproxy_passes() -> None:
    assert compat.problem() is None
    compat.require()


def test_the_installed_mitmproxy_is_in_the_tested_range() -> None:
    assert compat.release(mitmproxy_version.VERSION)[:2] == compat.TESTED
    assert compat.tested_range() == "12.3.x"


def test_every_target_is_found_as_listed() -> None:
    """Each entry resolves here: a typo in the lists would otherwise be a finding on every start."""
    for path in [*compat.FUNCTIONS, *compat.ATTRIBUTES, *compat.INSTANCE_ATTRIBUTES, *compat.CALLS, *compat.VALUES]:
        assert compat._lookup(path) is not compat._MISSING, path


def test_a_missing_target_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_http2, "format_error")
    assert one_line() == PREFIX + f"{pyopenssl()}): mitmproxy.proxy.layers.http._http2.format_error is missing"
    with pytest.raises(compat.Incompatible, match="_http2.format_error is missing"):
        compat.require()


def test_a_changed_signature_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    async def open_connection(self: Any, cmd: Any) -> None: ...

    monkeypatch.setattr(server.ConnectionHandler, "open_connection", open_connection)
    line = one_line()
    assert line.startswith(PREFIX)
    assert line.endswith(
        "mitmproxy.proxy.server.ConnectionHandler.open_connection takes (self, cmd), expected (self, command); "
        "mitmproxy.proxy.server.ConnectionHandler.open_connection no longer calls asyncio.open_connection"
    )


def test_a_version_outside_the_range_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for outside in ("13.0.0", "12.2.1", "11.1.3", "12.4.0.dev7"):
        monkeypatch.setattr(mitmproxy_version, "VERSION", outside)
        assert one_line() == (
            f"registryproxy: cannot run on mitmproxy {outside} (pyOpenSSL {pyopenssl()}): "
            "the proxy is tested with mitmproxy 12.3.x only"
        )
    monkeypatch.setattr(mitmproxy_version, "VERSION", "12.3.7")
    assert compat.problem() is None


def test_every_finding_is_in_the_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mitmproxy_version, "VERSION", "13.0.0")
    monkeypatch.delattr(_http1, "should_make_pipe")
    monkeypatch.delattr(SSL, "_lib")
    line = one_line()
    assert line.startswith("registryproxy: cannot run on mitmproxy 13.0.0 (pyOpenSSL ")
    assert "the proxy is tested with mitmproxy 12.3.x only; " in line
    assert "mitmproxy.proxy.layers.http._http1.should_make_pipe is missing" in line
    assert "OpenSSL.SSL._lib.SSL_get0_param is missing" in line


def test_an_instance_attribute_no_longer_set_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Proxyserver.connections` is set in its `__init__`: a rename there would make closing a no-op."""

    def init(self: proxyserver.Proxyserver) -> None:
        self.conns = {}  # type: ignore[attr-defined]

    monkeypatch.setattr(proxyserver.Proxyserver, "__init__", init)
    for cls in (proxyserver.Proxyserver, mode_servers.ServerManager):  # both declare it
        monkeypatch.delitem(cls.__annotations__, "connections")
    assert one_line().endswith("mitmproxy.addons.proxyserver.Proxyserver.connections is missing")


def test_the_connection_logger_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compat.VALUES["mitmproxy.proxy.server:logger.name"] == connections.CONNECTION_LOGGER
    monkeypatch.setattr(server, "logger", logging.getLogger("mitmproxy.proxy.connections"))
    assert one_line().endswith(
        "mitmproxy.proxy.server.logger.name is 'mitmproxy.proxy.connections', expected 'mitmproxy.proxy.server'"
    )


def test_a_hook_mitmproxy_no_longer_has_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(hooks.all_hooks, "tls_failed_server")
    assert one_line().endswith("mitmproxy hook 'tls_failed_server' is missing")


def test_the_hooks_listed_are_every_hook_the_chain_implements() -> None:
    steps = [*chain.addons(), Courier(None)]  # type: ignore[arg-type]
    implemented = {n for s in steps for n in dir(s) if n in hooks.all_hooks and callable(getattr(s, n))}
    assert implemented == set(compat.HOOKS)


def test_install_refuses_an_incompatible_mitmproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from regproxy.mitm import error_pages

    monkeypatch.setattr(error_pages, "_installed", False)
    monkeypatch.setattr(mitmproxy_version, "VERSION", "13.0.0")
    with pytest.raises(compat.Incompatible, match="tested with mitmproxy 12.3.x only"):
        error_pages.install()


# --- the entry points: the line is logged, no chain is loaded ---


def registryproxy_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "registryproxy" in r.getMessage()]


def test_the_entry_script_logs_the_line_and_loads_no_chain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(_http2, "format_error")
    with taddons.context() as tctx:
        script = tctx.script(str(ADDON_SCRIPT))
        assert script.addons == []
    assert registryproxy_errors(caplog) == [
        PREFIX + f"{pyopenssl()}): mitmproxy.proxy.layers.http._http2.format_error is missing"
    ]


def test_the_entry_script_loads_the_chain_on_a_compatible_mitmproxy(caplog: pytest.LogCaptureFixture) -> None:
    with taddons.context() as tctx:
        script = tctx.script(str(ADDON_SCRIPT))
        assert [type(a) for a in script.addons] == [ChainAddon]
    assert registryproxy_errors(caplog) == []


def test_the_lean_master_logs_the_line_and_loads_no_chain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mitmproxy_version, "VERSION", "11.1.3")

    async def start() -> tuple[list[str], list[str]]:
        m = serve.RegistryProxyMaster(options.Options(), with_termlog=False)
        errorcheck = m.addons.get("errorcheck")
        return [type(a).__name__ for a in m.addons.chain], [r.getMessage() for r in errorcheck.logger.has_errored]

    names, seen_by_errorcheck = asyncio.run(start())
    assert "ChainAddon" not in names and "ErrorCheck" in names
    line = f"registryproxy: cannot run on mitmproxy 11.1.3 (pyOpenSSL {pyopenssl()}): the proxy is tested with mitmproxy 12.3.x only"
    assert seen_by_errorcheck == [line]  # mitmproxy ends the start-up on it
    assert registryproxy_errors(caplog) == [line]


def pyopenssl() -> str:
    return metadata.version("pyOpenSSL")
