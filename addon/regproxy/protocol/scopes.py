"""Token scopes (`repository:NAME:ACTIONS`) as clients send them to the token endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from .names import is_valid_name

# What a client may be granted through a mapping: pulls only.
ALLOWED_ACTIONS = frozenset({"pull"})
MAX_SCOPES = 64


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scope(text: str) -> Scope | None:
    """One scope, split from the right (a name may hold `host:port`); None if malformed."""
    head, sep, actions = text.rpartition(":")
    if not sep:
        return None
    type_, sep, name = head.partition(":")
    if not sep or not type_ or not name:
        return None
    acts = tuple(a for a in actions.split(",") if a)
    return Scope(type_, name, acts)


def split_scopes(values: list[str]) -> list[str]:
    """Scope parameters may repeat, and one value may hold several space-separated scopes."""
    return [s for v in values for s in v.split(" ") if s]


def pull_names(values: list[str]) -> list[str]:
    """The repository names that the requested scopes may be granted for, actions cut to pull.

    A scope that is malformed, of another type (`registry:catalog:*`), names an invalid
    repository or asks for nothing a mapping allows is dropped, as a token server drops
    what it does not grant. Order is kept and duplicates removed.
    """
    names: dict[str, None] = {}
    for text in split_scopes(values)[:MAX_SCOPES]:
        scope = parse_scope(text)
        if scope is None or scope.type not in ("repository", "repository(plugin)"):
            continue
        if not is_valid_name(scope.name):
            continue
        if "*" in scope.actions or ALLOWED_ACTIONS.intersection(scope.actions):
            names[scope.name] = None
    return list(names)


def repository_scope(name: str, actions: str = "pull") -> str:
    return f"repository:{name}:{actions}"
