"""A token server for distribution's `auth: token` mode, in-process, for tests.

It signs ES256 JWTs with a fresh P-256 key. The key's self-signed certificate is written to
`cert_path` (use it as the registry's `rootcertbundle`); the JWT header carries `kid` = the
libtrust key id of the key, which is how distribution 2.8 finds the key in that bundle.

Endpoints (the path is always /token, `realm` is its full URL):
- GET  /token?service=S&scope=…(repeated, or several space-separated in one value)&account=A
       [&offline_token=true][&client_id=C], optional Basic credentials;
- POST /token, form grant_type=password (username, password, scope, service, client_id, access_type)
       or grant_type=refresh_token (refresh_token, scope, service, client_id).
Bad credentials answer 401. Anonymous callers get `pull` on public repositories only; an
authenticated user gets the actions it asked for (pull, push, delete, *), or only `pull` when it
is listed in `readonly_users`. Every request is recorded (see `requests()`).

With `tls` (a server SSLContext) it speaks HTTPS. `public_url` (settable before the registry's
configuration is written) replaces the URL built from the bound address, e.g. `https://localhost:P`
or the address of a relay in front of it; `realm` follows it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .httpserver import HttpServer
from .procs import LOOPBACK

KNOWN_ACTIONS = ("pull", "push", "delete", "*")


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust's key id: base32(sha256(DER SubjectPublicKeyInfo)[:30]) in ':'-joined groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def parse_scopes(values: Iterable[str]) -> list[tuple[str, str, list[str]]]:
    """`type:name:actions` scopes (several may share one value, space-separated) as tuples.

    The name may itself contain ':' (host:port), so type is split from the left and actions from
    the right. Malformed scopes are skipped.
    """
    out: list[tuple[str, str, list[str]]] = []
    for value in values:
        for scope in value.split():
            typ, sep, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not sep or not sep2 or not typ or not name:
                continue
            out.append((typ, name, [a for a in actions.split(",") if a]))
    return out


@dataclass(frozen=True)
class TokenRequest:
    """One request the issuer answered."""

    method: str
    path: str
    # query parameters (GET) or form fields (POST), in order
    params: dict[str, list[str]]
    had_authorization: bool
    user: str | None  # the authenticated user, None for anonymous or refused callers
    status: int
    grant_type: str | None = None
    scopes: tuple[str, ...] = ()
    granted: tuple[dict[str, Any], ...] = field(default=())


class TokenIssuer(HttpServer):
    """See the module docstring. Create, then `start()`; `stop()` when done."""

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        *,
        service: str = "rig-registry",
        issuer: str = "rig-token-issuer",
        public_repos: Collection[str] = (),
        public_prefixes: Collection[str] = (),
        readonly_users: Collection[str] = (),
        expires_in: int = 300,
        allow_post: bool = True,
        host: str = LOOPBACK,
        tls: ssl.SSLContext | None = None,
        public_url: str | None = None,
    ) -> None:
        super().__init__("token-issuer", host, tls=tls, public_url=public_url)
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.public_repos = set(public_repos)
        self.public_prefixes = tuple(public_prefixes)
        self.readonly_users = set(readonly_users)
        self.expires_in = expires_in
        self.allow_post = allow_post
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = libtrust_key_id(self._key.public_key())
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-issuer-cert.pem"
        self.cert_path.write_bytes(self._self_signed_cert().public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}
        # Every token and refresh token handed out, in order; never cleared (secrets for tests to look for).
        self._issued: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _make_handler(self)

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    # -- records ------------------------------------------------------------------------------
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def issued(self) -> list[str]:
        """Every token and refresh token this issuer has handed out (`clear` keeps them)."""
        with self._lock:
            return list(self._issued)

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- tokens -------------------------------------------------------------------------------
    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rig token issuer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )

    def is_public(self, name: str) -> bool:
        return name in self.public_repos or any(name.startswith(p) for p in self.public_prefixes)

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The `access` claim for `user` (None: anonymous) asking for `scopes`."""
        access: list[dict[str, Any]] = []
        for typ, name, actions in parse_scopes(scopes):
            wanted = [a for a in actions if a in KNOWN_ACTIONS]
            if user is None:
                allowed = ["pull"] if typ == "repository" and self.is_public(name) else []
                granted = [a for a in allowed if a in wanted or "*" in wanted]
            elif user in self.readonly_users:
                granted = ["pull"] if typ == "repository" and ("pull" in wanted or "*" in wanted) else []
            else:
                granted = wanted
            access.append({"type": typ, "name": name, "actions": granted})
        return access

    def issue_token(
        self,
        subject: str,
        access: list[dict[str, Any]],
        *,
        expires_in: int | None = None,
        now: float | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> str:
        """A signed JWT; tests may use the keyword arguments to make expired or foreign tokens."""
        t = int(now if now is not None else time.time())
        claims = {
            "iss": issuer if issuer is not None else self.issuer,
            "sub": subject,
            "aud": audience if audience is not None else self.service,
            "exp": t + (expires_in if expires_in is not None else self.expires_in),
            "nbf": t - 1,
            "iat": t,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.key_id})
        with self._lock:
            self._issued.append(token)
        return token

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def new_refresh_token(self, user: str) -> str:
        tok = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[tok] = user
            self._issued.append(tok)
        return tok

    def refresh_user(self, tok: str) -> str | None:
        with self._lock:
            return self._refresh_tokens.get(tok)

    def check_password(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected.encode(), password.encode())


def _make_handler(iss: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rig-token-issuer"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send_json(
            self,
            status: int,
            body: dict[str, Any],
            extra: Mapping[str, str] | None = None,
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _basic(self) -> tuple[str, str] | None | bool:
            """(user, password) from Basic auth; None when absent; False when malformed."""
            value = self.headers.get("Authorization")
            if value is None:
                return None
            scheme, _, b64 = value.partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                user, sep, pw = base64.b64decode(b64.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return (user, pw) if sep else False

        def _answer(self, method: str, params: dict[str, list[str]]) -> None:
            path = urllib.parse.urlsplit(self.path).path
            had_auth = "Authorization" in self.headers
            grant_type = params.get("grant_type", [None])[-1] if method == "POST" else None
            scopes = tuple(params.get("scope", []))

            def record(
                status: int,
                user: str | None,
                granted: list[dict[str, Any]] | None = None,
            ) -> None:
                iss._record(
                    TokenRequest(
                        method=method,
                        path=self.path,
                        params=params,
                        had_authorization=had_auth,
                        user=user,
                        status=status,
                        grant_type=grant_type,
                        scopes=scopes,
                        granted=tuple(granted or ()),
                    )
                )

            if path != "/token":
                record(404, None)
                self._send_json(404, {"details": "not found"})
                return
            if method == "POST" and not iss.allow_post:
                record(405, None)
                self._send_json(405, {"details": "method not allowed"}, {"Allow": "GET"})
                return

            user: str | None = None
            refresh: str | None = None
            unauthorized = {"WWW-Authenticate": 'Basic realm="rig-token-issuer"'}
            if method == "GET":
                basic = self._basic()
                if basic is False:
                    record(401, None)
                    self._send_json(401, {"details": "malformed credentials"}, unauthorized)
                    return
                if isinstance(basic, tuple):
                    if not iss.check_password(*basic):
                        record(401, None)
                        self._send_json(
                            401,
                            {"details": "invalid username or password"},
                            unauthorized,
                        )
                        return
                    user = basic[0]
                if user is not None and params.get("offline_token", ["false"])[-1] == "true":
                    refresh = iss.new_refresh_token(user)
            elif grant_type == "password":
                name = params.get("username", [""])[-1]
                if not iss.check_password(name, params.get("password", [""])[-1]):
                    record(401, None)
                    self._send_json(401, {"details": "invalid username or password"}, unauthorized)
                    return
                user = name
                refresh = iss.new_refresh_token(user)
            elif grant_type == "refresh_token":
                tok = params.get("refresh_token", [""])[-1]
                user = iss.refresh_user(tok)
                if user is None:
                    record(401, None)
                    self._send_json(401, {"details": "invalid refresh token"}, unauthorized)
                    return
                refresh = tok
            else:
                record(400, None)
                self._send_json(400, {"details": f"unsupported grant_type {grant_type!r}"})
                return

            service = params.get("service", [iss.service])[-1]
            if service != iss.service:
                record(400, user)
                self._send_json(400, {"details": f"unknown service {service!r}"})
                return
            access = iss.grant(user, scopes)
            token = iss.issue_token(user or "", access)
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            body: dict[str, Any] = {
                "token": token,
                "access_token": token,
                "expires_in": iss.expires_in,
                "issued_at": now.isoformat().replace("+00:00", "Z"),
            }
            if refresh is not None:
                body["refresh_token"] = refresh
            record(200, user, access)
            self._send_json(200, body)

        def do_GET(self) -> None:
            query = urllib.parse.urlsplit(self.path).query
            self._answer("GET", urllib.parse.parse_qs(query, keep_blank_values=True))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", errors="replace") if length else ""
            self._answer("POST", urllib.parse.parse_qs(raw, keep_blank_values=True))

    return Handler
