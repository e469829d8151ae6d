"""`REPO[:TAG]` patterns: compiled once at load, validated strictly (one line naming the bad pattern).

`REPO` is a repository name below the mapping's key, segment by segment: a segment `**` matches any
number of whole segments (none included), `*` inside a segment matches any run of characters within that
segment (never a `/`). Every other character must be one a repository name may hold (lower-case letters,
digits, `.`, `_`, `-`), so a pattern can never be spelled so that it matches nothing by accident
(`Library/*`, `library//x`). `:TAG` is a glob on the tag: `*` any run, `?` one character, the rest as
tags are spelled (case-sensitive, as registries compare tags). No `:TAG`: the pattern names the
repository whatever the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PATTERN = 400
_SEGMENT_RE = re.compile(r"[a-z0-9._*-]+")
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?-]{1,128}")


class PolicyError(ValueError):
    """A pattern that cannot be compiled; the message names it, on one line."""


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern: its text, the repository part and the tag part (None: any reference)."""

    text: str
    repo: re.Pattern[str]
    tag: re.Pattern[str] | None

    def matches_repository(self, name: str) -> bool:
        """Whether the repository part matches this name (segments below the mapping's key)."""
        return self.repo.fullmatch(name + "/") is not None

    def matches_tag(self, tag: str) -> bool:
        """Whether the tag part matches (True without a tag part)."""
        return self.tag is None or self.tag.fullmatch(tag) is not None


def compile_pattern(text: object) -> Pattern:
    """A pattern from its text. Raises PolicyError naming the pattern and what is wrong with it."""
    if not isinstance(text, str):
        raise PolicyError(f"{_show(text)} is not a REPO[:TAG] pattern (a string)")
    if not text or len(text) > MAX_PATTERN:
        raise PolicyError(f"{_show(text)} is not a REPO[:TAG] pattern (empty or over {MAX_PATTERN} characters)")
    repo, sep, tag = text.partition(":")
    if sep and not _TAG_GLOB_RE.fullmatch(tag):
        raise PolicyError(
            f"{_show(text)}: the tag part must be a glob of tag characters (A-Z a-z 0-9 _ . -, * and ?), 1-128 long"
        )
    return Pattern(text, _repo_regex(text, repo), _tag_regex(tag) if sep else None)


def _repo_regex(text: str, repo: str) -> re.Pattern[str]:
    """The repository part as a regex over `name + "/"`: each segment with its `/`, `**` any run of them."""
    if not repo:
        raise PolicyError(f"{_show(text)}: the repository part is empty (use ** for every repository)")
    parts: list[str] = []
    for segment in repo.split("/"):
        if segment == "**":
            if parts and parts[-1] == "(?:[^/]+/)*":
                continue  # `**/**` is `**`
            parts.append("(?:[^/]+/)*")
            continue
        if not _SEGMENT_RE.fullmatch(segment) or "**" in segment or segment.strip(".") == "":
            raise PolicyError(
                f"{_show(text)}: each repository segment is ** or lower-case letters, digits, . _ - and *"
                " (no empty, . or .. segment, no ** inside a segment)"
            )
        parts.append("[^/]*".join(re.escape(p) for p in segment.split("*")) + "/")
    return re.compile("".join(parts))


def _tag_regex(tag: str) -> re.Pattern[str]:
    out = []
    for c in tag:
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
    return re.compile("".join(out))


def _show(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."
