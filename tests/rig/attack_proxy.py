"""The attack suite's proxy (tests/e2e/test_attacks.py): its keys, configurations and the clients the
tests talk to it with.

- `attack_config`: the `ap` proxy: namespace mappings onto the rig's anonymous, basic and token
  upstreams, two capability mappings (token and redirect upstreams), a `hosts:` mapping, and one mapping
  per hostile upstream (rig/hostile_upstreams.py) with the operator's credentials; `root_config` adds a
  root mapping (`ap_root`); `public_config` is the proxy with a public URL (`public_proxy`). The
  fixtures themselves are in tests/e2e/conftest.py.
- Requests: `token_for`, `get` (httpx), `raw_exchange`/`raw_get` (bytes as they are on the wire).
- Checks every test ends with: `assert_registry_error`, `assert_still_serving`, `assert_within_prefixes`.
- Tokens no client should be able to use: `forged` (the proxy's own key), `pyseto_token` (other
  PASETO versions and purposes); names next to a key: `twin`, `one_off`, `comparable`.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyseto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from regproxy.tokens.paseto import ACCESS_ASSERTION, key_id

from . import proxy, registry
from .hostile import ScriptedServer
from .hostile_upstreams import Hostiles
from .keys import CAP, CAP20
from .standard import APP

KEY_HEX = "4b" * 16 + "d2" * 16
OTHER_KEY_HEX = "91" * 32
CAP2 = CAP20  # a 20-character capability key (no UUID)
CAP_NAME = f"{CAP}/app"
CAP2_NAME = f"{CAP2}/app"
OPERATOR_USER = "operator"
OPERATOR_PASSWORD = "op-" + secrets.token_hex(12)
TIMEOUT = 15.0
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]
ERROR_STATUSES = {400, 401, 403, 404, 405, 413, 414, 416, 431}


def _hostile_mapping(server: ScriptedServer) -> dict[str, Any]:
    return {
        "registry": server.url,
        "remote": "platform",
        "username": OPERATOR_USER,
        "password": OPERATOR_PASSWORD,
    }


def attack_config(up: dict[str, registry.Upstream], h: Hostiles, key_hex: str = KEY_HEX) -> dict[str, Any]:
    """The `ap` proxy's configuration: namespace mappings onto the anonymous, basic and token upstreams,
    two capability mappings (token and redirect upstreams), a `hosts:` mapping, a mapping with a policy, and one
    mapping per hostile upstream (with the operator's credentials, which must never leave for a foreign realm)."""

    def creds(u: registry.Upstream) -> dict[str, Any]:
        return {"username": u.username, "password": u.password} if u.username else {}

    proxies: dict[str, Any] = {
        "anon/": {"registry": up["anonymous"].url, "remote": "platform"},
        "basic/": {"registry": up["basic"].url, "remote": "platform", **creds(up["basic"])},
        "tok/": {"registry": up["token"].url, "remote": "platform", **creds(up["token"])},
        CAP_NAME: {"registry": up["token"].url, "remote": APP, **creds(up["token"])},
        CAP2_NAME: {"registry": up["redirect"].url, "remote": APP, **creds(up["redirect"])},
        "dom/": {"registry": up["anonymous"].url, "remote": "platform", "hosts": ["images.test"]},
        # A policy (test_attacks.py's hostile names): app's tags but v1, and nothing else of platform/.
        "pol/": {"registry": up["anonymous"].url, "remote": "platform", "allow": ["app"], "deny": ["app:v1"]},
        "evt/": _hostile_mapping(h.tokens),
        "evping/": _hostile_mapping(h.huge_ping),
    }
    for case_id, server in h.realms.items():
        proxies[f"evr-{case_id}/"] = _hostile_mapping(server)
    return {"secretkey": key_hex, "upstream_timeout": 3, "proxies": proxies}


ROOT_KIND = "anonymous"  # the upstream of ap_root's root mapping


def root_config(up: dict[str, registry.Upstream], h: Hostiles) -> dict[str, Any]:
    """`attack_config` plus a root mapping (`*`, onto the ROOT_KIND upstream, mirroring docker.io): every
    name no key matches is asked of that upstream."""
    config = attack_config(up, h)
    config["proxies"]["*"] = {"registry": up[ROOT_KIND].url, "mirror_of": ["docker.io"]}
    return config


def enumeration_proxy(request: pytest.FixtureRequest, root: bool) -> proxy.ProxyProc:
    """The `ap_root` fixture's proxy when `root`, else `ap`'s."""
    rp: proxy.ProxyProc = request.getfixturevalue("ap_root" if root else "ap")
    return rp


def holds_a_key(name: str) -> bool:
    """Whether a name holds a capability key whole, as one of its segments."""
    return any(s in (CAP, CAP2) for s in name.split("/"))


# --- talking to the proxy ----------------------------------------------------------------------------


def token_for(rp: proxy.ProxyProc, *names: str, host: str | None = None) -> str:
    headers = {"Host": host} if host else {}
    params: list[tuple[str, str | int | float | bool | None]] = [("scope", f"repository:{n}:pull") for n in names]
    r = httpx.get(f"{rp.url}/token", params=params, headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def get(
    rp: proxy.ProxyProc,
    path: str,
    tok: str | None = None,
    method: str = "GET",
    client: httpx.Client | None = None,
    **kw: Any,
) -> httpx.Response:
    given = kw.pop("headers", {})
    headers = list(given.items()) if isinstance(given, dict) else list(given)
    if "/manifests/" in path and not any(k.lower() == "accept" for k, _ in headers):
        headers += [("Accept", t) for t in MANIFEST_TYPES]
    if tok:
        headers.append(("Authorization", f"Bearer {tok}"))
    if client is not None:
        return client.request(method, f"{rp.url}{path}", headers=headers, timeout=TIMEOUT, **kw)
    return httpx.request(method, f"{rp.url}{path}", headers=headers, timeout=TIMEOUT, **kw)


def assert_registry_error(status: int, body: bytes, allowed: set[int] = ERROR_STATUSES, head: bool = False) -> str:
    """A registry JSON error of an allowed status; returns its code ("" for HEAD)."""
    assert status in allowed, (status, body[:300])
    if head:
        return ""
    doc = json.loads(body)
    errors = doc["errors"]
    assert isinstance(errors, list) and errors and all("code" in e and "message" in e for e in errors), doc
    code: str = errors[0]["code"]
    return code


def assert_still_serving(rp: proxy.ProxyProc) -> None:
    """A normal pull works (fresh token, manifest GET), the proxy runs and has logged no traceback."""
    r = get(rp, "/v2/anon/app/manifests/v1", token_for(rp, "anon/app"))
    assert r.status_code == 200, r.text
    assert json.loads(r.content)["schemaVersion"] == 2
    assert rp.running(), "the proxy died"
    out = rp.output()
    assert "Traceback" not in out and "Addon error" not in out, out[-4000:]
    assert "internal error" not in out, out[-4000:]


def assert_within_prefixes(upstreams: dict[str, registry.Upstream]) -> None:
    """Every request that reached a rig upstream was the ping or under its mapped remote prefix."""
    for kind, u in upstreams.items():
        for e in u.access_log():
            assert e.path == "/v2/" or e.path.startswith("/v2/platform/"), (kind, e)
            rest = e.path.split("?", 1)[0][len("/v2/") :]
            lowered = rest.lower()
            assert not any(x in lowered for x in ("..", "%2e", "%2f", "%5c", "\\", "//", "%00")), (kind, e)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


def raw_exchange(rp: proxy.ProxyProc, data: bytes, head: bool = False, timeout: float = TIMEOUT) -> Answer | None:
    """Send one raw request (`Connection: close`) and read one answer; None if closed without one."""
    with socket.create_connection(("127.0.0.1", rp.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            head_bytes, _, rest = buf.partition(b"\r\n\r\n")
            lines = head_bytes.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
            length = next((int(v) for k, v in headers if k == "content-length"), None)
            if head:
                return Answer(status, headers, b"")
            while length is None or len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return Answer(status, headers, rest if length is None else rest[:length])
        except ConnectionResetError:
            return None


def raw_get(rp: proxy.ProxyProc, target: bytes, headers: list[tuple[bytes, bytes]], method: bytes = b"GET") -> bytes:
    """A raw request head for `target` with `headers`, ending the connection after the answer."""
    out = method + b" " + target + b" HTTP/1.1\r\n"
    for k, v in headers:
        out += k + b": " + v + b"\r\n"
    return out + b"Connection: close\r\n\r\n"


def absolute_form_tricks(up: dict[str, registry.Upstream]) -> list[bytes]:
    """Absolute-form and scheme-relative request targets naming the anonymous upstream or another host."""
    anon = up["anonymous"].host.encode()
    return [
        b"http://" + anon + b"/v2/library/solo/manifests/latest",
        b"http://" + anon + b"/v2/anon/../library/solo/manifests/latest",
        b"http://evil.example/v2/library/solo/manifests/latest",
        b"//" + anon + b"/v2/library/solo/manifests/latest",
    ]


def vm_kb(rp: proxy.ProxyProc, field: str) -> int:
    """A `/proc/PID/status` memory figure of the proxy (VmRSS, VmHWM, ...), in kB."""
    status = Path(f"/proc/{rp.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def pyseto_token(version: int, purpose: str, payload: dict[str, Any], key: bytes | None = None) -> str:
    """A PASETO token of another version or purpose (public: a fresh Ed25519 key; local: `key`, or the
    proxy's own)."""
    if purpose == "public":
        priv = ed25519.Ed25519PrivateKey.generate()
        pem = priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        k = pyseto.Key.new(version=version, purpose="public", key=pem)
    else:
        k = pyseto.Key.new(version=version, purpose="local", key=key or bytes.fromhex(KEY_HEX))
    return pyseto.encode(k, payload, serializer=json, exp=300).decode()


def forged(payload: dict[str, Any], assertion: bytes | None = ACCESS_ASSERTION, exp: int | None = 300) -> str:
    """A v4.local token made with the proxy's own key (what only a key holder could make)."""
    key = bytes.fromhex(KEY_HEX)
    k = pyseto.Key.new(version=4, purpose="local", key=key)
    kw: dict[str, Any] = {"exp": exp} if exp is not None else {}
    tok = pyseto.encode(
        k, payload, footer={"kid": key_id(key)}, implicit_assertion=assertion or b"", serializer=json, **kw
    )
    return tok.decode()


def twin(guess: str) -> str:
    """A random name shaped like `guess` (same length and character classes), sharing nothing with CAP."""
    rnd = random.Random(guess)
    out = []
    for c in guess:
        if c.isdigit() or c in "abcdef":
            out.append(rnd.choice("0123456789abcdef"))
        elif c in "ABCDEF":
            out.append(rnd.choice("0123456789ABCDEF"))
        else:
            out.append(c)
    twin = "".join(out)
    assert CAP not in twin and CAP2 not in twin
    return twin


def one_off(key: str, i: int) -> str:
    """`key` with its character at `i` changed."""
    return key[:i] + ("0" if key[i] != "0" else "1") + key[i + 1 :]


def comparable(
    r: httpx.Response, name: str, rp: proxy.ProxyProc | None = None
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers (but Date) with the name replaced, and the proxy's address when given."""

    def norm(text: str) -> str:
        text = text.replace(name, "NAME")
        return text.replace(rp.host, "PROXY") if rp is not None else text

    headers = sorted((k, norm(v)) for k, v in r.headers.items() if k != "date")
    return r.status_code, norm(r.content.decode("latin-1")).encode("latin-1"), headers


# --- the proxy with a public URL (Host and X-Forwarded-* spoofing) ------------------------------------

PUBLIC_URL = "https://reg.example.test"


def public_config(up: dict[str, registry.Upstream]) -> dict[str, Any]:
    """The `public_proxy` fixture's configuration: `public_url` set, a namespace and a `hosts:` mapping."""
    return {
        "secretkey": KEY_HEX,
        "public_url": PUBLIC_URL,
        "proxies": {
            "anon/": {"registry": up["anonymous"].url, "remote": "platform"},
            "dom/": {"registry": up["anonymous"].url, "remote": "platform", "hosts": ["images.test"]},
            # A policy (test_attacks.py's hostile names): app's tags but v1, and nothing else of platform/.
            "pol/": {"registry": up["anonymous"].url, "remote": "platform", "allow": ["app"], "deny": ["app:v1"]},
        },
    }


def realm_of(challenge: str) -> str:
    """The realm of a Bearer challenge."""
    assert challenge.startswith('Bearer realm="'), challenge
    return challenge.split('"', 2)[1]
