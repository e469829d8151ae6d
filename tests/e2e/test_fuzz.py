"""A bounded, deterministic fuzz of the proxy with hostile requests, over raw sockets and httpx.

One mitmdump serves the module (a namespace mapping onto the anonymous upstream, a capability
mapping onto the token upstream). `FUZZ_REQUESTS` (default 400) random requests are built from
registry path pieces and hostile pieces (dot segments, encoded slashes and backslashes, NUL,
overlong and non-ASCII names, invalid UTF-8, odd query strings, CRLF attempts), random methods,
headers (forged, truncated, foreign and other-name tokens, Host spoofing, X-Forwarded-*, huge
values, Range garbage) and small bodies; `FUZZ_SEED` picks the sequence. Every answer must come
within 10 s, carry an expected status, and (unless HEAD) a registry JSON error body when it is an
error. Afterwards the proxy must still run, have logged no traceback, and still serve a pull.
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from rig import proxy, registry
from rig.keys import CAP
from rig.standard import APP

pytestmark = pytest.mark.e2e

KEY_HEX = "3c" * 16 + "e1" * 16
CAP_NAME = f"{CAP}/app"
TIMEOUT = 10.0
N_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "400"))
SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
ALLOWED = {200, 206, 307, 400, 401, 403, 404, 405, 413, 416, 502, 504}
BIG_BODY = 64 * 1024
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]


@pytest.fixture(scope="module")
def fp(upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[proxy.ProxyProc]:
    tok = upstreams["token"]
    config: dict[str, Any] = {
        "secretkey": KEY_HEX,
        "upstream_timeout": 3,
        "proxies": {
            "anon/": {"registry": upstreams["anonymous"].url, "remote": "platform"},
            CAP_NAME: {"registry": tok.url, "remote": APP, "username": tok.username, "password": tok.password},
        },
    }
    p = proxy.start_proxy(config, tmp_path_factory.mktemp("fuzz"))
    yield p
    p.stop()


def token_for(rp: proxy.ProxyProc, name: str) -> str:
    r = httpx.get(f"{rp.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


# --- raw HTTP/1.1 -------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class NoAnswer(Exception):
    """The connection was closed (or reset) before a complete response head arrived."""


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while True:
        i = buf.find(marker)
        if i >= 0:
            return i
        chunk = sock.recv(65536)
        if not chunk:
            raise NoAnswer(bytes(buf[:200]))
        buf += chunk


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise NoAnswer(f"body cut short: {len(buf)} of {n}")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def raw_exchange(rp: proxy.ProxyProc, data: bytes, head: bool) -> Answer:
    """Send `data` (one request, `Connection: close`) and read one response, skipping 1xx."""
    with socket.create_connection(("127.0.0.1", rp.port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may close early; an answer may still be waiting
        buf = bytearray()
        try:
            while True:
                end = _read_until(sock, buf, b"\r\n\r\n")
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                parts = lines[0].split(" ", 2)
                assert parts[0].startswith("HTTP/1."), lines[0]
                status = int(parts[1])
                headers = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
                if 100 <= status < 200:
                    continue
                break
            hd = dict(headers)
            if head or status in (204, 304):
                body = b""
            elif "chunked" in hd.get("transfer-encoding", "").lower():
                body = b""
                while True:
                    end = _read_until(sock, buf, b"\r\n")
                    size = int(bytes(buf[:end]).split(b";")[0], 16)
                    del buf[: end + 2]
                    if size == 0:
                        break
                    body += _read_exact(sock, buf, size)
                    _read_exact(sock, buf, 2)
            elif "content-length" in hd:
                body = _read_exact(sock, buf, int(hd["content-length"]))
            else:
                while chunk := sock.recv(65536):
                    buf += chunk
                body = bytes(buf)
        except ConnectionResetError as e:
            raise NoAnswer(f"reset: {e}") from e
        return Answer(status, headers, body)


# --- generation ---------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    via: str  # "raw" or "httpx"
    method: str
    path: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    malformed: bool = False  # mitmproxy may refuse it as bad HTTP (closing is then allowed)

    @property
    def big_body(self) -> bool:
        return self.chunked or len(self.body) > BIG_BODY

    def raw(self) -> bytes:
        out = self.method.encode("latin-1") + b" " + self.path + b" HTTP/1.1\r\n"
        for k, v in self.headers:
            out += k + b": " + v + b"\r\n"
        if self.chunked:
            out += b"Transfer-Encoding: chunked\r\n"
        elif self.body or self.method in ("POST", "PUT", "PATCH"):
            out += b"Content-Length: " + str(len(self.body)).encode() + b"\r\n"
        out += b"Connection: close\r\n\r\n"
        if self.chunked:
            out += f"{len(self.body):x}\r\n".encode() + self.body + b"\r\n0\r\n\r\n" if self.body else b"0\r\n\r\n"
        else:
            out += self.body
        return out


METHODS = ["GET", "GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
GARBAGE_METHODS = ["get", "FOO", "CONNECT", "TRACE", "PROPFIND", "G3T", "X" * 40, "BREW", "M-SEARCH"]
NAMES = [
    "anon/app",
    "anon/many",
    "anon/nope",
    CAP_NAME,
    CAP_NAME.upper(),
    CAP + "/other",
    CAP[:-1] + "0/app",
    "ANON/APP",
    "nope/x",
    "anon",
    "anon/",
    "anon//app",
    "anon/./app",
    "anon/../anon/app",
    "anon/%2e%2e/app",
    "anon%2fapp",
    "anon/app%00",
    "anon\\app",
    "anon%5capp",
    "anon/äpp",
    "anon/" + "a" * 300,
    "/".join(["a"] * 200),
    "anon/app/" + "x/" * 40 + "y",
    "anon/-app",
    "anon/app_",
    "anon/a..b",
]
REFS = [
    "v1",
    "v2s2",
    "multi",
    "latest",
    "V1",
    "sha256:" + "0" * 64,
    "sha256:" + "z" * 64,
    "sha256:abc",
    "sha512:" + "a" * 128,
    "..",
    "%2e%2e",
    "v1%00",
    "v1%2f..",
    "t" * 300,
    "-bad",
    "",
    "v1?x",
    "%ff%fe",
]
HOSTILE = ["..", "%2e%2e", "%2E%2e", "%2f", "%2F", "%5c", "\\", "//", "%00", ".", "%", "%zz", "~", ";", "@", "ü", "🐳"]
TOKEN_PATHS = ["/token", "/token/", "/TOKEN", "/v2/token", "/token/..", "/token%00", "//token"]


def _query(r: random.Random) -> str:
    keys = ["n", "last", "scope", "service", "grant_type", "account", "client_id", "refresh_token", "offline_token"]
    vals = [
        "",
        "-1",
        "0",
        "99999999999999999999",
        "abc",
        "1e3",
        "repository:anon/app:pull",
        "repository:anon/app:pull,push,delete,*",
        f"repository:{CAP_NAME}:*",
        "repository:../etc:pull",
        "repository:anon/app",
        "repository::pull",
        "registry:catalog:*",
        "repository:anon/app:pull repository:nope/x:pull",
        "%0d%0aSet-Cookie:%20x=1",
        "x%0d%0aLocation:%20http://evil",
        "%00",
        "%ff",
        "password",
        "refresh_token",
        "authorization_code",
        "a" * 3000,
        "reg.example.com",
        "127.0.0.1",
    ]
    n = r.randint(1, 6)
    parts = []
    for _ in range(n):
        k = r.choice(keys) if r.random() < 0.9 else r.choice(["", "=", "&&", "scope[]", "%73cope", "SCOPE"])
        parts.append(f"{k}={r.choice(vals)}" if r.random() < 0.9 else k)
    return "?" + "&".join(parts)


def _path(r: random.Random) -> tuple[str, bool]:
    """A request target and whether it is a token-endpoint request."""
    name = r.choice(NAMES)
    ref = r.choice(REFS)
    kind = r.randrange(12)
    is_token = False
    if kind == 0:
        p = "/v2/"
    elif kind == 1:
        p = r.choice(["/v2/_catalog", "/v2/_catalog/", "/v2/_CATALOG", "/v2//_catalog", "/v2"])
    elif kind in (2, 3, 4):
        p = f"/v2/{name}/manifests/{ref}"
    elif kind == 5:
        p = f"/v2/{name}/blobs/{ref}"
    elif kind == 6:
        p = f"/v2/{name}/tags/list"
    elif kind == 7:
        p = f"/v2/{name}/blobs/uploads/" + r.choice(["", "abc", "../x"])
    elif kind in (8, 9):
        p = r.choice(TOKEN_PATHS)
        is_token = True
    elif kind == 10:
        p = r.choice(["/", "/v1/", "/v2/../v2/", "/v3/", "/favicon.ico", "/.well-known/x", "*", "/" + "z" * 5000])
    else:
        segs = ["v2"] + [r.choice(HOSTILE + name.split("/") + ["manifests", "blobs", ref]) for _ in range(5)]
        p = "/" + "/".join(segs)
    if r.random() < 0.25:  # splice a hostile piece somewhere
        i = r.randrange(1, len(p) + 1)
        p = p[:i] + r.choice(HOSTILE) + p[i:]
    if r.random() < 0.1:
        p = p.upper()
    if is_token or r.random() < 0.3:
        p += _query(r)
    return p, is_token


def _auth(r: random.Random, tokens: dict[str, str]) -> bytes:
    good = r.choice(list(tokens.values()))
    choice = r.randrange(12)
    if choice == 0:
        return (
            b"Bearer " + "".join(r.choices(string.ascii_letters + string.digits + "-_.", k=r.randint(0, 200))).encode()
        )
    if choice == 1:
        return b"Bearer " + good[: r.randint(0, len(good) - 1)].encode()
    if choice == 2:
        return b"Bearer v2.local." + r.randbytes(60).hex().encode()
    if choice == 3:
        return b"Bearer v4.public." + r.randbytes(60).hex().encode()
    if choice == 4:
        return b"Bearer v4.local." + r.randbytes(r.randint(0, 120)).hex().encode()
    if choice == 5:  # flip one character of a real token
        i = r.randrange(len("v4.local."), len(good))
        return b"Bearer " + (good[:i] + ("A" if good[i] != "A" else "B") + good[i + 1 :]).encode()
    if choice == 6:
        return b"Basic " + r.choice([b"", b"Zm9vOmJhcg==", b"!!!", b"dXNlcjo=" * 500])
    if choice == 7:
        return r.choice([b"Bearer", b"Bearer ", b"bearer " + good.encode(), b"Bearer  " + good.encode(), b"Token x"])
    if choice == 8:
        return b"Bearer " + good.encode() + b"," + good.encode()
    return b"Bearer " + good.encode()  # a real token, maybe for another name than the path's


def _headers(r: random.Random, tokens: dict[str, str], raw: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
    hs: list[tuple[bytes, bytes]] = []
    malformed = False
    host = r.choice([b"127.0.0.1", b"images.test", b"evil.example", b"reg.example.com:443", b"a" * 300, b""])
    if raw and r.random() < 0.05:
        pass  # no Host at all
    else:
        hs.append((b"Host", host))
    if r.random() < 0.7:
        hs.append((b"Authorization", _auth(r, tokens)))
    if r.random() < 0.1:
        hs.append((b"Authorization", _auth(r, tokens)))
    for t in r.sample(MANIFEST_TYPES, r.randint(0, len(MANIFEST_TYPES))):
        hs.append((b"Accept", t.encode()))
    if r.random() < 0.1:
        hs.append((b"Accept", b"*/*, text/html;q=0.1, " + b"x/y," * r.randint(0, 500)))
    if r.random() < 0.3:
        hs.append(
            (
                b"Range",
                r.choice(
                    [
                        b"bytes=0-9",
                        b"bytes=10-",
                        b"bytes=-5",
                        b"bytes=9-0",
                        b"bytes=abc",
                        b"bytes=0-1,3-4",
                        b"items=1-2",
                    ]
                    + [b"bytes=99999999999999999999-", b"", b"bytes=" + b"1-2," * 2000]
                ),
            )
        )
    if r.random() < 0.3:
        for k in r.sample([b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Forwarded"], 2):
            hs.append((k, r.choice([b"evil.example", b"https", b"127.0.0.1, 10.0.0.1", b"for=x;host=y", b"%0d%0a"])))
    if r.random() < 0.1:
        hs.append((b"X-Huge", b"h" * r.randint(1024, 16 * 1024)))
    if r.random() < 0.1:
        hs.append((b"Cookie", b"session=" + r.randbytes(8).hex().encode()))
    if raw and r.random() < 0.08:
        malformed = True
        hs.append(
            r.choice(
                [
                    (b"Bad Header", b"x"),
                    (b"X-Bin", b"\xff\xfe\x00"),
                    (b"X-Inject", b"a\r\nEvil: 1"),
                    (b"Content-Length", b"abc"),
                    (b"Content-Length", b"-1"),
                    (b"Transfer-Encoding", b"gzip, chunked, identity"),
                    (b"", b"empty-name"),
                ]
            )
        )
    r.shuffle(hs)
    return hs, malformed


def generate(n: int, seed: int, tokens: dict[str, str], blobs: list[str], host: bytes) -> list[Case]:
    r = random.Random(seed)
    cases: list[Case] = []
    for i in range(n):
        raw = r.random() < 0.65
        method = r.choice(METHODS) if r.random() < 0.85 else r.choice(GARBAGE_METHODS)
        path_s, is_token = _path(r)
        if is_token and r.random() < 0.4:
            method = "POST"
        hs, malformed = _headers(r, tokens, raw)
        if r.random() < 0.15:  # a well-formed pull request with the right token, hostile only in its headers
            name = r.choice(["anon/app", CAP_NAME])
            what = r.choice(["manifests/v1", "manifests/multi", "tags/list?n=2", "blobs/" + r.choice(blobs)])
            path_s, is_token = f"/v2/{name}/{what}", False
            hs = [(k, v) for k, v in hs if k not in (b"Authorization", b"Host")]  # tokens are bound to the Host
            hs += [(b"Host", host), (b"Authorization", f"Bearer {tokens[name]}".encode())]
        path = path_s.encode()
        if raw and r.random() < 0.08:  # invalid UTF-8 (or a raw NUL / space) straight in the target
            i_ = r.randrange(1, len(path) + 1)
            bad = r.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc", b"\x00", b" x"])
            path = path[:i_] + bad + path[i_:]
            malformed = malformed or bad in (b"\x00", b" x")
        if method not in METHODS:
            malformed = malformed or not method.isupper()
        body = b""
        chunked = False
        roll = r.random()
        if roll < 0.25:
            if method == "POST" and is_token:
                body = r.choice(
                    [
                        b"grant_type=password&username=u&password=p&scope=repository%3Aanon%2Fapp%3Apull&service=x",
                        b"grant_type=refresh_token&refresh_token=" + r.randbytes(20).hex().encode(),
                        b"grant_type=refresh_token&refresh_token=" + tokens["anon/app"].encode(),
                        b"grant_type=%0d%0a&scope=repository:../x:push",
                        b"scope=" + b"repository:anon/app:pull&scope=" * 300,
                        b"\xff\xfe\x00garbage",
                        b"{}",
                    ]
                )
                hs.append((b"Content-Type", b"application/x-www-form-urlencoded"))
            else:
                body = r.randbytes(r.randint(1, 2048))
        elif roll < 0.29 and raw:
            chunked = True
            body = r.randbytes(r.randint(0, 300))
        elif roll < 0.31:
            body = b"B" * (BIG_BODY + r.randint(1, 4096))
        cases.append(Case(i, "raw" if raw else "httpx", method, path, hs, body, chunked, malformed))
    return cases


# --- checking -----------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    problem: str | None = None
    closed: bool = False
    status: int | None = None


def check_answer(case: Case, status: int, body: bytes) -> str | None:
    if status not in ALLOWED:
        return f"status {status}"
    if status >= 400 and case.method != "HEAD":
        try:
            doc = json.loads(body)
            errs = doc["errors"]
            assert isinstance(errs, list) and errs
            assert all(isinstance(e, dict) and "code" in e and "message" in e for e in errs)
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"status {status} with a non-JSON error body {body[:300]!r}"
    return None


def ping_ok(rp: proxy.ProxyProc) -> bool:
    try:
        return httpx.get(f"{rp.url}/v2/", timeout=TIMEOUT).status_code == 401
    except httpx.HTTPError:
        return False


def run_case(rp: proxy.ProxyProc, case: Case) -> Outcome:
    if case.via == "httpx":
        try:
            url = httpx.URL(rp.url + case.path.decode())
        except (httpx.InvalidURL, UnicodeDecodeError):
            return Outcome(case)  # httpx refused to build it: nothing sent
        try:
            r = httpx.request(
                case.method,
                url,
                headers=[(k, v) for k, v in case.headers if k.lower() != b"host" or v],
                content=case.body or None,
                timeout=TIMEOUT,
            )
        except httpx.TimeoutException:
            return Outcome(case, problem="timed out (10 s)")
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            if case.big_body:
                return Outcome(case, closed=True)
            return Outcome(case, problem=f"closed without an answer: {e!r}")
        except (httpx.LocalProtocolError, ValueError, UnicodeError):
            return Outcome(case)  # httpx refused to send it
        return Outcome(case, problem=check_answer(case, r.status_code, r.content), status=r.status_code)
    try:
        a = raw_exchange(rp, case.raw(), case.method == "HEAD")
    except TimeoutError:
        return Outcome(case, problem="timed out (10 s)")
    except NoAnswer as e:
        if case.big_body or case.malformed:
            if not ping_ok(rp):
                return Outcome(case, problem="proxy did not answer a /v2/ ping after a closed connection")
            return Outcome(case, closed=True)
        return Outcome(case, problem=f"closed without an answer: {e}")
    return Outcome(case, problem=check_answer(case, a.status, a.body), status=a.status)


def describe(o: Outcome) -> str:
    c = o.case
    data = c.raw()
    shown = data if len(data) < 1500 else data[:1500] + b"...(%d bytes)" % len(data)
    return f"#{c.index} via {c.via} {c.method} {c.path[:200]!r}: {o.problem}\n    raw: {shown!r}"


# --- the tests ----------------------------------------------------------------------------


def test_fuzz_hostile_requests(fp: proxy.ProxyProc) -> None:
    tokens = {n: token_for(fp, n) for n in ("anon/app", CAP_NAME)}
    manifest = httpx.get(
        f"{fp.url}/v2/anon/app/manifests/v1",
        headers={"Accept": MANIFEST_TYPES[0], "Authorization": f"Bearer {tokens['anon/app']}"},
        timeout=TIMEOUT,
    ).json()
    blobs = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
    cases = generate(N_REQUESTS, SEED, tokens, blobs, fp.host.encode())
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda c: run_case(fp, c), cases))
    problems = [o for o in outcomes if o.problem]
    closed = [o for o in outcomes if o.closed]
    statuses: dict[int, int] = {}
    for o in outcomes:
        if o.status is not None:
            statuses[o.status] = statuses.get(o.status, 0) + 1
    print(f"fuzz: {len(cases)} requests, statuses {sorted(statuses.items())}, {len(closed)} closed (allowed)")
    for o in closed:
        print(f"  closed: #{o.case.index} {o.case.method} {o.case.path[:80]!r} big={o.case.big_body}")
    assert fp.running(), "the proxy died"
    out = fp.output()
    assert "Traceback" not in out and "Addon error" not in out, out[-5000:]
    assert not problems, f"{len(problems)} defects:\n" + "\n".join(describe(o) for o in problems[:20])


def test_still_serves_a_pull_after_fuzzing(fp: proxy.ProxyProc) -> None:
    tok = token_for(fp, "anon/app")
    r = httpx.get(
        f"{fp.url}/v2/anon/app/manifests/v1",
        headers=[("Accept", t) for t in MANIFEST_TYPES] + [("Authorization", f"Bearer {tok}")],
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert json.loads(r.content)["schemaVersion"] == 2
    assert fp.running()
    out = fp.output()
    assert "Traceback" not in out and "Addon error" not in out


def test_property_dot_segments_and_encodings_never_reach_a_route(fp: proxy.ProxyProc) -> None:
    """Without randomness: every hostile spelling of the real manifest path, with a valid token, is refused."""
    tok = token_for(fp, "anon/app")
    variants = [
        "/v2/anon/../anon/app/manifests/v1",
        "/v2/anon/%2e%2e/anon/app/manifests/v1",
        "/v2/anon%2fapp/manifests/v1",
        "/v2/anon%2Fapp/manifests/v1",
        "/v2/anon%5capp/manifests/v1",
        "/v2/anon\\app/manifests/v1",
        "/v2/anon//app/manifests/v1",
        "/v2/anon/./app/manifests/v1",
        "/v2/anon/app/manifests/v1%00",
        "/v2/anon/app%00/manifests/v1",
        "/v2/ANON/APP/manifests/v1",
        "/v2/anon/app/manifests/%2e%2e",
        "/v2/anon/app/manifests/v1/",
    ]
    for v in variants:
        data = (
            f"GET {v} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tok}\r\n"
            f"Accept: {MANIFEST_TYPES[0]}\r\nConnection: close\r\n\r\n"
        ).encode()
        a = raw_exchange(fp, data, head=False)
        assert a.status in (400, 401, 403, 404), (v, a.status, a.body[:200])
        assert check_answer(Case(0, "raw", "GET", v.encode()), a.status, a.body) is None, (v, a.body[:200])
