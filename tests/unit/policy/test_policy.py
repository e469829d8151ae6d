"""policy/: REPO[:TAG] patterns (compiled, validated) and the decisions a mapping's policy takes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.policy import Policy, PolicyError, compile_pattern, decide, refuses_repository, signed_digest, spellings
from regproxy.protocol.names import COMPONENT, TAG_RE

HEX = "ab" * 32
SEGMENT = st.from_regex(re.compile(COMPONENT), fullmatch=True).filter(lambda s: len(s) <= 20)
NAMES = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)
TAGS = st.from_regex(TAG_RE, fullmatch=True)


def policy(allow: list[str] | None = None, deny: list[str] = (), digests: bool = False) -> Policy:  # type: ignore[assignment]
    return Policy(
        tuple(compile_pattern(p) for p in allow) if allow is not None else None,
        tuple(compile_pattern(p) for p in deny),
        digests,
    )


def admitted(p: Policy, name: str, tag: str | None) -> bool:
    return decide(p, (name,), tag).admitted


# --- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("library/*", "library/nginx", True),
        ("library/*", "library/nginx/x", False),
        ("library/*", "library", False),
        ("library/*", "libraryx/nginx", False),
        ("lib*/nginx", "library/nginx", True),
        ("grafana/**", "grafana/loki", True),
        ("grafana/**", "grafana/a/b/c", True),
        ("grafana/**", "grafana", True),
        ("grafana/**", "grafanax/loki", False),
        ("**/nginx", "nginx", True),
        ("**/nginx", "a/b/nginx", True),
        ("**/nginx", "a/b/nginx2", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/**/b", "a/x/b", True),
        ("**", "anything/at/all", True),
        ("bitnami/redis", "bitnami/redis", True),
        ("bitnami/redis", "bitnami/redis-cluster", False),
        ("a.b", "axb", False),
    ],
)
def test_the_repository_part(pattern: str, name: str, matches: bool) -> None:
    assert compile_pattern(pattern).matches_repository(name) is matches


@pytest.mark.parametrize(
    ("pattern", "tag", "matches"),
    [
        ("x:v*", "v1.2", True),
        ("x:v*", "1.2", False),
        ("x:latest", "latest", True),
        ("x:latest", "LATEST", False),  # tags are case-sensitive, as registries compare them
        ("x:latest", "latest2", False),
        ("x:v?", "v1", True),
        ("x:v?", "v10", False),
        ("x:1.2", "1x2", False),
        ("x", "anything", True),
    ],
)
def test_the_tag_part(pattern: str, tag: str, matches: bool) -> None:
    assert compile_pattern(pattern).matches_tag(tag) is matches


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ":latest",
        "library/",
        "/library",
        "library//nginx",
        "Library/*",
        "library/nginx:",  # a trailing `:`: no tag
        "library/nginx:a:b",
        "library/**x",
        "library/%2fx",
        "library/../x",
        "library/.",
        "library\\x",
        "a b",
        "x:" + "t" * 129,
        "x" * 401,
        3,
        None,
    ],
)
def test_bad_patterns_are_refused_naming_the_pattern(bad: object) -> None:
    with pytest.raises(PolicyError) as info:
        compile_pattern(bad)
    message = str(info.value)
    assert "\n" not in message and repr(bad)[:20] in message


@given(NAMES, NAMES)
def test_a_star_never_matches_across_segments(prefix: str, rest: str) -> None:
    pattern = compile_pattern(f"{prefix}/*")
    assert pattern.matches_repository(f"{prefix}/{rest}") is ("/" not in rest)


@given(NAMES)
def test_a_name_matches_itself_and_double_star_matches_every_name(name: str) -> None:
    assert compile_pattern(name).matches_repository(name)
    assert compile_pattern("**").matches_repository(name)
    assert not compile_pattern(name).matches_repository(name + "x/y")


@given(NAMES, TAGS)
def test_deny_wins_over_allow(name: str, tag: str) -> None:
    p = policy(allow=["**"], deny=[f"{name}:{tag.replace('*', '')}"])
    if signed_digest(tag) is None:
        assert not admitted(p, name, tag)
    assert admitted(p, name, None)  # a tag deny does not refuse the repository


# --- decisions -----------------------------------------------------------------------------------

ISSUE = policy(allow=["library/*", "bitnami/redis", "grafana/**:v*"], deny=["library/*:latest", "library/busybox"])


@pytest.mark.parametrize(
    ("name", "tag", "refused"),
    [
        ("library/nginx", "1.27", None),
        ("library/nginx", "latest", "tag"),
        ("library/nginx", None, None),
        ("library/busybox", "1.36", "repository"),
        ("library/busybox", None, "repository"),
        ("bitnami/redis", "latest", None),
        ("bitnami/redis-cluster", "1", "repository"),
        ("grafana/loki", "v3", None),
        ("grafana/loki/x", "v3", None),
        ("grafana/loki", "3", "tag"),
        ("grafana/loki", None, None),  # a digest: tag parts apply to tags
        ("other/thing", "v1", "repository"),
        ("library/nginx/deeper", "1", "repository"),
    ],
)
def test_the_issues_example(name: str, tag: str | None, refused: str | None) -> None:
    assert decide(ISSUE, (name,), tag).refused == refused


def test_no_allow_admits_everything_but_the_denied() -> None:
    p = policy(deny=["x:latest"])
    assert admitted(p, "anything/else", "v1") and admitted(p, "x", "v1") and not admitted(p, "x", "latest")
    assert not refuses_repository(p, ("x",))


def test_an_empty_allow_admits_nothing() -> None:
    assert refuses_repository(policy(allow=[]), ("x",))


def test_signature_tags_are_admitted_with_the_digest_they_name() -> None:
    for suffix in ("sig", "att", "sbom"):
        decision = decide(policy(allow=["x:v1"], deny=["x:sha256-*"]), ("x",), f"sha256-{HEX}.{suffix}")
        assert decision.admitted and decision.signature_of == f"sha256:{HEX}"
    assert signed_digest(f"sha256-{HEX}.sig.x") is None and signed_digest(f"sha256-{HEX[:-1]}.sig") is None
    assert signed_digest(f"sha256-{HEX.upper()}.sig") is None
    # ... but not in a repository the policy refuses.
    assert decide(policy(deny=["x"]), ("x",), f"sha256-{HEX}.sig").refused == "repository"


def test_docker_hubs_implied_library_is_one_repository() -> None:
    assert spellings("busybox", True) == ("busybox", "library/busybox")
    assert spellings("library/busybox", True) == ("library/busybox", "busybox")
    assert spellings("busybox", False) == ("busybox",)
    assert spellings("library/a/b", True) == ("library/a/b",)
    deny = policy(deny=["library/busybox"])
    assert refuses_repository(deny, spellings("busybox", True))
    assert decide(policy(allow=["alpine"]), spellings("library/alpine", True), "3").admitted
