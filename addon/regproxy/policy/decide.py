"""Whether a mapping's policy admits a repository, a tag or a digest reference, and why not.

The rules, in order (`decide`):
- a `deny` pattern without a tag part that matches the repository refuses it, whatever the reference;
- with `allow`, a repository no `allow` pattern's repository part matches is refused;
- a tag of the signature schema (`sha256-<hex>.sig`, `.att`, `.sbom`) is admitted with the digest it names
  (`Decision.signature_of`: the step admits it when that digest is admitted), whatever the tag rules say;
- a tag some `deny` pattern matches (repository and tag) is refused: deny wins;
- with `allow`, a tag is admitted when an `allow` pattern matches repository and tag; else refused;
- a digest reference (and a tags list, a blob) is decided by the repository alone: tag parts apply to
  tags. `digests: resolved` (`Policy.digests_resolved`) narrows digests further; the step asks the cache
  store's record of digests resolved from admitted tags for that.

A repository may have several spellings (Docker Hub's `busybox` is `library/busybox`): every one is
decided, a refusal of any refuses, an admission of any admits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .patterns import Pattern

_SIGNATURE_TAG_RE = re.compile(r"sha256-([0-9a-f]{64})\.(?:sig|att|sbom)")

Refusal = Literal["repository", "tag", "digest"]


@dataclass(frozen=True)
class Policy:
    """A mapping's `allow` (None: every repository) and `deny` patterns, and `digests: resolved`."""

    allow: tuple[Pattern, ...] | None = None
    deny: tuple[Pattern, ...] = ()
    digests_resolved: bool = False

    @property
    def restricts(self) -> bool:
        """Whether this policy refuses anything at all."""
        return self.allow is not None or bool(self.deny) or self.digests_resolved


@dataclass(frozen=True)
class Decision:
    """Admitted, or what is refused (`refused`); for a signature tag, the digest it is the signature of."""

    refused: Refusal | None = None
    signature_of: str | None = None

    @property
    def admitted(self) -> bool:
        return self.refused is None


ADMITTED = Decision()


def signed_digest(tag: str) -> str | None:
    """The digest (`sha256:<hex>`) a signature, attestation or SBOM tag names; None for any other tag."""
    m = _SIGNATURE_TAG_RE.fullmatch(tag)
    return f"sha256:{m[1]}" if m else None


def spellings(rest: str, library_implied: bool) -> tuple[str, ...]:
    """The names a repository below the key goes by: with `library_implied` (a Docker Hub upstream with no
    `remote`, where `busybox` is `library/busybox`) both spellings, else `rest` alone."""
    if library_implied:
        if "/" not in rest:
            return (rest, f"library/{rest}")
        head, _, tail = rest.partition("/")
        if head == "library" and "/" not in tail:
            return (rest, tail)
    return (rest,)


def narrowed(policy: Policy, names: Sequence[str]) -> Policy:
    """The policy with only the patterns whose repository part matches one of `names`: it decides every
    reference of that repository as `policy` does, faster (a tags list decides each of its tags)."""

    def keep(patterns: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
        return tuple(p for p in patterns if any(p.matches_repository(n) for n in names))

    allow = keep(policy.allow) if policy.allow is not None else None
    return Policy(allow, keep(policy.deny), policy.digests_resolved)


def refuses_repository(policy: Policy, names: Sequence[str]) -> bool:
    """Whether the policy refuses the repository whatever the reference (what the token endpoint asks)."""
    if any(p.tag is None and p.matches_repository(n) for p in policy.deny for n in names):
        return True
    if policy.allow is None:
        return False
    return not any(p.matches_repository(n) for p in policy.allow for n in names)


def decide(policy: Policy, names: Sequence[str], tag: str | None) -> Decision:
    """The decision for a tag of the repository spelled `names`, or (tag None) for the repository itself:
    a digest reference, a blob, a tags list."""
    if refuses_repository(policy, names):
        return Decision("repository")
    if tag is None:
        return ADMITTED
    signed = signed_digest(tag)
    if signed is not None:
        return Decision(signature_of=signed)
    if any(p.tag is not None and p.matches_repository(n) and p.matches_tag(tag) for p in policy.deny for n in names):
        return Decision("tag")
    if policy.allow is None:
        return ADMITTED
    if any(p.matches_repository(n) and p.matches_tag(tag) for p in policy.allow for n in names):
        return ADMITTED
    return Decision("tag")
