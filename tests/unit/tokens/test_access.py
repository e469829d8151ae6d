"""tokens/access.py: what a request names, and whether the client's token allows it (no proxy)."""

from __future__ import annotations

import logging

import pytest
from regproxy.config import Mapping, Upstream
from regproxy.mapping.matcher import Matcher
from regproxy.protocol.errors import RegistryError
from regproxy.protocol.names import parse_route
from regproxy.tokens.access import (
    Allowed,
    Answer,
    Asked,
    Challenge,
    Presented,
    authorize,
    log_path,
    mirror_ns,
    read_token,
)
from regproxy.tokens.paseto import AccessToken, Grant, TokenCodec, TokenError

CAP = "0ebb01be-0a22-4639-898c-bc8c2d20942d"
BP = Mapping("bp/", ("bp",), True, Upstream("http", "127.0.0.1", 5001), "backplane")
SECRET = Mapping(
    f"{CAP}/nginx",
    (CAP, "nginx"),
    False,
    Upstream("https", "registry.example.com", 443),
    "private/nginx",
    auth="Basic cm9ib3Q6cw==",
    capability=True,
)
GHCR = Mapping("gh/", ("gh",), True, Upstream("https", "ghcr.io", 443), "", mirror_of=("ghcr.io",))
ONLY = Mapping("only/", ("only",), True, Upstream("http", "127.0.0.1", 5004), "", hosts=("images.example.org",))
MATCHER = Matcher((BP, SECRET, GHCR, ONLY))
CODEC = TokenCodec((b"k" * 32,))
BASE = "http://reg.test"


def asked(path: str, host: str | None = "reg.test", ns: str | None = None) -> Asked:
    target, _, query = path.partition("?")
    return Asked(parse_route(target), target, query, host, ns)


def holding(*grants: Grant) -> Presented:
    return Presented(AccessToken(BASE, grants, 0, 2**40))


def pull(mapping: Mapping, *names: str, upstream_token: str | None = "UP") -> Presented:
    return holding(Grant(mapping.identity, names, upstream_token))


# --- mirror_ns ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (False, None)),
        ("n=10", (False, None)),
        ("ns=ghcr.io", (True, "ghcr.io")),
        ("ns=GHCR.io&n=1", (True, "ghcr.io")),
        ("ns=ghcr.io&ns=ghcr.io", (True, "ghcr.io")),
        ("ns=ghcr.io&ns=docker.io", (True, None)),
        ("ns=bad..host", (True, None)),
        ("ns=", (True, None)),
        ("dns=x", (False, None)),
    ],
)
def test_mirror_ns_tells_asked_from_well_formed(query: str, expected: tuple[bool, str | None]) -> None:
    assert mirror_ns(query) == expected


# --- log_path -----------------------------------------------------------------------------


def test_log_path_hides_capability_like_segments_until_a_mapping_matched() -> None:
    a = asked(f"/v2/{CAP}/nginx/manifests/v1")
    assert log_path(a) == "<capability?>/nginx/manifests/v1"
    match = MATCHER.match(a.route.name, a.host)
    assert match is not None
    assert log_path(a, match) == f"<{SECRET.label}>/manifests/v1"


def test_log_path_of_the_ping_and_the_catalog_is_the_path_and_names_the_mirrored_registry() -> None:
    assert log_path(asked("/v2/")) == "/v2/"
    assert log_path(asked("/v2/_catalog")) == "/v2/_catalog"
    assert log_path(asked("/v2/app/tags/list", ns="ghcr.io")) == "app/tags/list?ns=ghcr.io"


# --- read_token ---------------------------------------------------------------------------


def test_no_authorization_is_no_token_and_no_refusal() -> None:
    for value in (None, ""):
        p = read_token(CODEC, value, BASE)
        assert (p.token, p.refusal, p.error, p.outcome) == (None, None, None, "none")


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer ", "Bearer   ", "Token x", "Bearer v4.local.garbage"])
def test_a_bad_authorization_is_an_invalid_token(value: str) -> None:
    p = read_token(CODEC, value, BASE)
    assert (p.token, p.refusal, p.error, p.outcome) == (None, "invalid_token", "invalid_token", "invalid_token")


def test_a_valid_token_is_read_for_its_audience_only(caplog: pytest.LogCaptureFixture) -> None:
    grant = Grant(BP.identity, ("bp/true",), "UP")
    token = CODEC.issue_access(BASE, (grant,), 60)
    p = read_token(CODEC, f"  bearer {token} ", BASE)
    assert p.token is not None and p.token.grants == (grant,) and p.refusal is None
    with caplog.at_level(logging.DEBUG, "registryproxy"):
        other = read_token(CODEC, f"Bearer {token}", "http://other.test")
    assert other.token is None and other.refusal == "invalid_token"
    assert "token refused:" in caplog.text and token not in caplog.text


def test_an_expired_token_is_refused_as_expired() -> None:
    class Expired(TokenCodec):
        def read_access(self, token: str, audience: str) -> AccessToken:
            raise TokenError("expired")

    p = read_token(Expired((b"k" * 32,)), "Bearer v4.local.x", BASE)
    assert (p.token, p.refusal, p.error) == (None, "expired", "invalid_token")


# --- authorize ----------------------------------------------------------------------------


def test_the_ping_and_the_catalog_challenge_a_client_without_a_token() -> None:
    refused = Presented(None, "expired")
    assert authorize(asked("/v2/"), "GET", Presented(None), MATCHER) == Answer(Challenge(None, None), "none")
    assert authorize(asked("/v2/_catalog"), "GET", refused, MATCHER) == Answer(
        Challenge("registry:catalog:*", "invalid_token"), "invalid_token", "expired"
    )


def test_the_ping_and_the_catalog_list_nothing_to_a_token_holder() -> None:
    token = pull(BP, "bp/true")
    assert authorize(asked("/v2/"), "GET", token, MATCHER) == Answer(b"{}", "ok")
    assert authorize(asked("/v2/_catalog"), "HEAD", token, MATCHER) == Answer(b'{"repositories":[]}', "ok")


def test_a_repository_without_a_token_is_challenged_for_its_scope() -> None:
    answer = authorize(asked("/v2/bp/true/manifests/v1"), "GET", Presented(None, "invalid_token"), MATCHER)
    assert answer == Answer(Challenge("repository:bp/true:pull", "invalid_token"), "invalid_token", "invalid_token")


def test_a_token_without_a_grant_for_the_name_is_insufficient_scope_before_any_lookup() -> None:
    class Untouchable(Matcher):
        def match(self, name: str, host: str | None, ns: str | None = None) -> None:
            raise AssertionError("looked up without a grant")

    answer = authorize(asked("/v2/bp/other/manifests/v1"), "GET", pull(BP, "bp/true"), Untouchable(()))
    assert answer == Answer(
        Challenge("repository:bp/other:pull", "insufficient_scope"), "insufficient scope", "insufficient_scope"
    )


@pytest.mark.parametrize(
    ("path", "host", "ns"),
    [
        ("/v2/nope/app/manifests/v1", "reg.test", None),  # no mapping
        ("/v2/only/app/manifests/v1", "reg.test", None),  # a mapping for other hosts
        ("/v2/app/manifests/v1", "reg.test", "docker.io"),  # a registry no mapping mirrors
        (f"/v2/gh/{CAP}/manifests/v1", "reg.test", None),  # would send a capability key upstream
    ],
)
def test_a_name_no_mapping_serves_is_404_with_the_token_ok(path: str, host: str, ns: str | None) -> None:
    a = asked(path, host, ns)
    answer = authorize(a, "GET", holding(Grant(None, (a.route.name,))), MATCHER)
    assert isinstance(answer, Answer) and answer.match is None and (answer.token, answer.refusal) == ("ok", None)
    assert isinstance(answer.reply, RegistryError) and (answer.reply.status, answer.reply.code) == (404, "NAME_UNKNOWN")


def test_a_grant_from_a_changed_mapping_is_stale_and_names_the_match() -> None:
    answer = authorize(asked("/v2/bp/true/manifests/v1"), "GET", holding(Grant("0" * 20, ("bp/true",))), MATCHER)
    assert isinstance(answer, Answer) and answer.match is not None and answer.match.mapping is BP
    assert (answer.reply, answer.token, answer.refusal) == (
        Challenge("repository:bp/true:pull", "invalid_token"),
        "stale (mapping changed)",
        "invalid_token",
    )


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/v2/bp/true/manifests/v1"), ("DELETE", "/v2/bp/true/manifests/v1")]
)
def test_anything_but_a_pull_is_405_after_the_token_is_checked(method: str, path: str) -> None:
    answer = authorize(asked(path), method, pull(BP, "bp/true"), MATCHER)
    assert isinstance(answer, Answer) and answer.match is not None and answer.token == "ok"
    assert isinstance(answer.reply, RegistryError) and answer.reply.status == 405
    # Without a token, the same request is challenged first.
    challenged = authorize(asked(path), method, Presented(None), MATCHER)
    assert isinstance(challenged, Answer) and isinstance(challenged.reply, Challenge)


def test_an_upload_is_405_even_as_a_get() -> None:
    answer = authorize(asked("/v2/bp/true/blobs/uploads/"), "GET", pull(BP, "bp/true"), MATCHER)
    assert isinstance(answer, Answer) and isinstance(answer.reply, RegistryError) and answer.reply.status == 405


def test_a_pull_is_allowed_through_the_mapping_serving_the_name() -> None:
    allowed = authorize(asked("/v2/bp/true/manifests/v1", ns=None), "HEAD", pull(BP, "bp/true"), MATCHER)
    assert (
        isinstance(allowed, Allowed) and allowed.match.mapping is BP and allowed.match.upstream_name == "backplane/true"
    )
    mirrored = authorize(asked("/v2/owner/app/manifests/v1", ns="ghcr.io"), "GET", pull(GHCR, "owner/app"), MATCHER)
    assert isinstance(mirrored, Allowed) and mirrored.match.mapping is GHCR


def test_the_upstream_credential_is_the_wrapped_token_else_the_mappings_own() -> None:
    name = f"{CAP}/nginx"
    with_token = authorize(asked(f"/v2/{name}/manifests/v1"), "GET", pull(SECRET, name), MATCHER)
    without = authorize(asked(f"/v2/{name}/manifests/v1"), "GET", pull(SECRET, name, upstream_token=None), MATCHER)
    anonymous = authorize(asked("/v2/bp/true/manifests/v1"), "GET", pull(BP, "bp/true", upstream_token=None), MATCHER)
    assert isinstance(with_token, Allowed) and with_token.upstream_auth == "Bearer UP"
    assert isinstance(without, Allowed) and without.upstream_auth == "Basic cm9ib3Q6cw=="
    assert isinstance(anonymous, Allowed) and anonymous.upstream_auth is None
