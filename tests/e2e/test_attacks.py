"""Attacks on a real running proxy (mitmdump with the addon) in front of real upstreams.

One proxy serves the module: namespace mappings onto the rig's anonymous, basic and token
upstreams, two capability mappings (token and redirect upstreams), a `hosts:` mapping, and
mappings onto hostile servers (rig/hostile.py) that play a malicious upstream: challenges whose
realm points at a trap, malformed, oversized and dribbled token answers. Every attack must get a
registry JSON error (never 200 for content outside a mapping, never a 5xx of the proxy's own
making, never a traceback); the upstreams' taps show what reached them.

Groups: 1 path tricks, 2 scope and token abuse, 3 uploads, 4 enumeration and timing,
5 malicious upstreams, 6 Host and X-Forwarded-* spoofing. Each test ends by checking that the
proxy still serves a normal pull and has logged no traceback.

The enumeration checks also run against a second proxy (`ap_root`) with the same mappings plus a
root mapping (`*`, onto the anonymous upstream, mirroring docker.io): there every name no key matches
is asked of that upstream, so an almost-right key must get exactly what a random name gets from it,
and no capability key may be forwarded there inside a name.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pyseto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from regproxy.tokens.paseto import ACCESS_ASSERTION, Grant, TokenCodec, key_id
from rig import proxy, registry
from rig.hostile import Reply, Request, ScriptedServer, Trap, dribble, repeat
from rig.standard import APP

pytestmark = pytest.mark.e2e

KEY_HEX = "4b" * 16 + "d2" * 16
OTHER_KEY_HEX = "91" * 32
CAP = "3f9c1e7a-5b2d-4c8e-a6f0-1d3b5e7a9c2e"
CAP2 = "b7e2d4f6a8c0e2f4a6b8"  # a 20-character capability key (no UUID)
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


# --- hostile servers ------------------------------------------------------------------------------


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


def _challenge_reply(challenge: str) -> Reply:
    return Reply(
        401,
        [("WWW-Authenticate", challenge), ("Content-Type", "application/json")],
        b'{"errors":[{"code":"UNAUTHORIZED","message":"hostile upstream"}]}',
    )


GOOD_TOKEN = _json({"token": "hostile-upstream-token", "expires_in": 300})


def _token_case(req: Request) -> str:
    """The case a token request is for: the last component of its upstream repository name."""
    scopes = parse_qs(urlsplit(req.path).query).get("scope", [""])
    return scopes[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]


# Token answers from a hostile token service on the upstream's own host (a realm the proxy may
# use): each is refused with a registry error. Keyed by the repository name the client asks for.
TOKEN_ANSWERS: dict[str, Callable[[ScriptedServer], Reply]] = {
    "big-length": lambda s: Reply(200, [], chunks=repeat(b'{"token":"' + b"a" * 65526, 20 << 20), length=20 << 20),
    "big-chunked": lambda s: Reply(200, [], chunks=repeat(b'{"token":"' + b"a" * 65526, 20 << 20)),
    "html": lambda s: Reply(200, [("Content-Type", "text/html")], b"<html><body>token</body></html>"),
    "empty": lambda s: Reply(200, [], b""),
    "null": lambda s: Reply(200, [], b"null"),
    "array": lambda s: Reply(200, [], b'["hostile-upstream-token"]'),
    "nested": lambda s: Reply(200, [], b"[" * 200_000),
    "no-token": lambda s: Reply(200, [], _json({"expires_in": 300})),
    "empty-token": lambda s: Reply(200, [], _json({"token": "", "access_token": ""})),
    "null-token": lambda s: Reply(200, [], _json({"token": None, "access_token": None})),
    "int-token": lambda s: Reply(200, [], _json({"token": 12345})),
    "list-token": lambda s: Reply(200, [], _json({"token": ["a", "b"]})),
    "object-token": lambda s: Reply(200, [], _json({"token": {"a": "b"}})),
    "bool-token": lambda s: Reply(200, [], _json({"token": True})),
    "crlf-token": lambda s: Reply(200, [], _json({"token": "abc\r\nX-Injected: 1"})),
    "space-token": lambda s: Reply(200, [], _json({"token": "abc def"})),
    "quote-token": lambda s: Reply(200, [], _json({"token": 'abc"def'})),
    "nonascii-token": lambda s: Reply(200, [], _json({"token": "tökén"})),
    "long-token": lambda s: Reply(200, [], _json({"token": "a" * 40_000})),
    "exp-negative": lambda s: Reply(200, [], _json({"token": "t", "expires_in": -1})),
    "exp-zero": lambda s: Reply(200, [], _json({"token": "t", "expires_in": 0})),
    "exp-huge": lambda s: Reply(200, [], _json({"token": "t", "expires_in": 10**12})),
    "exp-bigint": lambda s: Reply(200, [], b'{"token":"t","expires_in":' + b"9" * 400 + b"}"),
    "exp-inf": lambda s: Reply(200, [], b'{"token":"t","expires_in":1e400}'),
    "exp-nan": lambda s: Reply(200, [], b'{"token":"t","expires_in":NaN}'),
    "status-500": lambda s: Reply(500, [], GOOD_TOKEN),
    "status-401": lambda s: Reply(401, [("WWW-Authenticate", 'Basic realm="x"')], GOOD_TOKEN),
    "status-404": lambda s: Reply(404, [], GOOD_TOKEN),
    "redirect": lambda s: Reply(307, [("Location", f"http://localhost:{s.trap_port}/token")], b""),  # type: ignore[attr-defined]
    "dribble": lambda s: Reply(200, [], chunks=dribble(GOOD_TOKEN, 0.5, s.stopping)),
    "stall": lambda s: Reply(200, [], chunks=dribble(GOOD_TOKEN, 30, s.stopping, step=len(GOOD_TOKEN))),
}
TIMEOUT_CASES = {"dribble", "stall"}


@dataclass(frozen=True)
class RealmCase:
    """A hostile upstream whose challenge sends the proxy's credentials somewhere else."""

    id: str
    challenge: str  # WWW-Authenticate on /v2/; {own} and {trap} are ports
    token: str | None = None  # on /token of its own host: None answers a good token, else a Location (307)
    live: str | None = None  # a challenge answered on every other /v2/... path
    expect: int = 502


def _bearer(realm: str) -> str:
    return f'Bearer realm="{realm}",service="hostile"'


REALM_CASES = [
    RealmCase("localhost-http", _bearer("http://localhost:{trap}/token")),
    RealmCase("localhost-https", _bearer("https://localhost:{trap}/token")),
    RealmCase("localhost-upper", _bearer("HTTP://LOCALHOST:{trap}/token")),
    RealmCase("localhost-dot", _bearer("http://localhost.:{trap}/token")),
    RealmCase("other-loopback", _bearer("http://127.0.0.2:{trap}/token")),
    RealmCase("ipv4-short", _bearer("https://127.1:{trap}/token")),
    RealmCase("ipv4-decimal", _bearer("https://2130706433:{trap}/token")),
    RealmCase("ipv4-hex", _bearer("https://0x7f000001:{trap}/token")),
    RealmCase("ipv4-octal", _bearer("https://0177.0.0.1:{trap}/token")),
    RealmCase("ipv4-mapped-v6", _bearer("https://[::ffff:127.0.0.1]:{trap}/token")),
    RealmCase("any-address", _bearer("https://0.0.0.0:{trap}/token")),
    RealmCase("v6-loopback", _bearer("https://[::1]:{trap}/token")),
    RealmCase("private-10", _bearer("https://10.0.0.1/token")),
    RealmCase("private-192", _bearer("https://192.168.1.1/token")),
    RealmCase("private-172", _bearer("https://172.16.0.1/token")),
    RealmCase("metadata", _bearer("https://169.254.169.254/latest/meta-data/")),
    RealmCase("cgnat", _bearer("https://100.64.0.1/token")),
    RealmCase("v6-ula", _bearer("https://[fd00::1]/token")),
    RealmCase("v6-link-local", _bearer("https://[fe80::1]/token")),
    RealmCase("file", _bearer("file:///etc/passwd")),
    RealmCase("gopher", _bearer("gopher://127.0.0.1:{trap}/_GET%20/")),
    RealmCase("ftp", _bearer("ftp://127.0.0.1:{trap}/token")),
    RealmCase("dict", _bearer("dict://127.0.0.1:{trap}/")),
    RealmCase("ldap", _bearer("ldap://127.0.0.1:{trap}/")),
    RealmCase("ws", _bearer("ws://127.0.0.1:{trap}/token")),
    RealmCase("data", _bearer("data:application/json,%7B%22token%22:%22x%22%7D")),
    RealmCase("javascript", _bearer("javascript:alert(1)")),
    RealmCase("scheme-relative", _bearer("//localhost:{trap}/token")),
    RealmCase("relative", _bearer("/token")),
    RealmCase("userinfo-own-host", _bearer("http://operator:pw@127.0.0.1:{own}/token")),
    RealmCase("userinfo-confusion", _bearer("http://127.0.0.1:{own}@localhost:{trap}/token")),
    RealmCase("backslash-confusion", _bearer("http://localhost:{trap}\\\\@127.0.0.1:{own}/token")),
    RealmCase("fragment-confusion", _bearer("http://127.0.0.1:{own}#@localhost:{trap}/token")),
    RealmCase("unquoted", "Bearer realm=http://localhost:{trap}/token,service=hostile"),
    # A repeated parameter: the last one counts (werkzeug); the operator's credentials go to the one used only.
    RealmCase(
        "duplicate-realm-own-last",
        'Bearer realm="http://localhost:{trap}/token",realm="http://127.0.0.1:{own}/token"',
        expect=200,
    ),
    RealmCase(
        "duplicate-realm-trap-last", 'Bearer realm="http://127.0.0.1:{own}/token",realm="http://localhost:{trap}/token"'
    ),
    RealmCase("redirect-other-host", _bearer("http://127.0.0.1:{own}/token"), token="http://localhost:{trap}/token"),
    RealmCase("redirect-other-port", _bearer("http://127.0.0.1:{own}/token"), token="http://127.0.0.1:{trap}/token"),
    RealmCase("basic-first", 'Basic realm="r", Bearer realm="http://localhost:{trap}/token"', expect=200),
    RealmCase(
        "learned-live-401",
        _bearer("http://127.0.0.1:{own}/token"),
        live=_bearer("http://localhost:{trap}/token"),
        expect=200,
    ),
]


def _realm_script(case: RealmCase, trap_port: int) -> Callable[[Request, ScriptedServer], Reply]:
    def fill(template: str, s: ScriptedServer) -> str:
        return template.replace("{own}", str(s.port)).replace("{trap}", str(trap_port))

    def script(req: Request, s: ScriptedServer) -> Reply:
        path = urlsplit(req.path).path
        if path in ("/v2", "/v2/"):
            return _challenge_reply(fill(case.challenge, s))
        if path == "/token":
            if case.token is not None:
                return Reply(307, [("Location", fill(case.token, s))])
            return Reply(200, [("Content-Type", "application/json")], GOOD_TOKEN)
        if case.live is not None:
            return _challenge_reply(fill(case.live, s))
        return Reply(404, [("Content-Type", "application/json")], b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    return script


def _token_script(req: Request, s: ScriptedServer) -> Reply:
    path = urlsplit(req.path).path
    if path in ("/v2", "/v2/"):
        return _challenge_reply(_bearer(f"http://127.0.0.1:{s.port}/token"))
    if path == "/token":
        answer = TOKEN_ANSWERS.get(_token_case(req))
        if answer is not None:
            return answer(s)
        return Reply(200, [("Content-Type", "application/json")], GOOD_TOKEN)
    return Reply(404, [("Content-Type", "application/json")], b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')


PING_BODY = 1 << 30


def _huge_ping_script(req: Request, s: ScriptedServer) -> Reply:
    """A challenge on /v2/ followed by a 1 GiB body, then good token answers."""
    path = urlsplit(req.path).path
    if path in ("/v2", "/v2/"):
        challenge = _bearer(f"http://127.0.0.1:{s.port}/token")
        return Reply(401, [("WWW-Authenticate", challenge)], chunks=repeat(b"z" * 65536, PING_BODY), length=PING_BODY)
    if path == "/token":
        return Reply(200, [("Content-Type", "application/json")], GOOD_TOKEN)
    return Reply(404, [("Content-Type", "application/json")], b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')


@dataclass
class Hostiles:
    trap: Trap
    tokens: ScriptedServer
    huge_ping: ScriptedServer
    realms: dict[str, ScriptedServer]

    def all(self) -> list[ScriptedServer]:
        return [self.tokens, self.huge_ping, *self.realms.values()]


@pytest.fixture(scope="module")
def hostiles() -> Iterator[Hostiles]:
    trap = Trap()
    started: list[ScriptedServer] = []
    try:
        tokens = ScriptedServer(_token_script, "hostile-tokens")
        started.append(tokens)
        tokens.trap_port = trap.port  # type: ignore[attr-defined]
        huge = ScriptedServer(_huge_ping_script, "hostile-huge-ping")
        started.append(huge)
        realms = {}
        for case in REALM_CASES:
            realms[case.id] = ScriptedServer(_realm_script(case, trap.port), f"hostile-{case.id}")
            started.append(realms[case.id])
        yield Hostiles(trap, tokens, huge, realms)
    finally:
        for s in started:
            s.stop()
        trap.stop()


# --- the proxy ------------------------------------------------------------------------------------


def _hostile_mapping(server: ScriptedServer) -> dict[str, Any]:
    return {
        "registry": server.url,
        "remote": "platform",
        "username": OPERATOR_USER,
        "password": OPERATOR_PASSWORD,
    }


def _config(up: dict[str, registry.Upstream], h: Hostiles, key_hex: str = KEY_HEX) -> dict[str, Any]:
    def creds(u: registry.Upstream) -> dict[str, Any]:
        return {"username": u.username, "password": u.password} if u.username else {}

    proxies: dict[str, Any] = {
        "anon/": {"registry": up["anonymous"].url, "remote": "platform"},
        "basic/": {"registry": up["basic"].url, "remote": "platform", **creds(up["basic"])},
        "tok/": {"registry": up["token"].url, "remote": "platform", **creds(up["token"])},
        CAP_NAME: {"registry": up["token"].url, "remote": APP, **creds(up["token"])},
        CAP2_NAME: {"registry": up["redirect"].url, "remote": APP, **creds(up["redirect"])},
        "dom/": {"registry": up["anonymous"].url, "remote": "platform", "hosts": ["images.test"]},
        "evt/": _hostile_mapping(h.tokens),
        "evping/": _hostile_mapping(h.huge_ping),
    }
    for case_id, server in h.realms.items():
        proxies[f"evr-{case_id}/"] = _hostile_mapping(server)
    return {"secretkey": key_hex, "upstream_timeout": 3, "proxies": proxies}


@pytest.fixture(scope="module")
def ap(
    upstreams: dict[str, registry.Upstream], hostiles: Hostiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    p = proxy.start_proxy(_config(upstreams, hostiles), tmp_path_factory.mktemp("attacks"))
    yield p
    p.stop()


ROOT_KIND = "anonymous"  # the upstream of ap_root's root mapping


@pytest.fixture(scope="module")
def ap_root(
    upstreams: dict[str, registry.Upstream], hostiles: Hostiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    config = _config(upstreams, hostiles)
    config["proxies"]["*"] = {"registry": upstreams[ROOT_KIND].url, "mirror_of": ["docker.io"]}
    p = proxy.start_proxy(config, tmp_path_factory.mktemp("attacks-root"))
    yield p
    p.stop()


def enumeration_proxy(request: pytest.FixtureRequest, root: bool) -> proxy.ProxyProc:
    rp: proxy.ProxyProc = request.getfixturevalue("ap_root" if root else "ap")
    return rp


def holds_a_key(name: str) -> bool:
    """Whether a name holds a capability key whole, as one of its segments."""
    return any(s in (CAP, CAP2) for s in name.split("/"))


@pytest.fixture
def taps(upstreams: dict[str, registry.Upstream]) -> dict[str, registry.Upstream]:
    """The rig's upstreams with their access logs (and token issuers' logs) cleared for this test."""
    for u in upstreams.values():
        u.clear_access_log()
        if u.token_issuer is not None:
            u.token_issuer.clear()
    return upstreams


# --- helpers --------------------------------------------------------------------------------------


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
    out = method + b" " + target + b" HTTP/1.1\r\n"
    for k, v in headers:
        out += k + b": " + v + b"\r\n"
    return out + b"Connection: close\r\n\r\n"


# --- 1. path tricks -------------------------------------------------------------------------------

SOLO_DIGEST_PATH = "blobs/sha256:" + "0" * 64
# Request targets (raw bytes, sent as they are) that try to leave `anon/` -> `platform/`, mostly
# towards `library/solo` on the same anonymous upstream, or that break the name grammar.
PATH_TRICKS: list[bytes] = [
    b"/v2/anon/../library/solo/manifests/latest",
    b"/v2/anon/app/../../library/solo/manifests/latest",
    b"/v2/anon/./app/manifests/v1",
    b"/v2/anon/app/./manifests/v1",
    b"/v2/anon//app/manifests/v1",
    b"/v2//anon/app/manifests/v1",
    b"/v2/anon/app//manifests/v1",
    b"//v2/anon/app/manifests/v1",
    b"/v2/anon/%2e%2e/library/solo/manifests/latest",
    b"/v2/anon/%2E%2e/library/solo/manifests/latest",
    b"/v2/anon/%2e%2E/library/solo/manifests/latest",
    b"/v2/anon/.%2e/library/solo/manifests/latest",
    b"/v2/anon/%2e./library/solo/manifests/latest",
    b"/v2/anon/%2e/app/manifests/v1",
    b"/v2/anon/%252e%252e/library/solo/manifests/latest",
    b"/v2/anon%2f..%2flibrary%2fsolo/manifests/latest",
    b"/v2/anon%2Fapp/manifests/v1",
    b"/v2/anon/..%2flibrary/solo/manifests/latest",
    b"/v2/anon/app%2fmanifests%2fv1",
    b"/v2/anon/app/manifests/..%2f..%2f..%2flibrary%2fsolo%2fmanifests%2flatest",
    b"/v2/anon/app/manifests/%2e%2e",
    b"/v2/anon/%5c..%5clibrary/solo/manifests/latest",
    b"/v2/anon/..%5clibrary/solo/manifests/latest",
    b"/v2/anon%5capp/manifests/v1",
    b"/v2/anon\\..\\library\\solo/manifests/latest",
    b"/v2/anon\\app/manifests/v1",
    b"/v2/anon/app/manifests/v1\\..\\..\\latest",
    b"/v2/anon/%c0%ae%c0%ae/library/solo/manifests/latest",
    b"/v2/anon/%e0%80%ae%e0%80%ae/library/solo/manifests/latest",
    b"/v2/anon/\xc0\xae\xc0\xae/library/solo/manifests/latest",
    b"/v2/anon/app\xff/manifests/v1",
    b"/v2/anon/\xed\xa0\x80/manifests/v1",
    b"/v2/anon/\xe2\x80\xaeppa/manifests/v1",
    b"/v2/anon/app%ff/manifests/v1",
    b"/v2/anon/app%00/manifests/v1",
    b"/v2/anon/app/manifests/v1%00",
    b"/v2/anon/app\x00/manifests/v1",
    b"/v2/anon/app/manifests/v1%00/../../../library/solo/manifests/latest",
    b"/v2/anon/app/manifests/../../../library/solo/manifests/latest",
    b"/v2/anon/app/blobs/../../../library/solo/" + SOLO_DIGEST_PATH.encode(),
    b"/v2/anon/app/blobs/sha256:..%2f..%2f" + b"0" * 64,
    b"/v2/anon/app/tags/list/../../../library/solo/tags/list",
    b"/v2/anon/app;/manifests/v1",
    b"/v2/anon/app/manifests/v1;x=../../library",
    b"/v2/anon/app/manifests/v1#/../../library/solo/manifests/latest",
    b"/v2/anon/" + b"a" * 300 + b"/manifests/v1",
    b"/v2/anon/" + b"a/" * 150 + b"x/manifests/v1",
    b"/v2/anon/" + b"a" * 60_000 + b"/manifests/v1",
    b"/v2/anon/App/manifests/v1",
    b"/v2/ANON/APP/manifests/v1",
    b"/v2/anon/-app/manifests/v1",
    b"/v2/anon/app_/manifests/v1",
    b"/v2/anon/a..b/manifests/v1",
    b"/v2/anon/app:1/manifests/v1",
    b"/v2/anon/app/manifests/-bad",
    b"/v2/anon/app/manifests/" + b"t" * 200,
    b"/v2/anon/~app/manifests/v1",
    b"/v2/anon/app@evil/manifests/v1",
    b"/v2/anon/../../../../etc/passwd",
    b"/v2/../v2/library/solo/manifests/latest",
    b"/v2/%2e%2e/v2/library/solo/manifests/latest",
    b"/V2/anon/app/manifests/v1",
    b"/v2/library/solo/manifests/latest",
    b"/v2/platform/app/manifests/v1",
]
# Tricks in the query of a good route: the route is served (inside the mapping), the trick is dropped.
QUERY_TRICKS: list[bytes] = [
    b"/v2/anon/app/tags/list?n=1&last=../../library/solo",
    b"/v2/anon/app/tags/list?n=1%26scope=x&last=%2e%2e",
    b"/v2/anon/app/tags/list?n=1&n=../../x&last=%2F..%2F",
    b"/v2/anon/app/tags/list?last=v1%0d%0aX-Injected:%201",
    b"/v2/anon/app/manifests/v1?ns=../../library&digest=..",
    # An absolute-form target naming another host: served from the mapping's upstream, in origin form.
    b"http://evil.example/v2/anon/app/manifests/v1",
]


def _absolute_form_tricks(up: dict[str, registry.Upstream]) -> list[bytes]:
    anon = up["anonymous"].host.encode()
    return [
        b"http://" + anon + b"/v2/library/solo/manifests/latest",
        b"http://" + anon + b"/v2/anon/../library/solo/manifests/latest",
        b"http://evil.example/v2/library/solo/manifests/latest",
        b"//" + anon + b"/v2/library/solo/manifests/latest",
    ]


def test_path_tricks_never_leave_the_remote_prefix(ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]) -> None:
    """Raw request targets with dot segments, encodings, bad bytes and grammar breakers (with a token
    good for `anon/app` and for the names a trick aims at): a registry 4xx error every time, and no
    upstream ever sees a path outside `/v2/platform/`."""
    tok = token_for(ap, "anon/app", "anon/library/solo", "library/solo", "anon/a/x")
    targets = PATH_TRICKS + _absolute_form_tricks(taps)
    unanswered = []
    for target in targets:
        for method in (b"GET", b"HEAD"):
            headers = [(b"Host", ap.host.encode()), (b"Authorization", f"Bearer {tok}".encode())]
            headers += [(b"Accept", t.encode()) for t in MANIFEST_TYPES]
            answer = raw_exchange(ap, raw_get(ap, target, headers, method), head=method == b"HEAD")
            if answer is None:
                unanswered.append((method, target[:120]))
                continue
            assert answer.status != 200, (method, target[:200], answer.body[:100])
            assert_registry_error(answer.status, answer.body, head=method == b"HEAD")
    # A NUL in the request line is not HTTP: mitmproxy may close without an answer; nothing else may.
    assert all(b"\x00" in t for _, t in unanswered), unanswered
    for target in QUERY_TRICKS:
        headers = [(b"Host", ap.host.encode()), (b"Authorization", f"Bearer {tok}".encode())]
        headers += [(b"Accept", t.encode()) for t in MANIFEST_TYPES]
        answer = raw_exchange(ap, raw_get(ap, target, headers))
        assert answer is not None and answer.status == 200, (target, answer)
        assert b"library" not in answer.body and b"Injected" not in answer.body
        assert answer.header("x-injected") is None
    assert_within_prefixes(taps)
    assert not any("library" in e.path for u in taps.values() for e in u.access_log())
    assert_still_serving(ap)


def test_connect_and_odd_request_forms_are_not_tunnels(
    ap: proxy.ProxyProc, taps: dict[str, registry.Upstream], hostiles: Hostiles
) -> None:
    """CONNECT to an upstream or the trap, OPTIONS *, and absolute-form targets at the trap: the reverse
    proxy never opens a tunnel or a connection of the client's choosing."""
    anon = taps["anonymous"].host.encode()
    trap = hostiles.trap.netloc.encode()
    before = hostiles.trap.accepted
    requests = [
        b"CONNECT " + anon + b" HTTP/1.1\r\nHost: " + anon + b"\r\n\r\n",
        b"CONNECT " + trap + b" HTTP/1.1\r\nHost: " + trap + b"\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: " + ap.host.encode() + b"\r\nConnection: close\r\n\r\n",
        b"GET http://" + trap + b"/v2/ HTTP/1.1\r\nHost: " + trap + b"\r\nConnection: close\r\n\r\n",
        b"GET http://" + trap + b"/token HTTP/1.1\r\nHost: " + trap + b"\r\nConnection: close\r\n\r\n",
    ]
    for data in requests:
        answer = raw_exchange(ap, data)
        if answer is not None:
            assert answer.status != 200 or data.startswith(b"GET http://"), (data, answer)
            assert answer.status < 500, (data, answer)
            if answer.status != 200:
                assert_registry_error(answer.status, answer.body)
    assert hostiles.trap.accepted == before
    assert_within_prefixes(taps)
    assert_still_serving(ap)


# --- 2. scope and token abuse ---------------------------------------------------------------------

SCOPE_ABUSE = [
    "repository:tok/scope-a:push",
    "repository:tok/scope-a:delete",
    "repository:tok/scope-a:push,delete",
    "repository:tok/scope-b:*",
    "repository:tok/scope-c:pull,push,delete,*",
    "repository:tok/scope-d:PULL",
    "repository:tok/scope-e:pull,admin",
    "repository:tok/scope-f:pull:push",
    "repository(plugin):tok/scope-g:push",
    "registry:catalog:*",
    "repository:127.0.0.1:5000/tok/scope-h:pull",
    "repository:localhost:5000/tok/scope-h:pull",
    'repository:tok/scope-i":pull',
    "repository:tok/scope-j';:pull",
    "repository:tok/../platform/app:pull",
    "repository:tok/%2e%2e/app:pull",
    "repository:TOK/SCOPE-K:pull",
    "repository::pull",
    "repository:tok/scope-l",
    "repository:tok/scope-m:",
    f"repository:{CAP_NAME}:push",
    f"repository:{CAP_NAME}:*",
]
CONTROL_PARAMS: list[list[tuple[str, str | int | float | bool | None]]] = [
    [("scope", "repository:tok/app:pull\r\nX-Injected: 1")],
    [("scope", "repository:tok/app:pull\nrepository:anon/app:push")],
    [("service", 'evil"\r\nSet-Cookie: x=1')],
    [("account", "a\x00b"), ("scope", "repository:tok/app:pull")],
    [("scope", "repository:tok/app:pull\x7f")],
]


def test_scope_actions_never_reach_upstream_beyond_pull(
    ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]
) -> None:
    issuers = [u.token_issuer for u in taps.values() if u.token_issuer is not None]
    granted: dict[str, list[str]] = {}
    for scope in SCOPE_ABUSE:
        for how in ("GET", "POST"):
            if how == "GET":
                r = httpx.get(f"{ap.url}/token", params={"scope": scope}, timeout=TIMEOUT)
            else:
                form = {"grant_type": "password", "username": "u", "password": "p", "scope": scope}
                r = httpx.post(f"{ap.url}/token", data=form, timeout=TIMEOUT)
            assert r.status_code == 200, (scope, r.text)
            granted[scope] = [scope]
            tok = r.json()["token"]
            # Whatever was asked for, the token allows no write: PUT/DELETE/POST answer 405 or 401.
            name = scope.split(":")[1] if scope.count(":") >= 2 else "tok/app"
            for method in ("PUT", "DELETE", "POST", "PATCH"):
                w = get(ap, f"/v2/{name}/manifests/v9", tok, method=method, content=b"{}")
                assert w.status_code in (400, 401, 404, 405), (scope, method, w.status_code)
                assert_registry_error(w.status_code, w.content)
    for params in CONTROL_PARAMS:
        r = httpx.get(f"{ap.url}/token", params=params, timeout=TIMEOUT)
        assert_registry_error(r.status_code, r.content, {400})
        assert "\n" not in "".join(f"{k}{v}" for k, v in r.headers.items())
    # The upstream token services were asked for pull and nothing else, for names under the mapping.
    asked = [s for i in issuers for q in i.requests() for s in q.scopes]
    assert asked, "no upstream token request at all"
    for s in asked:
        typ, rest = s.split(":", 1)
        name, actions = rest.rsplit(":", 1)
        assert typ == "repository" and actions == "pull", s
        assert name.startswith("platform/"), s
    # And no request reached a registry with more than pull: nothing but GET/HEAD, nothing outside the prefix.
    for u in taps.values():
        assert {e.method for e in u.access_log()} <= {"GET", "HEAD"}
    assert_within_prefixes(taps)
    assert_still_serving(ap)


def test_mixed_capability_and_namespace_scopes_stay_apart(
    ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]
) -> None:
    """One token request naming the capability mapping and another mapping on the same upstream: each
    upstream token request is for one mapping's repositories, and the token grants nothing else."""
    issuer = taps["token"].token_issuer
    assert issuer is not None
    r = httpx.get(
        f"{ap.url}/token",
        params=[
            ("scope", f"repository:{CAP_NAME}:pull repository:tok/mixed-x:push,pull"),
            ("scope", f"repository:{CAP}/other:pull"),
            ("scope", "repository:anon/app:pull"),
        ],
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    tok = r.json()["token"]
    # (The capability mapping's upstream token may come from the proxy's cache: an earlier test asked.)
    by_request = [tuple(q.scopes) for q in issuer.requests()]
    assert ("repository:platform/mixed-x:pull",) in by_request, by_request
    assert set(by_request) <= {(f"repository:{APP}:pull",), ("repository:platform/mixed-x:pull",)}, by_request
    assert get(ap, f"/v2/{CAP_NAME}/manifests/v1", tok).status_code == 200
    assert get(ap, "/v2/anon/app/manifests/v1", tok).status_code == 200
    assert get(ap, f"/v2/{CAP}/other/manifests/v1", tok).status_code == 404
    for name in ("tok/app", f"{CAP}/app2", "basic/app"):
        r2 = get(ap, f"/v2/{name}/manifests/v1", tok)
        assert r2.status_code == 401 and "insufficient_scope" in r2.headers["www-authenticate"], name
    assert_still_serving(ap)


def _pyseto_token(version: int, purpose: str, payload: dict[str, Any], key: bytes | None = None) -> str:
    if purpose == "public":
        priv = ed25519.Ed25519PrivateKey.generate()
        pem = priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        k = pyseto.Key.new(version=version, purpose="public", key=pem)
    else:
        k = pyseto.Key.new(version=version, purpose="local", key=key or bytes.fromhex(KEY_HEX))
    return pyseto.encode(k, payload, serializer=json, exp=300).decode()


def _forged(payload: dict[str, Any], assertion: bytes | None = ACCESS_ASSERTION, exp: int | None = 300) -> str:
    """A v4.local token made with the proxy's own key (what only a key holder could make)."""
    key = bytes.fromhex(KEY_HEX)
    k = pyseto.Key.new(version=4, purpose="local", key=key)
    kw: dict[str, Any] = {"exp": exp} if exp is not None else {}
    tok = pyseto.encode(
        k, payload, footer={"kid": key_id(key)}, implicit_assertion=assertion or b"", serializer=json, **kw
    )
    return tok.decode()


def test_replayed_forged_and_foreign_tokens_get_401(
    ap: proxy.ProxyProc, taps: dict[str, registry.Upstream], hostiles: Hostiles, make_proxy: Any
) -> None:
    """Tokens replayed on another mapping, repository, domain or proxy; tampered, truncated, other PASETO
    versions and purposes, expired, refresh-as-access, raw upstream JWTs, Basic credentials: 401 with a
    fresh challenge, and the upstream never sees the client's Authorization."""
    good = token_for(ap, "tok/app")
    aud = ap.url
    payload = {"aud": aud, "iat": int(time.time()), "g": [{"m": "tok/", "r": ["tok/app"]}]}
    refresh = httpx.post(
        f"{ap.url}/token", data={"grant_type": "password", "username": "u", "password": "p"}, timeout=TIMEOUT
    ).json()["refresh_token"]
    other_proxy = make_proxy(_config(taps, hostiles, OTHER_KEY_HEX))
    from_other_proxy = token_for(other_proxy, "tok/app")
    upstream_jwt = taps["token"].token([f"repository:{APP}:pull"])
    i = len("v4.local.") + 20
    bad_tokens = {
        "other mapping": token_for(ap, "anon/app"),
        "other repository": token_for(ap, "tok/other"),
        "other domain": token_for(ap, "tok/app", host="images.test"),
        "other proxy key": from_other_proxy,
        "tampered": good[:i] + ("A" if good[i] != "A" else "B") + good[i + 1 :],
        "tampered footer": good[:-4] + ("AAAA" if good[-4:] != "AAAA" else "BBBB"),
        "truncated": good[: len(good) // 2],
        "truncated by one": good[:-1],
        "doubled": good + good,
        "v2.local same key": _pyseto_token(2, "local", payload),
        "v3.local same key": _pyseto_token(3, "local", payload),
        "v4.public": _pyseto_token(4, "public", payload),
        "v4.local other key": _pyseto_token(4, "local", payload, b"\x07" * 32),
        "no implicit assertion": _forged(payload, assertion=None),
        "expired": _forged({**payload, "exp": "2020-01-01T00:00:00+00:00"}, exp=None),
        "refresh as access": refresh,
        "upstream jwt": upstream_jwt,
        "empty": "",
        "garbage": "v4.local.!!!!",
        "huge": "v4.local." + "A" * 70_000,
    }
    forged_claims: dict[str, dict[str, Any]] = {
        "grants not a list": {"aud": aud, "iat": 1, "g": {"m": "tok/"}},
        "names not strings": {"aud": aud, "iat": 1, "g": [{"m": "tok/", "r": [1, 2]}]},
        "mapping not a string": {"aud": aud, "iat": 1, "g": [{"m": ["tok/"], "r": ["tok/app"]}]},
        "audience list": {"aud": [aud], "iat": 1, "g": [{"m": "tok/", "r": ["tok/app"]}]},
        "no audience": {"iat": 1, "g": [{"m": "tok/", "r": ["tok/app"]}]},
        "iat not a number": {"aud": aud, "iat": "x", "g": [{"m": "tok/", "r": ["tok/app"]}]},
        "exp not a date": {"aud": aud, "iat": 1, "g": [], "exp": "soon"},
    }
    for label, claims in forged_claims.items():
        bad_tokens[f"forged: {label}"] = _forged(claims, exp=None if "exp" in claims else 300)
    taps["token"].clear_access_log()
    for label, bad in bad_tokens.items():
        for method in ("GET", "HEAD"):
            r = get(ap, "/v2/tok/app/manifests/v1", bad, method=method)
            assert r.status_code == 401, (label, method, r.status_code)
            assert r.headers["www-authenticate"].startswith(f'Bearer realm="{ap.url}/token"'), label
            if method == "GET":
                assert assert_registry_error(r.status_code, r.content) == "UNAUTHORIZED", label
    for basic in ("Basic " + "cmlnLXVzZXI6cmlnLXBhc3N3b3JkLTE=", "Basic Zm9vOmJhcg==", "Basic", "Digest x", "Bearer"):
        r = get(ap, "/v2/tok/app/manifests/v1", headers={"Authorization": basic})
        assert r.status_code == 401, basic
    # None of that reached the upstream; a good token does, with the upstream's token, not the client's.
    assert taps["token"].access_log() == []
    assert get(ap, "/v2/tok/app/manifests/v1", good).status_code == 200
    seen = [rec.authorization for rec in taps["token"].access_records()]
    assert seen and all(a is not None and a.startswith("Bearer ey") for a in seen), seen
    assert all(good not in (a or "") for a in seen)
    assert_still_serving(ap)


def test_client_authorization_never_goes_upstream(ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]) -> None:
    """Good pulls on every kind, each with the client's token: upstreams see only the mapping's credential."""
    client_tokens = []
    for name in ("anon/app", "basic/app", "tok/app", CAP_NAME, CAP2_NAME):
        tok = token_for(ap, name)
        client_tokens.append(tok)
        r = get(ap, f"/v2/{name}/manifests/v1", tok, headers={"Cookie": "session=1", "X-Registry-Auth": "x"})
        assert r.status_code == 200, (name, r.text)
    basic_header = taps["basic"].basic_auth_header()
    for kind, u in taps.items():
        for rec in u.access_records():
            auth = rec.authorization or ""
            assert not any(t in auth for t in client_tokens), kind
            assert "v4.local" not in auth and rec.header("cookie") is None and rec.header("x-registry-auth") is None
            if kind == "basic" and rec.path != "/v2/":
                assert auth == basic_header
    assert_still_serving(ap)


# --- 3. uploads -----------------------------------------------------------------------------------

UPLOAD_PATHS = [
    "/v2/anon/app/blobs/uploads/",
    "/v2/anon/app/blobs/uploads/abc-123",
    f"/v2/anon/app/blobs/uploads/?digest=sha256:{'0' * 64}",
    "/v2/anon/app/blobs/uploads/?mount=sha256:" + "0" * 64 + "&from=library/solo",
    "/v2/anon/app/manifests/v1",
    f"/v2/{CAP_NAME}/blobs/uploads/",
    f"/v2/{CAP_NAME}/manifests/v1",
    "/v2/tok/app/blobs/uploads/",
]


def test_small_uploads_and_writes_are_refused(ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]) -> None:
    tokens = {p: token_for(ap, p.split("/blobs/")[0].split("/manifests/")[0][len("/v2/") :]) for p in UPLOAD_PATHS}
    for path in UPLOAD_PATHS:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for tok in (tokens[path], None):
                r = get(ap, path, tok, method=method, content=b"x" * 1000)
                want = {405} if tok else {401}
                assert_registry_error(r.status_code, r.content, want)
    for u in taps.values():
        assert {e.method for e in u.access_log()} <= {"GET", "HEAD"}
    assert_still_serving(ap)


def _vm_kb(rp: proxy.ProxyProc, field: str) -> int:
    status = Path(f"/proc/{rp.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


STREAMED_UPLOADS = [
    ("PATCH", "/v2/anon/app/blobs/uploads/abc", "length", True),
    ("PATCH", "/v2/anon/app/blobs/uploads/abc", "chunked", True),
    ("POST", "/v2/anon/app/blobs/uploads/", "chunked", True),
    ("PUT", f"/v2/anon/app/blobs/uploads/abc?digest=sha256:{'0' * 64}", "chunked", False),
    ("PATCH", "/v2/anon/app/blobs/uploads/abc", "expect", True),
    ("POST", "/token", "length", False),
    ("POST", "/token", "chunked", False),
    ("PUT", "/v2/nothing/here/manifests/v1", "chunked", False),
]


@pytest.mark.parametrize(("method", "path", "framing", "authorized"), STREAMED_UPLOADS)
def test_streamed_upload_is_refused_unread(
    ap: proxy.ProxyProc, method: str, path: str, framing: str, authorized: bool
) -> None:
    """A multi-GB body (4 GiB declared, or chunked without end) to the pull-only proxy: the connection
    is closed (or answered) without the body being read, and the proxy's memory stays flat."""
    rss_before = _vm_kb(ap, "VmRSS")
    tok = token_for(ap, "anon/app")
    head = f"{method} {path} HTTP/1.1\r\nHost: {ap.host}\r\nContent-Type: application/octet-stream\r\n"
    if authorized:
        head += f"Authorization: Bearer {tok}\r\n"
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n"
    else:
        head += f"Content-Length: {4 << 30}\r\n"
    if framing == "expect":
        head += "Expect: 100-continue\r\n"
    chunk = b"\0" * (1 << 20)
    piece = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if framing == "chunked" else chunk
    sent = 0
    with socket.create_connection(("127.0.0.1", ap.port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n")
        # The refusal comes on the head alone: the connection is closed (or answered, then closed),
        # never a "100 Continue" inviting the body.
        answer = b""
        while chunk_in := s.recv(65536):
            answer += chunk_in
        assert not answer.startswith(b"HTTP/1.1 100"), answer[:200]
        # Whatever is sent after that is not taken in: at most what the kernel buffers before the
        # connection is reset or stops accepting (a few MiB), never the 256 MiB offered.
        s.settimeout(2)
        try:
            while sent < (256 << 20):
                s.sendall(piece)
                sent += len(chunk)
        except OSError:
            pass
    assert sent < (64 << 20), f"{sent >> 20} MiB were taken in"
    rss_after = _vm_kb(ap, "VmRSS")
    assert rss_after - rss_before < 64 * 1024, f"RSS {rss_before} -> {rss_after} kB"
    assert _vm_kb(ap, "VmHWM") < 250 * 1024
    assert_still_serving(ap)


# --- 4. enumeration -------------------------------------------------------------------------------


def _twin(guess: str) -> str:
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


def _one_off(key: str, i: int) -> str:
    return key[:i] + ("0" if key[i] != "0" else "1") + key[i + 1 :]


ALMOST_RIGHT = [
    *(f"{_one_off(CAP, i)}/app" for i in (0, 9, 20, len(CAP) - 1)),
    f"{CAP[:-1]}/app",
    f"{CAP[:8]}/app",
    f"{CAP}0/app",
    f"{CAP}/app0",
    f"{CAP}/ap",
    f"{CAP}/app/x",
    CAP,
    f"{CAP.replace('-', '')}/app",
    f"{CAP.upper()}/app",
    f"{CAP}/APP",
    f"x/{CAP}/app",
    *(f"{_one_off(CAP2, i)}/app" for i in (0, len(CAP2) - 1)),
    f"{CAP2[:-1]}/app",
    f"{CAP2}a/app",
    f"{CAP2.upper()}/app",
]


def _comparable(
    r: httpx.Response, name: str, rp: proxy.ProxyProc | None = None
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers (but Date) with the name replaced, and the proxy's address when given."""

    def norm(text: str) -> str:
        text = text.replace(name, "NAME")
        return text.replace(rp.host, "PROXY") if rp is not None else text

    headers = sorted((k, norm(v)) for k, v in r.headers.items() if k != "date")
    return r.status_code, norm(r.content.decode("latin-1")).encode("latin-1"), headers


@pytest.mark.parametrize("root", [False, True], ids=["keys", "keys-and-root"])
def test_almost_right_capability_keys_learn_nothing(
    request: pytest.FixtureRequest, ap: proxy.ProxyProc, taps: dict[str, registry.Upstream], root: bool
) -> None:
    """Each almost-right key gets exactly the answers a random name of the same shape gets: on the
    route without a token, with a token, and from the token endpoint. With a root mapping both go to
    its upstream, except a name that holds a key whole (`KEY/ap`, `x/KEY/app`): that one is never
    forwarded, and gets exactly what it gets from a proxy without a root mapping."""
    rp = enumeration_proxy(request, root)
    c = httpx.Client(timeout=TIMEOUT)
    forwarded: set[str] = set()
    for guess in ALMOST_RIGHT:
        # What the guess is compared with: a random name of its shape on the same proxy, or itself without root.
        other, other_rp = (guess, ap) if root and holds_a_key(guess) else (_twin(guess), rp)
        if root and not holds_a_key(guess):
            forwarded |= {guess, other}
        ta, tb = token_for(rp, guess), token_for(other_rp, other)
        for suffix in ("manifests/v1", "tags/list", f"blobs/sha256:{'a' * 64}"):
            for method in ("GET", "HEAD"):
                a = _comparable(get(rp, f"/v2/{guess}/{suffix}", method=method, client=c), guess, rp)
                b = _comparable(get(other_rp, f"/v2/{other}/{suffix}", method=method, client=c), other, other_rp)
                assert a == b, (guess, method, a, b)
                assert a[0] in (400, 401, 404)
                a2 = _comparable(get(rp, f"/v2/{guess}/{suffix}", ta, method=method, client=c), guess, rp)
                b2 = _comparable(get(other_rp, f"/v2/{other}/{suffix}", tb, method=method, client=c), other, other_rp)
                assert a2 == b2, (guess, method, a2, b2)
                # distribution answers HEAD on a tags list 405, forwarded from the root's upstream.
                assert a2[0] in ((400, 404, 405) if root else (400, 404)), (guess, a2)
        ra = c.get(f"{rp.url}/token", params={"scope": f"repository:{guess}:pull"})
        rb = c.get(f"{other_rp.url}/token", params={"scope": f"repository:{other}:pull"})
        assert ra.status_code == rb.status_code == 200
        ja, jb = ra.json(), rb.json()
        assert sorted(ja) == sorted(jb) and ja["expires_in"] == jb["expires_in"]
        assert len(ja["token"]) == len(jb["token"]), guess
    c.close()
    # No guess made the proxy ask any upstream anything, but the root's upstream about names that hold no key.
    for kind, u in taps.items():
        asked = {e.path.split("?")[0] for e in u.access_log()} - {"/v2/"}
        if kind == ROOT_KIND and root:
            assert asked and all(any(path.startswith(f"/v2/{n}/") for n in forwarded) for path in asked), asked
            assert not any(holds_a_key(path) for path in asked), asked
        else:
            assert not asked, (kind, asked)
    assert all(u.token_issuer is None or u.token_issuer.requests() == [] for u in taps.values())
    assert_still_serving(rp)


@pytest.mark.parametrize("root", [False, True], ids=["keys", "keys-and-root"])
def test_catalog_tags_and_headers_never_leak_keys_or_upstreams(
    request: pytest.FixtureRequest, upstreams: dict[str, registry.Upstream], root: bool
) -> None:
    """/v2/_catalog lists nothing; answers about other names never carry a capability key; answers about
    a capability mapping never name its upstream host or repository, in bodies of errors or in Link,
    Location and WWW-Authenticate. With a root mapping the same, and `?ns=` neither lists anything nor
    reaches a capability mapping."""
    ap = enumeration_proxy(request, root)
    for u in upstreams.values():
        u.clear_access_log()
    any_tok = token_for(ap, "anon/app")
    for tok in (None, any_tok):
        for q in ("", "?n=1000", "?n=1&last=a", "?last=" + CAP):
            r = get(ap, f"/v2/_catalog{q}", tok)
            if tok is None:
                assert r.status_code == 401 and CAP not in r.headers["www-authenticate"]
            else:
                assert r.status_code == 200 and r.json() == {"repositories": []}
            assert CAP.encode() not in r.content and CAP2.encode() not in r.content
    leaks_upstream = [u.host for u in upstreams.values()] + [
        f"{APP}",
        "platform",
        "rig-token",
        "rig-redirect",
    ]
    answers: list[httpx.Response] = []
    cap_tok = token_for(ap, CAP_NAME, CAP2_NAME)
    codec = TokenCodec((bytes.fromhex(KEY_HEX),))
    stale = codec.issue_access(ap.url, (Grant(CAP_NAME, (CAP_NAME,), "not-an-upstream-token"),), 60)
    for name in (CAP_NAME, CAP2_NAME):
        answers += [
            get(ap, f"/v2/{name}/tags/list?n=1", cap_tok),
            get(ap, f"/v2/{name}/manifests/nope", cap_tok),
            get(ap, f"/v2/{name}/manifests/nope", cap_tok, method="HEAD"),
            get(ap, f"/v2/{name}/blobs/sha256:{'0' * 64}", cap_tok),
            get(ap, f"/v2/{name}/manifests/v1"),
            get(ap, f"/v2/{name}/manifests/v1", cap_tok, method="PUT", content=b"{}"),
        ]
    answers.append(get(ap, f"/v2/{CAP_NAME}/manifests/v1", stale))  # the upstream answers 401: rewritten
    manifest = get(ap, f"/v2/{CAP2_NAME}/manifests/v1", cap_tok, headers={"Accept": MANIFEST_TYPES[0]}).json()
    blob = get(ap, f"/v2/{CAP2_NAME}/blobs/{manifest['layers'][0]['digest']}", cap_tok)
    assert blob.status_code == 307
    answers.append(blob)
    link = answers[0].headers.get("link")
    assert link is not None and link.startswith(f"</v2/{CAP_NAME}/tags/list?"), link
    assert answers[0].json()["name"] == CAP_NAME
    for r in answers:
        shown = " ".join(f"{k}: {v}" for k, v in r.headers.items())
        body = r.content.decode("latin-1") if r.status_code >= 400 or "tags/list" in str(r.url) else ""
        for leak in leaks_upstream:
            assert leak not in shown and leak not in body, (str(r.url).replace(CAP, "<cap>"), leak, shown)
    # Answers about other names never carry a capability key.
    for path in ("/v2/", "/v2/anon/app/manifests/v1", "/v2/nothing/here/manifests/v1", "/v2/anon/app/tags/list?n=1"):
        for tok in (None, any_tok, cap_tok):
            r = get(ap, path, tok)
            text = " ".join(f"{k}: {v}" for k, v in r.headers.items()) + r.content.decode("latin-1")
            assert CAP not in text and CAP2 not in text, path
    if root:
        r = httpx.get(
            f"{ap.url}/ns/docker.io/token", params={"scope": [f"repository:{n}:pull" for n in (CAP_NAME, CAP2_NAME)]}
        )
        ns_tok = r.json()["token"]
        assert get(ap, "/v2/_catalog?ns=docker.io", ns_tok).json() == {"repositories": []}
        for name in (CAP_NAME, CAP2_NAME):
            r = get(ap, f"/v2/{name}/manifests/v1?ns=docker.io", ns_tok)
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    # Capability keys reached no upstream but their own mapping's, and never inside another name.
    for kind, u in upstreams.items():
        for e in u.access_log():
            assert CAP not in e.path and CAP2 not in e.path, (kind, e)
    assert_still_serving(ap)


TIMING_SAMPLES = 300


def test_capability_lookup_time_does_not_depend_on_a_right_prefix(ap: proxy.ProxyProc) -> None:
    """Interleaved requests for a guess that shares all but the last character of the key and for a
    random key: the right-prefix guess is not measurably slower (medians of 300 samples each)."""
    near = f"{CAP[:-1]}{'0' if CAP[-1] != '0' else '1'}/app"
    far = f"{uuid.UUID(int=random.Random(7).getrandbits(128))}/app"
    tokens = {near: token_for(ap, near), far: token_for(ap, far)}
    samples: dict[str, list[float]] = {near: [], far: []}
    order = random.Random(11)
    with httpx.Client(base_url=ap.url, timeout=TIMEOUT) as c:
        for name in (near, far):  # warm up the connection and the proxy's token cache
            for _ in range(10):
                c.get(f"/v2/{name}/manifests/v1", headers={"Authorization": f"Bearer {tokens[name]}"})
        for _ in range(TIMING_SAMPLES):
            pair = [near, far]
            order.shuffle(pair)
            for name in pair:
                started = time.perf_counter()
                r = c.get(f"/v2/{name}/manifests/v1", headers={"Authorization": f"Bearer {tokens[name]}"})
                samples[name].append(time.perf_counter() - started)
                assert r.status_code == 404
    m_near, m_far = statistics.median(samples[near]), statistics.median(samples[far])
    print(f"median right-prefix {m_near * 1000:.3f} ms, random {m_far * 1000:.3f} ms")
    assert m_near <= m_far * 1.2 + 0.001, (m_near, m_far)
    assert_still_serving(ap)


# --- 5. malicious upstreams -----------------------------------------------------------------------


def test_hostile_realms_never_get_the_operators_credentials(ap: proxy.ProxyProc, hostiles: Hostiles) -> None:
    """Upstreams whose challenge points the token request at another host, a private or loopback
    address in disguise, a non-http scheme, through a redirect, or (learned later) on a live 401:
    the client gets a clean registry error and the trap never sees a connection."""
    trap = hostiles.trap
    basic = "Basic " + __import__("base64").b64encode(f"{OPERATOR_USER}:{OPERATOR_PASSWORD}".encode()).decode()
    for case in REALM_CASES:
        name = f"evr-{case.id}/app"
        started = time.monotonic()
        r = httpx.get(f"{ap.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=TIMEOUT)
        assert time.monotonic() - started < 10, case.id
        assert r.status_code == case.expect, (case.id, r.status_code, r.text)
        if case.expect != 200:
            assert assert_registry_error(r.status_code, r.content, {502}) == "UNAVAILABLE", case.id
            assert OPERATOR_PASSWORD not in r.text and "localhost" not in r.text
            continue
        tok = r.json()["token"]
        m = get(ap, f"/v2/{name}/manifests/v1", tok)
        assert_registry_error(m.status_code, m.content, {401, 404})
        if case.live is not None:
            # The upstream's live 401 pointed elsewhere: the next token request must not follow it.
            again = httpx.get(f"{ap.url}/token", params={"scope": f"repository:evr-{case.id}/b:pull"}, timeout=TIMEOUT)
            assert assert_registry_error(again.status_code, again.content, {502}) == "UNAVAILABLE"
    assert trap.accepted == 0, trap.connections()
    # The operator's credentials went to hostile servers only as their own token path (on their own host)
    # or, for a Basic upstream, as the registry's own credentials; otherwise only the upstream's own token.
    for case_id, server in hostiles.realms.items():
        for req in server.requests():
            if req.authorization is None:
                continue
            if req.authorization == basic:
                assert req.path.startswith("/token") or case_id == "basic-first", (case_id, req.path)
            else:
                assert req.authorization == "Bearer hostile-upstream-token", case_id
    assert_still_serving(ap)


def test_malformed_oversized_and_slow_token_answers_are_refused(ap: proxy.ProxyProc, hostiles: Hostiles) -> None:
    """A token service on the upstream's own host (a realm the proxy uses) answering garbage: each is a
    registry error (502, or 504 for the slow ones) in bounded time, memory stays flat, and the
    proxy goes on serving."""
    rss_before = _vm_kb(ap, "VmRSS")
    for case in TOKEN_ANSWERS:
        started = time.monotonic()
        r = httpx.get(f"{ap.url}/token", params={"scope": f"repository:evt/{case}:pull"}, timeout=TIMEOUT)
        elapsed = time.monotonic() - started
        want = 504 if case in TIMEOUT_CASES else 502
        assert r.status_code == want, (case, r.status_code, r.text, f"{elapsed:.1f}s")
        assert assert_registry_error(r.status_code, r.content, {want}) == "UNAVAILABLE", case
        assert elapsed < 8, (case, elapsed)
        assert "hostile-upstream-token" not in r.text and "trap" not in r.text
    assert hostiles.trap.accepted == 0
    # A good answer from the same service still works.
    assert token_for(ap, "evt/fine")
    assert _vm_kb(ap, "VmRSS") - rss_before < 64 * 1024
    assert_still_serving(ap)


def test_huge_ping_body_is_not_read(ap: proxy.ProxyProc, hostiles: Hostiles) -> None:
    """An upstream answering its /v2/ challenge with a 1 GiB body: the proxy reads the challenge only."""
    rss_before = _vm_kb(ap, "VmRSS")
    started = time.monotonic()
    r = httpx.get(f"{ap.url}/token", params={"scope": "repository:evping/app:pull"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 8
    assert _vm_kb(ap, "VmRSS") - rss_before < 64 * 1024
    assert [q.path.split("?")[0] for q in hostiles.huge_ping.requests()] == ["/v2/", "/token"]
    assert_still_serving(ap)


# --- 6. Host and X-Forwarded-* spoofing -----------------------------------------------------------

PUBLIC_URL = "https://reg.example.test"
SPOOFED_HEADERS: list[list[tuple[str, str]]] = [
    [("Host", "evil.example")],
    [("Host", "evil.example:443")],
    [("Host", "reg.example.test.evil.example")],
    [("Host", "images.test.evil.example")],
    [("Host", "evil.example/images.test")],
    [("Host", "images.test@evil.example")],
    [("Host", "images.test:80@evil.example")],
    [("Host", 'evil.example"')],
    [("Host", "evil.example,images.test")],
    [("Host", "[::1]:443")],
    [("Host", "a" * 300)],
    [("X-Forwarded-Host", "evil.example")],
    [("X-Forwarded-Host", "images.test")],
    [("X-Forwarded-Proto", "http")],
    [("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "8443")],
    [("Forwarded", "host=evil.example;proto=http")],
    [("Forwarded", 'for=1.2.3.4;host="images.test"')],
    [("X-Real-IP", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.1")],
    [("X-Original-URL", "/v2/library/solo/manifests/latest"), ("X-Rewrite-URL", "/v2/library/solo/manifests/latest")],
    [("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "http"), ("Forwarded", "host=evil.example")],
    [("Host", "evil.example"), ("X-Forwarded-Host", "images.test")],
    [("Host", "images.test"), ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "http")],
]
ALLOWED_REALMS = {f"{PUBLIC_URL}/token", "https://images.test/token"}


@pytest.fixture
def public_proxy(make_proxy: Any, upstreams: dict[str, registry.Upstream]) -> proxy.ProxyProc:
    config = {
        "secretkey": KEY_HEX,
        "public_url": PUBLIC_URL,
        "proxies": {
            "anon/": {"registry": upstreams["anonymous"].url, "remote": "platform"},
            "dom/": {"registry": upstreams["anonymous"].url, "remote": "platform", "hosts": ["images.test"]},
        },
    }
    p: proxy.ProxyProc = make_proxy(config)
    return p


def _realm(challenge: str) -> str:
    assert challenge.startswith('Bearer realm="'), challenge
    return challenge.split('"', 2)[1]


def test_spoofed_host_and_forwarded_headers_change_no_realm(
    public_proxy: proxy.ProxyProc, taps: dict[str, registry.Upstream]
) -> None:
    """With public_url set, no Host or X-Forwarded-*/Forwarded header moves the realm off the configured
    names (the public URL, or a `hosts:` domain when that is the Host)."""
    rp = public_proxy
    for headers in SPOOFED_HEADERS:
        for path in ("/v2/", "/v2/anon/app/manifests/v1", "/v2/dom/app/manifests/v1", "/v2/_catalog"):
            data = raw_get(
                rp,
                path.encode(),
                [(k.encode(), v.encode()) for k, v in headers]
                if any(k == "Host" for k, _ in headers)
                else [(b"Host", rp.host.encode())] + [(k.encode(), v.encode()) for k, v in headers],
            )
            a = raw_exchange(rp, data)
            assert a is not None, headers
            assert_registry_error(a.status, a.body, {400, 401})
            if a.status == 401:
                realm = _realm(a.header("www-authenticate") or "")
                assert realm in ALLOWED_REALMS, (headers, realm)
                host = next((v for k, v in headers if k == "Host"), "")
                if realm != f"{PUBLIC_URL}/token":
                    assert host == "images.test", (headers, realm)
        r = httpx.get(
            f"{rp.url}/token",
            params={"scope": "repository:anon/app:pull"},
            headers=[(k, v) for k, v in headers if k != "Host" or ('"' not in v and len(v) < 256)],
            timeout=TIMEOUT,
        )
        assert r.status_code in (200, 400), (headers, r.status_code)
    # Only the token endpoint's discovery ping reached an upstream: no spoofed request was routed.
    assert all(e.path == "/v2/" for u in taps.values() for e in u.access_log())
    tok = token_for(rp, "anon/app")
    assert get(rp, "/v2/anon/app/manifests/v1", tok, headers={"X-Forwarded-Host": "evil.example"}).status_code == 200
    assert_still_serving_public(rp)


def test_hosts_mapping_answers_only_its_own_domain(
    public_proxy: proxy.ProxyProc, taps: dict[str, registry.Upstream]
) -> None:
    """`dom/` serves images.test only: Host spoofing, X-Forwarded-Host and tokens moved between domains
    never reach it from another name."""
    rp = public_proxy
    right = {"Host": "images.test"}
    dom_tok = token_for(rp, "dom/app", host="images.test")
    assert get(rp, "/v2/dom/app/manifests/v1", dom_tok, headers=right).status_code == 200
    taps["anonymous"].clear_access_log()
    attempts = [
        ({"Host": "evil.example", "X-Forwarded-Host": "images.test"}, dom_tok, {401}),
        ({"Host": rp.host, "Forwarded": "host=images.test"}, dom_tok, {401}),
        ({"Host": "images.test.evil.example"}, dom_tok, {401}),
        ({"Host": "IMAGES.TEST.", "X-Forwarded-Host": "images.test"}, dom_tok, {401}),
    ]
    spoofed = token_for(rp, "dom/app", host="evil.example")
    attempts += [
        ({"Host": "evil.example"}, spoofed, {404}),
        ({"Host": "evil.example", "X-Forwarded-Host": "images.test"}, spoofed, {404}),
        ({"Host": "images.test"}, spoofed, {401}),
        ({"Host": rp.host}, token_for(rp, "dom/app"), {404}),
    ]
    for headers, tok, want in attempts:
        r = get(rp, "/v2/dom/app/manifests/v1", tok, headers=headers)
        assert_registry_error(r.status_code, r.content, want)
    assert taps["anonymous"].access_log() == []
    assert_still_serving_public(rp)


def assert_still_serving_public(rp: proxy.ProxyProc) -> None:
    assert_still_serving(rp)
