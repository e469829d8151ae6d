"""policy/decide.py: the decisions a mapping's policy takes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.policy import Policy, compile_pattern, decide, narrowed, refuses_repository, signed_digest, spellings
from regproxy.protocol.names import COMPONENT, TAG_RE

HEX = "ab" * 32
SEGMENT = st.from_regex(re.compile(COMPONENT), fullmatch=True).filter(lambda s: len(s) <= 20)
NAMES = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)
TAGS = st.from_regex(TAG_RE, fullmatch=True)


def policy(allow: list[str] | None = None, deny: tuple[str, ...] | list[str] = (), digests: bool = False) -> Policy:
    return Policy(
        tuple(compile_pattern(p) for p in allow) if allow is not None else None,
        tuple(compile_pattern(p) for p in deny),
        digests,
    )


def admitted(p: Policy, name: str, tag: str | None) -> bool:
    return decide(p, (name,), tag).admitted


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


PATTERNS = st.sampled_from(["library/*", "library/*:latest", "**", "**:v*", "a/**", "a/*/c:1.?", "b", "lib*/x:*x"])


@given(st.lists(PATTERNS, max_size=4) | st.none(), st.lists(PATTERNS, max_size=4), NAMES, TAGS)
def test_narrowing_to_a_repository_decides_as_the_whole_policy(
    allow: list[str] | None, deny: list[str], name: str, tag: str
) -> None:
    whole = policy(allow, deny)
    names = spellings(name, True)
    assert decide(narrowed(whole, names), names, tag) == decide(whole, names, tag)
    assert decide(narrowed(whole, names), names, None) == decide(whole, names, None)
