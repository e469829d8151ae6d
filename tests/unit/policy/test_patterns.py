"""policy/patterns.py: REPO[:TAG] patterns, compiled and validated."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.policy import PolicyError, compile_pattern
from regproxy.protocol.names import COMPONENT, TAG_RE

HEX = "ab" * 32
SEGMENT = st.from_regex(re.compile(COMPONENT), fullmatch=True).filter(lambda s: len(s) <= 20)
NAMES = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)
TAGS = st.from_regex(TAG_RE, fullmatch=True)


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
