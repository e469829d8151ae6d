"""links/: minting, opening and resolving share links, and durations (no proxy)."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from regproxy.limits.settings import format_duration
from regproxy.links import (
    LINK_ID_RE,
    LINK_LENGTH,
    MARKER,
    DurationError,
    LinkBook,
    looks_like_link,
    mint,
    parse_duration,
)
from regproxy.protocol.names import is_valid_name, looks_like_capability

KEY = b"k" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000
KEYS = ("bp/", "0ebb01be-0a22-4639-898c-bc8c2d20942d/nginx")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def book(*secrets: bytes, revoked: tuple[str, ...] = (), clock: Clock | None = None) -> LinkBook:
    return LinkBook(secrets or (KEY,), KEYS, revoked, clock or Clock())


def test_a_minted_link_resolves_to_its_mapping_id_and_expiry() -> None:
    link, made = mint(KEY, "bp/", NOW + 3600)
    use = book().resolve(link)
    assert use is not None
    assert (use.id, use.expires_at, use.mapping_key, use.state) == (made.id, NOW + 3600, "bp/", "ok")
    assert use.remaining == 3600
    assert use.refusal is None


def test_the_link_is_one_name_segment_of_the_documented_shape() -> None:
    link, made = mint(KEY, KEYS[1], NOW + 60)
    assert len(link) == LINK_LENGTH <= 80
    assert link.startswith(MARKER) and is_valid_name(link) and "/" not in link
    assert looks_like_link(link) and looks_like_capability(link)
    assert LINK_ID_RE.fullmatch(made.id) and made.id in link
    # The link names its mapping by an HMAC, never by the key.
    assert "0ebb01be" not in link and "nginx" not in link


def test_every_one_character_change_is_refused() -> None:
    link, _ = mint(KEY, "bp/", NOW + 3600)
    b = book()
    alphabet = string.ascii_lowercase + string.digits
    for i, original in enumerate(link):
        for c in alphabet:
            if c != original:
                changed = link[:i] + c + link[i + 1 :]
                assert b.resolve(changed) is None, (i, c)


def test_a_link_of_another_key_or_of_an_unknown_mapping_is_refused() -> None:
    foreign, _ = mint(OTHER, "bp/", NOW + 3600)
    assert book().resolve(foreign) is None
    unknown, _ = mint(KEY, "gone/", NOW + 3600)
    assert book().resolve(unknown) is None


@pytest.mark.parametrize(
    "segment",
    ["", "bp", MARKER, MARKER + "a" * 64, MARKER + "a" * 63, MARKER + "a" * 65, "x" * 68, MARKER + "8" * 64],
)
def test_garbage_is_refused(segment: str) -> None:
    assert book().resolve(segment) is None


def test_expiry_follows_the_clock() -> None:
    clock = Clock()
    link, _ = mint(KEY, "bp/", NOW + 10)
    b = book(clock=clock)
    assert b.resolve(link) is not None and b.resolve(link).state == "ok"  # type: ignore[union-attr]
    clock.now = NOW + 10
    use = b.resolve(link)
    assert use is not None and use.state == "expired" and use.remaining == 0
    assert use.refusal == "this link expired at 2027-01-15T08:00:10Z"


def test_revoked_by_id() -> None:
    link, made = mint(KEY, "bp/", NOW + 3600)
    use = book(revoked=(made.id,)).resolve(link)
    assert use is not None and use.state == "revoked" and use.refusal == "this link was revoked"
    other, _ = mint(KEY, "bp/", NOW + 3600)
    assert book(revoked=(made.id,)).resolve(other).state == "ok"  # type: ignore[union-attr]


def test_rotation_a_listed_old_key_keeps_its_links_a_removed_one_ends_them() -> None:
    old, _ = mint(OTHER, "bp/", NOW + 3600)
    new, _ = mint(KEY, "bp/", NOW + 3600)
    rotated = book(KEY, OTHER)
    assert rotated.resolve(old) is not None and rotated.resolve(new) is not None
    assert book(KEY).resolve(old) is None


def test_the_link_key_is_not_the_token_key() -> None:
    """The tag is an HMAC under the HKDF-derived key, not under the secret key itself."""
    import hashlib
    import hmac

    link, _ = mint(KEY, "bp/", NOW + 3600)
    body = base64.b32decode(link[len(MARKER) :].upper())
    plain = hmac.digest(KEY, b"tag\0" + MARKER.encode() + body[:-16], hashlib.sha256)[:16]
    assert plain != body[-16:]


def test_mint_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(ValueError):
        mint(KEY, "bp/", 0)
    with pytest.raises(ValueError):
        mint(KEY, "bp/", 2**40)
    with pytest.raises(ValueError):
        mint(KEY, "bp/", NOW, b"short")


@settings(max_examples=200, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    key=st.text(min_size=1, max_size=200),
    expires=st.integers(min_value=1, max_value=2**40 - 1),
)
def test_every_link_is_bounded_and_in_the_name_grammar(secret: bytes, key: str, expires: int) -> None:
    link, made = mint(secret, key, expires)
    assert len(link) == LINK_LENGTH <= 80
    assert set(link) <= set(string.ascii_lowercase + string.digits)
    assert is_valid_name(link) and looks_like_link(link)
    use = LinkBook((secret,), (key,), (), Clock(0)).resolve(link)
    assert use is not None and (use.id, use.expires_at, use.mapping_key) == (made.id, expires, key)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.ascii_lowercase + string.digits, min_size=0, max_size=90))
def test_random_segments_never_resolve(segment: str) -> None:
    assert book().resolve(segment) is None
    assert book().resolve(MARKER + segment[: LINK_LENGTH - len(MARKER)]) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("90d", 90 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("30", 30), (60, 60)]
)
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text, "--expires") == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "1x", "d", "-5m", "1.5h", True, None, 1.5, "1h30m"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(DurationError, match="^--expires: must be"):
        parse_duration(text, "--expires")


@pytest.mark.parametrize("seconds", [1, 59, 60, 3600, 5400, 86400, 90 * 86400, 90061])
def test_format_duration_reads_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds), "x") == seconds


def test_the_redactor_hides_any_link() -> None:
    from regproxy.debug.redact import Redactor

    link, made = mint(OTHER, "bp/", NOW + 60)  # not even of this proxy's key
    text = f'scope="repository:{link}/app:pull" Link: </v2/{link.upper()}/tags/list?n=1>'
    hidden = Redactor().text(text)
    assert link not in hidden.lower() and hidden.count("<link>") == 2
    assert Redactor().text(f"id {made.id}") == f"id {made.id}"  # the id is not a secret
