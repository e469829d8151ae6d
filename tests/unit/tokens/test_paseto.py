"""The proxy's PASETO tokens (tokens/paseto.py)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.tokens.paseto import MAX_TOKEN_LENGTH, AccessToken, Grant, TokenCodec, TokenError, key_id

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
AUD = "https://reg.example.com"
GRANTS = (
    Grant("bp/", ("bp/app", "bp/web"), "upstream-token-1"),
    Grant(None, ("unknown/x",)),
)


class Clock:
    """A clock for `TokenCodec(clock=...)` that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def issue(codec: TokenCodec | None = None, lifetime: int = 300) -> str:
    return (codec or TokenCodec((KEY_A,))).issue_access(AUD, GRANTS, lifetime)


def reason(token: str, codec: TokenCodec | None = None, audience: str = AUD) -> str:
    with pytest.raises(TokenError) as info:
        (codec or TokenCodec((KEY_A,))).read_access(token, audience)
    assert info.value.reason
    return info.value.reason


def footer(token: str) -> dict[str, object]:
    part = token.split(".")[3]
    data: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def test_access_round_trip() -> None:
    before = int(time.time())
    access = TokenCodec((KEY_A,)).read_access(issue(), AUD)
    assert isinstance(access, AccessToken)
    assert access.audience == AUD
    assert access.grants == GRANTS
    assert before <= access.issued_at <= int(time.time())
    assert 290 <= access.expires_at - access.issued_at <= 301


def test_grant_for() -> None:
    access = TokenCodec((KEY_A,)).read_access(issue(), AUD)
    assert access.grant_for("bp/web") == GRANTS[0]
    assert access.grant_for("unknown/x") == GRANTS[1]
    assert access.grant_for("bp/other") is None


def test_upstream_token_is_not_readable_in_token() -> None:
    token = issue()
    assert "upstream-token-1" not in token
    assert b"upstream-token-1" not in base64.urlsafe_b64decode(token.split(".")[2] + "==")


def test_grant_repr_hides_upstream_token() -> None:
    assert "upstream-token-1" not in repr(GRANTS[0])


def test_refresh_round_trip() -> None:
    codec = TokenCodec((KEY_A,))
    assert codec.read_refresh(codec.issue_refresh(AUD, "alice", 3600), AUD) == "alice"


def test_wrong_audience() -> None:
    assert reason(issue(), audience="https://other.example.com") == "issued for another domain"


def test_refresh_wrong_audience() -> None:
    codec = TokenCodec((KEY_A,))
    with pytest.raises(TokenError):
        codec.read_refresh(codec.issue_refresh(AUD, "alice", 3600), "https://other.example.com")


def test_other_key() -> None:
    assert reason(issue(TokenCodec((KEY_B,)))) == "invalid"


def test_refresh_token_is_not_an_access_token() -> None:
    codec = TokenCodec((KEY_A,))
    assert reason(codec.issue_refresh(AUD, "alice", 3600), codec) == "invalid"


def test_access_token_is_not_a_refresh_token() -> None:
    codec = TokenCodec((KEY_A,))
    with pytest.raises(TokenError) as info:
        codec.read_refresh(issue(codec), AUD)
    assert info.value.reason == "invalid"


@pytest.mark.parametrize("position", [9, 10, 30, 60, 100, -60, -40, -2, -1])
def test_tampered_token(position: int) -> None:
    token = issue()
    index = position % len(token)
    flipped = "A" if token[index] != "A" else "B"
    tampered = token[:index] + flipped + token[index + 1 :]
    reason(tampered)


@pytest.mark.parametrize("cut", [1, 10, 40, 100])
def test_truncated_token(cut: int) -> None:
    reason(issue()[:-cut])


def test_token_without_footer() -> None:
    reason(issue().rsplit(".", 1)[0])


def test_token_with_other_footer() -> None:
    token = issue()
    other = base64.urlsafe_b64encode(b'{"kid":"0000000000000000"}').rstrip(b"=").decode()
    reason(token.rsplit(".", 1)[0] + "." + other)


@pytest.mark.parametrize("prefix", ["v2.local.", "v3.local.", "v4.public.", "v1.local.", "V4.LOCAL.", ""])
def test_other_versions_and_purposes(prefix: str) -> None:
    token = issue()
    assert reason(prefix + token.removeprefix("v4.local.")) == "not a v4.local token"


def test_over_long_token() -> None:
    assert reason("v4.local." + "A" * MAX_TOKEN_LENGTH) == "not a v4.local token"


def test_non_ascii_token() -> None:
    assert reason(issue() + "é") == "not a v4.local token"


@pytest.mark.parametrize("token", ["v4.local.", "v4.local.!!!", "v4.local.AAAA", "v4.local..."])
def test_garbage_tokens(token: str) -> None:
    reason(token)


def test_expired_token() -> None:
    clock = Clock()
    issued = clock.now
    codec = TokenCodec((KEY_A,), clock)
    access = codec.issue_access(AUD, GRANTS, 1)
    refresh = codec.issue_refresh(AUD, "alice", 1)
    clock.advance(0.9)
    assert codec.read_access(access, AUD).expires_at == issued + 1
    assert codec.read_refresh(refresh, AUD) == "alice"
    clock.advance(0.1)
    assert reason(access, TokenCodec((KEY_A,), clock)) == "expired"  # not from the read cache
    assert reason(access, codec) == "expired"  # nor from it
    with pytest.raises(TokenError) as info:
        codec.read_refresh(refresh, AUD)
    assert info.value.reason == "expired"


def test_lifetime_below_one_is_raised_to_one() -> None:
    codec = TokenCodec((KEY_A,))
    access = codec.read_access(codec.issue_access(AUD, GRANTS, 0), AUD)
    assert access.expires_at - access.issued_at <= 1


def test_rotation_new_codec_reads_old_tokens() -> None:
    old_token = issue(TokenCodec((KEY_A,)))
    rotated = TokenCodec((KEY_B, KEY_A))
    assert rotated.read_access(old_token, AUD).grants == GRANTS


def test_rotation_new_codec_issues_with_new_key() -> None:
    token = issue(TokenCodec((KEY_B, KEY_A)))
    assert TokenCodec((KEY_B,)).read_access(token, AUD).grants == GRANTS
    reason(token, TokenCodec((KEY_A,)))


def test_rotation_reads_refresh_tokens() -> None:
    refresh = TokenCodec((KEY_A,)).issue_refresh(AUD, "alice", 3600)
    assert TokenCodec((KEY_B, KEY_A)).read_refresh(refresh, AUD) == "alice"


def test_footer_carries_kid_and_not_the_key() -> None:
    token = issue()
    assert footer(token) == {"kid": key_id(KEY_A)}
    assert KEY_A.hex() not in token
    assert key_id(KEY_A) != key_id(KEY_B)
    assert len(key_id(KEY_A)) == 16


def test_footer_names_the_encrypting_key() -> None:
    assert footer(issue(TokenCodec((KEY_B, KEY_A)))) == {"kid": key_id(KEY_B)}


def test_codec_needs_a_key() -> None:
    with pytest.raises(ValueError):
        TokenCodec(())


# --- properties ---

_CODEC = TokenCodec((KEY_A,))
_TOKEN = issue(_CODEC)


def _decoded_parts(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split(".")[2:]]


@given(st.integers(min_value=9, max_value=len(_TOKEN) - 1), st.sampled_from("AZaz09-_."))
def test_any_single_character_change_is_refused(index: int, char: str) -> None:
    tampered = _TOKEN[:index] + char + _TOKEN[index + 1 :]
    try:
        same_bytes = _decoded_parts(tampered) == _decoded_parts(_TOKEN)
    except ValueError:
        same_bytes = False
    if tampered == _TOKEN or same_bytes:
        # Only the unused low bits of a part's last base64 character changed: the same bytes, so
        # pyseto reads the same token (string malleability, not a forgery).
        return
    with pytest.raises(TokenError):
        _CODEC.read_access(tampered, AUD)


@given(st.text(max_size=200))
def test_arbitrary_text_is_refused_with_token_error(text: str) -> None:
    for candidate in (text, "v4.local." + text):
        with pytest.raises(TokenError):
            _CODEC.read_access(candidate, AUD)


_names = st.lists(st.text(alphabet="abc/", min_size=1, max_size=10), max_size=4).map(tuple)
_grants = st.lists(
    st.builds(Grant, st.one_of(st.none(), st.sampled_from(["bp/", "x/y"])), _names, st.one_of(st.none(), st.text())),
    max_size=3,
).map(tuple)


@given(_grants)
def test_grants_round_trip(grants: tuple[Grant, ...]) -> None:
    read = _CODEC.read_access(_CODEC.issue_access(AUD, grants, 60), AUD)
    expected = tuple(Grant(g.mapping, g.names, g.upstream_token or None) for g in grants)
    assert read.grants == expected


def test_read_cache_never_outlives_the_token() -> None:
    clock = Clock()
    codec = TokenCodec((b"\x07" * 32,), clock)
    tok = codec.issue_access("aud", (), 2)
    assert codec.read_access(tok, "aud").expires_at > clock.now
    assert codec.read_access(tok, "aud") is codec.read_access(tok, "aud")  # served from the cache
    clock.advance(2)
    with pytest.raises(TokenError, match="expired"):
        codec.read_access(tok, "aud")


def test_the_codec_clock_sets_issued_at_and_expiry() -> None:
    clock = Clock(1_700_000_000.75)
    codec = TokenCodec((KEY_A,), clock)
    access = codec.read_access(codec.issue_access(AUD, GRANTS, 300), AUD)
    assert (access.issued_at, access.expires_at) == (1_700_000_000, 1_700_000_300)
    # A token from a clock far ahead is read as valid by a codec on real time, and expired once real
    # time is past it: the default clock is the real one.
    real = TokenCodec((KEY_A,))
    ahead = TokenCodec((KEY_A,), Clock(time.time() + 3600)).issue_access(AUD, GRANTS, 60)
    behind = TokenCodec((KEY_A,), Clock(time.time() - 3600)).issue_access(AUD, GRANTS, 60)
    assert real.read_access(ahead, AUD).issued_at > time.time()
    assert reason(behind, real) == "expired"


def test_read_cache_is_per_audience() -> None:
    codec = TokenCodec((b"\x07" * 32,))
    tok = codec.issue_access("aud", (), 60)
    codec.read_access(tok, "aud")
    with pytest.raises(TokenError):
        codec.read_access(tok, "other")
