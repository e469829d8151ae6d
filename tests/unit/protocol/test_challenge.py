"""WWW-Authenticate challenges (protocol/challenge.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.protocol.challenge import UpstreamChallenge, bearer_challenge, parse_challenge


def test_bearer_challenge_quotes_every_value() -> None:
    assert bearer_challenge("https://reg.example.com/token", "reg.example.com") == (
        'Bearer realm="https://reg.example.com/token",service="reg.example.com"'
    )


def test_bearer_challenge_with_scope_and_error() -> None:
    value = bearer_challenge("https://r/token", "r", "repository:a/b:pull", "invalid_token")
    assert value == 'Bearer realm="https://r/token",service="r",scope="repository:a/b:pull",error="invalid_token"'


def test_bearer_challenge_omits_empty_scope() -> None:
    assert "scope" not in bearer_challenge("https://r/token", "r", "")


def test_bearer_challenge_escapes_quotes_and_backslashes() -> None:
    assert bearer_challenge('a"b\\c', "s") == 'Bearer realm="a\\"b\\\\c",service="s"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            (
                'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                'scope="repository:library/nginx:pull"'
            ),
            UpstreamChallenge("bearer", "https://auth.docker.io/token", "registry.docker.io"),
        ),
        (
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"',
            UpstreamChallenge("bearer", "https://ghcr.io/token", "ghcr.io"),
        ),
        (
            'Bearer realm="https://quay.io/v2/auth",service="quay.io"',
            UpstreamChallenge("bearer", "https://quay.io/v2/auth", "quay.io"),
        ),
        ('Basic realm="Registry Realm"', UpstreamChallenge("basic", "Registry Realm", None)),
        ("Basic", UpstreamChallenge("basic", None, None)),
        ('BEARER realm="https://r/t"', UpstreamChallenge("bearer", "https://r/t", None)),
        (
            'Bearer realm="https://r/t", service="s", error="insufficient_scope"',
            UpstreamChallenge("bearer", "https://r/t", "s"),
        ),
    ],
)
def test_parse_real_world_challenges(header: str, expected: UpstreamChallenge) -> None:
    assert parse_challenge(header) == expected


def test_parse_empty_challenge() -> None:
    assert parse_challenge("") is None


def test_round_trip_with_special_characters() -> None:
    realm = 'https://r/t?a="b",c=\\d'
    parsed = parse_challenge(bearer_challenge(realm, 'svc "x"', "repository:a:pull", "invalid_token"))
    assert parsed == UpstreamChallenge("bearer", realm, 'svc "x"')


_header_text = st.text(alphabet=st.characters(codec="latin-1"), max_size=80)


@given(st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n\x00"), min_size=1, max_size=40))
def test_bearer_challenge_round_trips(realm: str) -> None:
    parsed = parse_challenge(bearer_challenge(realm, "service.example"))
    assert parsed == UpstreamChallenge("bearer", realm, "service.example")


@given(st.one_of(_header_text, st.text(max_size=80)))
def test_parse_challenge_never_raises(header: str) -> None:
    parsed = parse_challenge(header)
    if parsed is not None:
        assert parsed.scheme == parsed.scheme.lower()


@given(st.lists(st.sampled_from(["Bearer", "Basic", " ", ",", "=", '"', "\\", "realm", "service", "x"]), max_size=20))
def test_parse_challenge_never_raises_on_challenge_like_text(parts: list[str]) -> None:
    parse_challenge("".join(parts))
