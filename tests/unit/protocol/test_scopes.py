"""Token scopes as clients send them (protocol/scopes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.protocol.names import is_valid_name
from regproxy.protocol.scopes import MAX_SCOPES, Scope, parse_scope, pull_names, repository_scope, split_scopes


def test_parse_scope() -> None:
    assert parse_scope("repository:bp/app:pull") == Scope("repository", "bp/app", ("pull",))


def test_parse_scope_splits_from_the_right() -> None:
    assert parse_scope("repository:127.0.0.1:5000/foo:pull") == Scope("repository", "127.0.0.1:5000/foo", ("pull",))


def test_parse_scope_several_actions() -> None:
    assert parse_scope("repository:a:pull,push") == Scope("repository", "a", ("pull", "push"))


def test_parse_scope_drops_empty_actions() -> None:
    assert parse_scope("repository:a:,pull,") == Scope("repository", "a", ("pull",))


def test_scope_str_round_trip() -> None:
    text = "repository:a/b:pull,push"
    scope = parse_scope(text)
    assert scope is not None and str(scope) == text


@pytest.mark.parametrize("text", ["", "repository", "repository:a", ":a:pull", "repository::pull", "nocolons"])
def test_malformed_scopes(text: str) -> None:
    assert parse_scope(text) is None


def test_split_scopes_repeated_and_space_separated() -> None:
    assert split_scopes(["repository:a:pull repository:b:pull", "repository:c:pull", "  "]) == [
        "repository:a:pull",
        "repository:b:pull",
        "repository:c:pull",
    ]


def test_pull_names_keeps_pull() -> None:
    assert pull_names(["repository:a:pull"]) == ["a"]


def test_pull_names_keeps_pull_push() -> None:
    assert pull_names(["repository:a:pull,push"]) == ["a"]


def test_pull_names_keeps_star() -> None:
    assert pull_names(["repository:a:*"]) == ["a"]


@pytest.mark.parametrize("actions", ["push", "delete", "push,delete", ""])
def test_pull_names_drops_scopes_without_pull(actions: str) -> None:
    assert pull_names([f"repository:a:{actions}"]) == []


def test_pull_names_drops_catalog() -> None:
    assert pull_names(["registry:catalog:*"]) == []


def test_pull_names_accepts_plugin_repository_type() -> None:
    assert pull_names(["repository(plugin):a/b:pull"]) == ["a/b"]


@pytest.mark.parametrize(
    "scope",
    [
        "repository:A:pull",
        "repository:a/../b:pull",
        "repository:a%2fb:pull",
        "repository:127.0.0.1:5000/foo:pull",
        "repository::pull",
        "garbage",
        "other:a:pull",
    ],
)
def test_pull_names_drops_invalid(scope: str) -> None:
    assert pull_names([scope]) == []


def test_pull_names_keeps_order_and_removes_duplicates() -> None:
    values = ["repository:b:pull repository:a:pull", "repository:b:pull,push", "repository:c:*"]
    assert pull_names(values) == ["b", "a", "c"]


def test_pull_names_handles_mixed_request() -> None:
    values = ["registry:catalog:* repository:bp/app:pull,push", "repository:bp/app:push repository:bp/web:pull"]
    assert pull_names(values) == ["bp/app", "bp/web"]


def test_pull_names_is_bounded() -> None:
    values = [" ".join(f"repository:n{i}:pull" for i in range(MAX_SCOPES + 10))]
    assert pull_names(values) == [f"n{i}" for i in range(MAX_SCOPES)]


def test_repository_scope() -> None:
    assert repository_scope("a/b") == "repository:a/b:pull"
    assert repository_scope("a/b", "pull,push") == "repository:a/b:pull,push"


# --- properties ---

_scope_text = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda t, n, a: f"{t}:{n}:{a}",
        st.sampled_from(["repository", "registry", "repository(plugin)", "", "x"]),
        st.text(alphabet="aAb0./:_-%\\ ", max_size=20),
        st.sampled_from(["pull", "push", "*", "pull,push", "", "delete", ",pull"]),
    ),
)


@given(st.lists(_scope_text, max_size=6))
def test_pull_names_returns_only_valid_unique_names(values: list[str]) -> None:
    names = pull_names(values)
    assert all(is_valid_name(n) for n in names)
    assert len(names) == len(set(names))


@given(st.lists(_scope_text, max_size=6))
def test_pull_names_only_returns_requested_pull_names(values: list[str]) -> None:
    requested = set()
    for text in split_scopes(values):
        scope = parse_scope(text)
        if scope is not None and ("pull" in scope.actions or "*" in scope.actions):
            requested.add(scope.name)
    assert set(pull_names(values)) <= requested


@given(st.text(max_size=60))
def test_parse_scope_never_raises(text: str) -> None:
    scope = parse_scope(text)
    if scope is not None:
        assert scope.type and scope.name
        assert all(scope.actions) and all("," not in a and ":" not in a for a in scope.actions)
