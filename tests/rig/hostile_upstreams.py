"""The hostile upstreams the attack tests (tests/e2e/test_attacks.py) map, played by rig.hostile servers.

- a token service on the upstream's own host whose answers are malicious, oversized, malformed or slow:
  `TOKEN_ANSWERS`, keyed by the last component of the repository asked for (`TIMEOUT_CASES` never end);
- registries whose challenge sends the proxy's credentials somewhere else: `REALM_CASES` (`{own}` and
  `{trap}` in a challenge are ports), each on a server of its own;
- a registry whose ping answers a 1 GiB body (`PING_BODY`);
- the `Trap`, where every realm that points elsewhere points: nothing may ever reach it.

`start_hostiles()` starts them all (`Hostiles`; `stop()` when done).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .hostile import Reply, Request, Script, ScriptedServer, Trap, dribble, repeat


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
TOKEN_ANSWERS: dict[str, Callable[[ScriptedServer, int], Reply]] = {  # (the server, the trap's port)
    "big-length": lambda s, trap: Reply(
        200, [], chunks=repeat(b'{"token":"' + b"a" * 65526, 20 << 20), length=20 << 20
    ),
    "big-chunked": lambda s, trap: Reply(200, [], chunks=repeat(b'{"token":"' + b"a" * 65526, 20 << 20)),
    "html": lambda s, trap: Reply(200, [("Content-Type", "text/html")], b"<html><body>token</body></html>"),
    "empty": lambda s, trap: Reply(200, [], b""),
    "null": lambda s, trap: Reply(200, [], b"null"),
    "array": lambda s, trap: Reply(200, [], b'["hostile-upstream-token"]'),
    "nested": lambda s, trap: Reply(200, [], b"[" * 200_000),
    "no-token": lambda s, trap: Reply(200, [], _json({"expires_in": 300})),
    "empty-token": lambda s, trap: Reply(200, [], _json({"token": "", "access_token": ""})),
    "null-token": lambda s, trap: Reply(200, [], _json({"token": None, "access_token": None})),
    "int-token": lambda s, trap: Reply(200, [], _json({"token": 12345})),
    "list-token": lambda s, trap: Reply(200, [], _json({"token": ["a", "b"]})),
    "object-token": lambda s, trap: Reply(200, [], _json({"token": {"a": "b"}})),
    "bool-token": lambda s, trap: Reply(200, [], _json({"token": True})),
    "crlf-token": lambda s, trap: Reply(200, [], _json({"token": "abc\r\nX-Injected: 1"})),
    "space-token": lambda s, trap: Reply(200, [], _json({"token": "abc def"})),
    "quote-token": lambda s, trap: Reply(200, [], _json({"token": 'abc"def'})),
    "nonascii-token": lambda s, trap: Reply(200, [], _json({"token": "tökén"})),
    "long-token": lambda s, trap: Reply(200, [], _json({"token": "a" * 40_000})),
    "exp-negative": lambda s, trap: Reply(200, [], _json({"token": "t", "expires_in": -1})),
    "exp-zero": lambda s, trap: Reply(200, [], _json({"token": "t", "expires_in": 0})),
    "exp-huge": lambda s, trap: Reply(200, [], _json({"token": "t", "expires_in": 10**12})),
    "exp-bigint": lambda s, trap: Reply(200, [], b'{"token":"t","expires_in":' + b"9" * 400 + b"}"),
    "exp-inf": lambda s, trap: Reply(200, [], b'{"token":"t","expires_in":1e400}'),
    "exp-nan": lambda s, trap: Reply(200, [], b'{"token":"t","expires_in":NaN}'),
    "status-500": lambda s, trap: Reply(500, [], GOOD_TOKEN),
    "status-401": lambda s, trap: Reply(401, [("WWW-Authenticate", 'Basic realm="x"')], GOOD_TOKEN),
    "status-404": lambda s, trap: Reply(404, [], GOOD_TOKEN),
    "redirect": lambda s, trap: Reply(307, [("Location", f"http://localhost:{trap}/token")], b""),
    "dribble": lambda s, trap: Reply(200, [], chunks=dribble(GOOD_TOKEN, 0.5, s.stopping)),
    "stall": lambda s, trap: Reply(200, [], chunks=dribble(GOOD_TOKEN, 30, s.stopping, step=len(GOOD_TOKEN))),
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


def _realm_script(case: RealmCase, trap_port: int) -> Script:
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


def _token_script(trap_port: int) -> Script:
    """A registry whose token service, on its own host, answers as TOKEN_ANSWERS says for the case asked."""

    def script(req: Request, s: ScriptedServer) -> Reply:
        path = urlsplit(req.path).path
        if path in ("/v2", "/v2/"):
            return _challenge_reply(_bearer(f"http://127.0.0.1:{s.port}/token"))
        if path == "/token":
            answer = TOKEN_ANSWERS.get(_token_case(req))
            if answer is not None:
                return answer(s, trap_port)
            return Reply(200, [("Content-Type", "application/json")], GOOD_TOKEN)
        return Reply(404, [("Content-Type", "application/json")], b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    return script


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
    """Every hostile upstream, started: the trap, the token-answer server, the huge ping, one per realm case."""

    trap: Trap
    tokens: ScriptedServer
    huge_ping: ScriptedServer
    realms: dict[str, ScriptedServer]  # RealmCase.id -> its server

    def all(self) -> list[ScriptedServer]:
        return [self.tokens, self.huge_ping, *self.realms.values()]

    def stop(self) -> None:
        for s in self.all():
            s.stop()
        self.trap.stop()


def start_hostiles() -> Hostiles:
    """Start the trap and every hostile upstream (each on its own loopback port); `stop()` when done."""
    trap = Trap()
    started: list[ScriptedServer] = []
    try:
        tokens = ScriptedServer(_token_script(trap.port), "hostile-tokens")
        started.append(tokens)
        huge = ScriptedServer(_huge_ping_script, "hostile-huge-ping")
        started.append(huge)
        realms = {}
        for case in REALM_CASES:
            realms[case.id] = ScriptedServer(_realm_script(case, trap.port), f"hostile-{case.id}")
            started.append(realms[case.id])
    except BaseException:
        for s in started:
            s.stop()
        trap.stop()
        raise
    return Hostiles(trap, tokens, huge, realms)


__all__ = [
    "GOOD_TOKEN",
    "PING_BODY",
    "REALM_CASES",
    "TIMEOUT_CASES",
    "TOKEN_ANSWERS",
    "Hostiles",
    "RealmCase",
    "start_hostiles",
]
