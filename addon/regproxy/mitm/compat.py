"""The seam's compatibility check: the mitmproxy it runs on is one it was tested with, and everything of
mitmproxy (and pyOpenSSL) that `mitm` patches, wraps, copies or reads privately is still there, as expected.

What is checked, each a finding when it fails:
- the version: `mitmproxy.version.VERSION` must be in the tested range (`TESTED`, 12.3.x);
- every function or method the seam replaces, wraps, copies or calls outside mitmproxy's public API exists,
  with the parameter names the seam's code expects (`FUNCTIONS`, by `inspect.signature`);
- every other private attribute it relies on exists (`ATTRIBUTES`), every attribute it reads on instances of
  a mitmproxy class is declared by the class or set by its `__init__` (`INSTANCE_ATTRIBUTES`), the functions
  whose calls the seam redirects still make them (`CALLS`), mitmproxy's connection lines still come from the
  logger the proxy quiets (`VALUES`), and every hook a step implements is still a hook (`HOOKS`).

`problem()` says all findings in one line (None: none); `require()` raises `Incompatible` with that line.
Both entry points run it before the chain is imported (regproxy.run.preflight: `mitmdump -s
addon/registryproxy.py` and the lean master), so a mismatch is one log line and mitmproxy's start-up error,
never a traceback or a patch that silently does nothing; each `install` that patches mitmproxy requires it
too. Nothing checked is imported at this module's import: each target is looked up inside the check, so a
missing one is a finding, not an ImportError.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import re
from importlib import metadata
from typing import Any

TESTED = (12, 3)  # the mitmproxy releases the seam is written and tested against: 12.3.x

# "module:qualified.name" -> the parameter names the seam's code passes or expects.
FUNCTIONS: dict[str, tuple[str, ...]] = {
    # error_pages: mitmproxy's own error answers, replaced; its connect, wrapped.
    "mitmproxy.proxy.layers.http._http1:make_error_response": ("status_code", "message"),
    "mitmproxy.proxy.layers.http._http2:format_error": ("status_code", "message"),
    "mitmproxy.proxy.layers.http._http3:format_error": ("status_code", "message"),
    "mitmproxy.proxy.server:ConnectionHandler.open_connection": ("self", "command"),
    "mitmproxy.proxy.server:ConnectionHandler.server_event": ("self", "event"),
    "mitmproxy.proxy.events:OpenConnectionCompleted": ("command", "reply"),
    "mitmproxy.net.http.http1:assemble_response": ("response",),
    # pool_layers: the TLS layer replaced for pooled origins, the HTTP/1 client's exchanges watched.
    "mitmproxy.proxy.layers.tls:ServerTLSLayer": ("context", "conn"),
    "mitmproxy.proxy.layers.http._http1:Http1Client.send": ("self", "event"),
    "mitmproxy.proxy.layers.http._http1:Http1Client.mark_done": ("self", "request", "response"),
    "mitmproxy.proxy.layers.http._http1:should_make_pipe": ("request", "response"),
    "mitmproxy.net.http.http1:expected_http_body_size": ("request", "response"),
    "mitmproxy.net.http.http1:connection_close": ("http_version", "headers"),
    "mitmproxy.proxy.commands:CloseConnection": ("connection",),
    # connections: closing a client or an upstream connection.
    "mitmproxy.proxy.server:ConnectionHandler.close_connection": ("self", "connection", "half_close"),
    # tls: the copy of TlsConfig.tls_start_server and what it calls.
    "mitmproxy.addons.tlsconfig:TlsConfig.tls_start_server": ("self", "tls_start"),
    "mitmproxy.addons.tlsconfig:_default_ciphers": ("min_tls_version",),
    "mitmproxy.net.tls:create_proxy_server_context": (
        "method",
        "min_version",
        "max_version",
        "cipher_list",
        "ecdh_curve",
        "verify",
        "ca_path",
        "ca_pemfile",
        "client_cert",
        "legacy_server_connect",
    ),
    "mitmproxy.net.tls:get_curve": ("name",),
    "mitmproxy.addonmanager:traverse": ("chain",),
}

# Attributes that must exist: the modules the pool's shims stand in for, constants, pyOpenSSL's bindings.
ATTRIBUTES: tuple[str, ...] = (
    "mitmproxy.proxy.server:asyncio.open_connection",
    "mitmproxy.proxy.server:ConnectionIO.writer",
    "mitmproxy.proxy.layers.http:tls.ServerTLSLayer",
    "mitmproxy.proxy.layers.http._events:RequestHeaders",
    "mitmproxy.connection:ConnectionState.CLOSED",
    "mitmproxy.hooks:all_hooks",
    "mitmproxy.addons.tlsconfig:DEFAULT_HOSTFLAGS",
    "mitmproxy.net.tls:Verify.VERIFY_PEER",
    "mitmproxy.net.tls:Verify.VERIFY_NONE",
    "mitmproxy.net.tls:Method.TLS_CLIENT_METHOD",
    "mitmproxy.net.tls:Version",
    "OpenSSL.SSL:_lib.SSL_get0_param",
    "OpenSSL.SSL:_lib.X509_VERIFY_PARAM_set_hostflags",
    "OpenSSL.SSL:_lib.X509_VERIFY_PARAM_set1_host",
    "OpenSSL.SSL:_lib.X509_VERIFY_PARAM_set1_ip",
    "OpenSSL.SSL:_lib.SSL_get_verify_result",
    "OpenSSL.SSL:_lib.X509_verify_cert_error_string",
    "OpenSSL.SSL:_ffi.string",
    "OpenSSL.SSL:_openssl_assert",
)

# "module:Class" -> attributes read on its instances (declared on the class or set by an `__init__`).
INSTANCE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "mitmproxy.addons.proxyserver:Proxyserver": ("connections",),
    "mitmproxy.proxy.server:ConnectionHandler": ("client", "transports"),
    "mitmproxy.proxy.layers.http._http1:Http1Client": (
        "conn",
        "request",
        "response",
        "request_done",
        "response_done",
        "buf",
    ),
    "mitmproxy.addonmanager:AddonManager": ("chain",),
    "OpenSSL.SSL:Connection": ("_ssl",),
}

# Functions whose calls the seam redirects (a module-local shim): they must still make those calls.
CALLS: dict[str, tuple[str, str]] = {
    "mitmproxy.proxy.server:ConnectionHandler.open_connection": ("asyncio", "open_connection"),
    "mitmproxy.proxy.layers.http:HttpLayer.get_connection": ("tls", "ServerTLSLayer"),
}

# Values the seam relies on: the logger mitmproxy's per-connection lines come from (see mitm/connections.py).
VALUES: dict[str, object] = {
    "mitmproxy.proxy.server:logger.name": "mitmproxy.proxy.server",
}

# Every hook a step of the chain (or the Courier) implements: ChainAddon dispatches only known hooks.
HOOKS: tuple[str, ...] = (
    "client_connected",
    "client_disconnected",
    "configure",
    "done",
    "error",
    "load",
    "request",
    "requestheaders",
    "response",
    "responseheaders",
    "running",
    "tls_failed_server",
    "tls_start_server",
    "update",
)


class Incompatible(RuntimeError):
    """The running mitmproxy is not one the seam can patch; the message is `problem()`'s line."""


def mitmproxy_version() -> str:
    try:
        return str(importlib.import_module("mitmproxy.version").VERSION)
    except (ImportError, AttributeError):
        return "(version unknown)"


def problem() -> str | None:
    """One line naming the mitmproxy version and everything that does not match; None when all does."""
    findings = _version_findings() + _target_findings()
    if not findings:
        return None
    return f"registryproxy: cannot run on mitmproxy {mitmproxy_version()} ({_pyopenssl()}): {'; '.join(findings)}"


def require() -> None:
    """Raise `Incompatible` (with `problem()`'s line) unless everything matches."""
    line = problem()
    if line is not None:
        raise Incompatible(line)


def release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "12.3.1" -> (12, 3, 1), "13.0.0.dev5" -> (13, 0, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def tested_range() -> str:
    return ".".join(str(p) for p in TESTED) + ".x"


def _version_findings() -> list[str]:
    if release(mitmproxy_version())[: len(TESTED)] == TESTED:
        return []
    return [f"the proxy is tested with mitmproxy {tested_range()} only"]


def _target_findings() -> list[str]:
    findings: list[str] = []
    for path, params in FUNCTIONS.items():
        found = _lookup(path)
        if found is _MISSING:
            findings.append(f"{_name(path)} is missing")
            continue
        try:
            actual = tuple(inspect.signature(found).parameters)
        except (TypeError, ValueError):
            actual = ()
        if actual != params:
            findings.append(f"{_name(path)} takes ({', '.join(actual)}), expected ({', '.join(params)})")
    findings += [f"{_name(path)} is missing" for path in ATTRIBUTES if _lookup(path) is _MISSING]
    for path, names in INSTANCE_ATTRIBUTES.items():
        cls = _lookup(path)
        if not isinstance(cls, type):
            findings.append(f"{_name(path)} is missing")
            continue
        findings += [f"{_name(path)}.{n} is missing" for n in names if not _instances_have(cls, n)]
    for path, (module, function) in CALLS.items():
        found = _lookup(path)
        if found is _MISSING:
            if path not in FUNCTIONS:
                findings.append(f"{_name(path)} is missing")
            continue
        code = getattr(inspect.unwrap(found), "__code__", None)
        if code is None or not {module, function} <= set(code.co_names):
            findings.append(f"{_name(path)} no longer calls {module}.{function}")
    for path, expected in VALUES.items():
        value = _lookup(path)
        if value is _MISSING:
            findings.append(f"{_name(path)} is missing")
        elif value != expected:
            findings.append(f"{_name(path)} is {value!r}, expected {expected!r}")
    # A hook is known once its class is defined: the proxy layers define the flow, TLS and connection hooks.
    hooks = _lookup("mitmproxy.hooks:all_hooks") if _lookup("mitmproxy.proxy.layers:tls") is not _MISSING else None
    if isinstance(hooks, dict):
        findings += [f"mitmproxy hook {h!r} is missing" for h in HOOKS if h not in hooks]
    return list(dict.fromkeys(findings))


class _Missing:
    pass


_MISSING: Any = _Missing()


def _lookup(path: str) -> Any:
    """The object at "module:attr.attr", or _MISSING (never raises)."""
    module_name, _, attrs = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
    except Exception:  # noqa: BLE001 - whatever a lookup raises (ImportError, AttributeError, cffi's own), it is missing
        return _MISSING
    return obj


def _instances_have(cls: type, name: str) -> bool:
    """Whether instances of `cls` have attribute `name`: declared on a class of its MRO, or stored by an
    `__init__` of one (`self.name = ...`)."""
    for c in cls.__mro__:
        if name in c.__dict__ or name in inspect.get_annotations(c):
            return True
        init = c.__dict__.get("__init__")
        code = getattr(init, "__code__", None)
        if code is not None and any(i.opname == "STORE_ATTR" and i.argval == name for i in dis.get_instructions(code)):
            return True
    return False


def _name(path: str) -> str:
    return path.replace(":", ".")


def _pyopenssl() -> str:
    try:
        return f"pyOpenSSL {metadata.version('pyOpenSSL')}"
    except metadata.PackageNotFoundError:
        return "pyOpenSSL not installed"
