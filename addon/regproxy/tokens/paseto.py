"""The proxy's own tokens: PASETO v4.local (pyseto), encrypted and authenticated.

An access token wraps the upstream token(s) it was issued with, so a client never
sees an upstream token. It is bound to this proxy (its secret key and an implicit
assertion that also separates access from refresh tokens), to the domain it was issued
for (`aud`), and to the mappings and local repositories it grants pull on. It never
outlives the upstream token inside it.

The footer carries the id of the key that encrypted it (`kid`), a one-way hash that
reveals nothing about the key; every configured key is tried on decryption so keys can
rotate.

Time comes from the codec's `clock` (seconds since the epoch, `time.time` unless a test gives
another): `iat`, `exp` (written by the codec, not by pyseto, whose own clock would otherwise
decide) and every expiry check read it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyseto
from pyseto import DecryptError, Key, VerifyError

ACCESS_ASSERTION = b"registryproxy:access:v1"
READ_CACHE_SIZE = 4096
REFRESH_ASSERTION = b"registryproxy:refresh:v1"
MAX_TOKEN_LENGTH = 64 * 1024


class TokenError(Exception):
    """A token that must not be honoured. `reason` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """Pull access to local repositories through one mapping (None: names no mapping serves), and through
    the share link `link` (its id) when the names came through one: the router checks it is still good."""

    mapping: str | None
    names: tuple[str, ...]
    upstream_token: str | None = field(default=None, repr=False)
    link: str | None = None


@dataclass(frozen=True)
class AccessToken:
    audience: str
    grants: tuple[Grant, ...]
    issued_at: int
    expires_at: int

    def grant_for(self, name: str) -> Grant | None:
        for g in self.grants:
            if name in g.names:
                return g
        return None


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"registryproxy key id\0" + key).hexdigest()[:16]


class TokenCodec:
    """Issues and reads tokens with a list of keys: the first encrypts, all decrypt."""

    def __init__(self, keys: tuple[bytes, ...], clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._clock = clock
        self._keys = [Key.new(version=4, purpose="local", key=k) for k in keys]
        self._kid = key_id(keys[0])
        # Tokens already decrypted and checked, by (token, audience): a client sends the same token
        # with every request of a pull. Entries are used only until the token's expiry.
        self._read: OrderedDict[tuple[str, str], AccessToken] = OrderedDict()

    def issue_access(self, audience: str, grants: tuple[Grant, ...], lifetime: int) -> str:
        payload = {
            "aud": audience,
            "iat": int(self._clock()),
            "g": [
                {
                    "m": g.mapping,
                    "r": list(g.names),
                    **({"u": g.upstream_token} if g.upstream_token else {}),
                    **({"l": g.link} if g.link else {}),
                }
                for g in grants
            ],
        }
        return self._encode(payload, ACCESS_ASSERTION, lifetime)

    def read_access(self, token: str, audience: str) -> AccessToken:
        cached = self._read.get((token, audience))
        if cached is not None:
            if cached.expires_at > self._clock():
                self._read.move_to_end((token, audience))
                return cached
            del self._read[(token, audience)]
            raise TokenError("expired")
        access = self._read_access(token, audience)
        self._read[(token, audience)] = access
        if len(self._read) > READ_CACHE_SIZE:
            self._read.popitem(last=False)
        return access

    def _read_access(self, token: str, audience: str) -> AccessToken:
        payload = self._decode(token, ACCESS_ASSERTION, audience)
        try:
            grants = tuple(
                Grant(
                    mapping=_opt_str(g["m"]),
                    names=tuple(_str(n) for n in g["r"]),
                    upstream_token=_opt_str(g.get("u")),
                    link=_opt_str(g.get("l")),
                )
                for g in payload["g"]
            )
            return AccessToken(audience, grants, int(payload["iat"]), int(payload["_exp"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise TokenError("malformed claims") from None

    def issue_refresh(self, audience: str, subject: str, lifetime: int) -> str:
        payload = {"aud": audience, "iat": int(self._clock()), "sub": subject}
        return self._encode(payload, REFRESH_ASSERTION, lifetime)

    def read_refresh(self, token: str, audience: str) -> str:
        payload = self._decode(token, REFRESH_ASSERTION, audience)
        sub = payload.get("sub")
        if not isinstance(sub, str):
            raise TokenError("malformed claims")
        return sub

    def _encode(self, payload: dict[str, Any], assertion: bytes, lifetime: int) -> str:
        # `exp` as pyseto writes it (ISO 8601, whole seconds, UTC), from this codec's clock.
        expires = datetime.fromtimestamp(int(self._clock()) + max(1, int(lifetime)), UTC)
        token = pyseto.encode(
            self._keys[0],
            {**payload, "exp": expires.isoformat(timespec="seconds")},
            footer={"kid": self._kid},
            implicit_assertion=assertion,
            serializer=json,
        )
        return token.decode("ascii")

    def _decode(self, token: str, assertion: bytes, audience: str) -> dict[str, Any]:
        if not token.startswith("v4.local.") or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenError("not a v4.local token")
        try:
            # No deserializer: pyseto would check `exp` against its own clock; the checks below use ours.
            decoded = pyseto.decode(self._keys, token, implicit_assertion=assertion)
            if not isinstance(decoded.payload, bytes):
                raise TokenError("malformed claims")
            payload = json.loads(decoded.payload)
        except VerifyError as e:
            raise TokenError("expired" if "expired" in str(e).lower() else "invalid") from None
        except (DecryptError, ValueError, RecursionError):
            raise TokenError("invalid") from None
        if not isinstance(payload, dict):
            raise TokenError("malformed claims")
        exp = payload.get("exp")
        if not isinstance(exp, str):
            raise TokenError("malformed claims")
        try:
            payload["_exp"] = int(datetime.fromisoformat(exp).timestamp())
        except ValueError:
            raise TokenError("malformed claims") from None
        if payload["_exp"] <= self._clock():
            raise TokenError("expired")
        if payload.get("aud") != audience:
            raise TokenError("issued for another domain")
        return payload


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)
