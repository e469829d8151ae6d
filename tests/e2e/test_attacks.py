"""Attacks on a real running proxy (mitmdump with the addon) in front of real upstreams.

One proxy serves the module: namespace mappings onto the rig's anonymous, basic and token
upstreams, two capability mappings (token and redirect upstreams), a `hosts:` mapping, and
mappings onto hostile servers (rig/hostile_upstreams.py) that play a malicious upstream: challenges
whose realm points at a trap, malformed, oversized and dribbled token answers. Every attack must get a
registry JSON error (never 200 for content outside a mapping, never a 5xx of the proxy's own
making, never a traceback); the upstreams' taps show what reached them.

Groups: 1 path tricks, 2 scope and token abuse, 3 uploads, 4 enumeration and timing,
5 malicious upstreams, 6 Host and X-Forwarded-* spoofing. Each test ends by checking that the
proxy still serves a normal pull and has logged no traceback.

The enumeration checks also run against a second proxy (`ap_root`) with the same mappings plus a
root mapping (`*`, onto the anonymous upstream, mirroring docker.io): there every name no key matches
is asked of that upstream, so an almost-right key must get exactly what a random name gets from it,
and no capability key may be forwarded there inside a name.

The proxies' configurations and the helpers the tests talk to them with are in rig/attack_proxy.py,
the fixtures (`ap`, `ap_root`, `public_proxy`, `hostiles`, `taps`) in conftest.py.
"""

from __future__ import annotations

import random
import socket
import statistics
import time
import uuid
from typing import Any

import httpx
import pytest
from regproxy.tokens.paseto import Grant, TokenCodec
from rig import proxy, registry
from rig.attack_proxy import (
    CAP2,
    CAP2_NAME,
    CAP_NAME,
    KEY_HEX,
    MANIFEST_TYPES,
    OPERATOR_PASSWORD,
    OPERATOR_USER,
    OTHER_KEY_HEX,
    PUBLIC_URL,
    ROOT_KIND,
    TIMEOUT,
    absolute_form_tricks,
    assert_registry_error,
    assert_still_serving,
    assert_within_prefixes,
    attack_config,
    comparable,
    enumeration_proxy,
    forged,
    get,
    holds_a_key,
    one_off,
    pyseto_token,
    raw_exchange,
    raw_get,
    realm_of,
    token_for,
    twin,
    vm_kb,
)
from rig.hostile_upstreams import REALM_CASES, TIMEOUT_CASES, TOKEN_ANSWERS, Hostiles
from rig.keys import CAP
from rig.standard import APP

pytestmark = pytest.mark.e2e


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


def test_path_tricks_never_leave_the_remote_prefix(ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]) -> None:
    """Raw request targets with dot segments, encodings, bad bytes and grammar breakers (with a token
    good for `anon/app` and for the names a trick aims at): a registry 4xx error every time, and no
    upstream ever sees a path outside `/v2/platform/`."""
    tok = token_for(ap, "anon/app", "anon/library/solo", "library/solo", "anon/a/x")
    targets = PATH_TRICKS + absolute_form_tricks(taps)
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


# Hostile spellings of what `pol/`'s policy refuses (`allow: [app]`, `deny: [app:v1]`): platform/app:v1 and
# every other repository (platform/many, library/solo). None may reach the upstream or answer 200.
POLICY_TRICKS: list[bytes] = [
    b"/v2/pol/app/manifests/v1",
    b"/v2/pol/many/manifests/t000",
    b"/v2/pol/APP/manifests/v1",  # case: names are lower-case, refused before any mapping
    b"/v2/pol/App/manifests/v1",
    b"/v2/pol/app/manifests/v1:",  # a trailing `:`
    b"/v2/pol/app:/manifests/v1",
    b"/v2/pol/app/manifests/v1%3a",
    b"/v2/pol/app/manifests/%76%31",
    b"/v2/pol/app%2fmanifests/v1",  # encoded slashes
    b"/v2/pol/app%2Fx/manifests/v1",
    b"/v2/pol%2fmany/manifests/t000",
    b"/v2/pol/x/../many/manifests/t000",  # dot segments
    b"/v2/pol/app/../many/manifests/t000",
    b"/v2/pol/./many/manifests/t000",
    b"/v2/pol/%2e%2e/many/manifests/t000",
    b"/v2/pol//many/manifests/t000",
    b"/v2/pol/app/manifests/v1?ns=docker.io",
    b"/v2/pol/many/tags/list",
    b"/v2/pol/app/../../library/solo/manifests/latest",
]


def test_hostile_names_cannot_slip_past_a_policy(ap: proxy.ProxyProc, taps: dict[str, registry.Upstream]) -> None:
    """Encoded slashes, dot segments, case and a trailing `:` (GET and HEAD, with a token good for every name
    they aim at): a registry 4xx error every time, never the refused content, and the upstream never sees a
    request for platform/app:v1 or another repository than platform/app through `pol/`."""
    tok = token_for(ap, "pol/app", "pol/many", "pol/x", "pol/library/solo")
    for target in POLICY_TRICKS:
        for method in (b"GET", b"HEAD"):
            headers = [(b"Host", ap.host.encode()), (b"Authorization", f"Bearer {tok}".encode())]
            headers += [(b"Accept", t.encode()) for t in MANIFEST_TYPES]
            answer = raw_exchange(ap, raw_get(ap, target, headers, method), head=method == b"HEAD")
            assert answer is not None, target
            assert answer.status != 200, (method, target, answer.body[:100])
            assert_registry_error(answer.status, answer.body, head=method == b"HEAD")
    seen = [e.path for e in taps["anonymous"].access_log()]
    assert not [p for p in seen if p.startswith("/v2/platform/app/manifests/v1") or "many" in p or "solo" in p]
    # What the policy admits still pulls.
    assert get(ap, "/v2/pol/app/manifests/multi", tok).status_code == 200
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
    other_proxy = make_proxy(attack_config(taps, hostiles, OTHER_KEY_HEX))
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
        "v2.local same key": pyseto_token(2, "local", payload),
        "v3.local same key": pyseto_token(3, "local", payload),
        "v4.public": pyseto_token(4, "public", payload),
        "v4.local other key": pyseto_token(4, "local", payload, b"\x07" * 32),
        "no implicit assertion": forged(payload, assertion=None),
        "expired": forged({**payload, "exp": "2020-01-01T00:00:00+00:00"}, exp=None),
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
        bad_tokens[f"forged: {label}"] = forged(claims, exp=None if "exp" in claims else 300)
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
    rss_before = vm_kb(ap, "VmRSS")
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
    rss_after = vm_kb(ap, "VmRSS")
    assert rss_after - rss_before < 64 * 1024, f"RSS {rss_before} -> {rss_after} kB"
    assert vm_kb(ap, "VmHWM") < 250 * 1024
    assert_still_serving(ap)


# --- 4. enumeration -------------------------------------------------------------------------------


ALMOST_RIGHT = [
    *(f"{one_off(CAP, i)}/app" for i in (0, 9, 20, len(CAP) - 1)),
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
    *(f"{one_off(CAP2, i)}/app" for i in (0, len(CAP2) - 1)),
    f"{CAP2[:-1]}/app",
    f"{CAP2}a/app",
    f"{CAP2.upper()}/app",
]


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
        other, other_rp = (guess, ap) if root and holds_a_key(guess) else (twin(guess), rp)
        if root and not holds_a_key(guess):
            forwarded |= {guess, other}
        ta, tb = token_for(rp, guess), token_for(other_rp, other)
        for suffix in ("manifests/v1", "tags/list", f"blobs/sha256:{'a' * 64}"):
            for method in ("GET", "HEAD"):
                a = comparable(get(rp, f"/v2/{guess}/{suffix}", method=method, client=c), guess, rp)
                b = comparable(get(other_rp, f"/v2/{other}/{suffix}", method=method, client=c), other, other_rp)
                assert a == b, (guess, method, a, b)
                assert a[0] in (400, 401, 404)
                a2 = comparable(get(rp, f"/v2/{guess}/{suffix}", ta, method=method, client=c), guess, rp)
                b2 = comparable(get(other_rp, f"/v2/{other}/{suffix}", tb, method=method, client=c), other, other_rp)
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
    rss_before = vm_kb(ap, "VmRSS")
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
    assert vm_kb(ap, "VmRSS") - rss_before < 64 * 1024
    assert_still_serving(ap)


def test_huge_ping_body_is_not_read(ap: proxy.ProxyProc, hostiles: Hostiles) -> None:
    """An upstream answering its /v2/ challenge with a 1 GiB body: the proxy reads the challenge only."""
    rss_before = vm_kb(ap, "VmRSS")
    started = time.monotonic()
    r = httpx.get(f"{ap.url}/token", params={"scope": "repository:evping/app:pull"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 8
    assert vm_kb(ap, "VmRSS") - rss_before < 64 * 1024
    assert [q.path.split("?")[0] for q in hostiles.huge_ping.requests()] == ["/v2/", "/token"]
    assert_still_serving(ap)


# --- 6. Host and X-Forwarded-* spoofing -----------------------------------------------------------

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
                realm = realm_of(a.header("www-authenticate") or "")
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
    assert_still_serving(rp)


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
    assert_still_serving(rp)
