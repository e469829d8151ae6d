"""Which mapping a link segment stands for, and whether it is still good: one place for routes and tokens.

`LinkBook` holds what one loaded configuration says about links: the link key of every secret key
(a link minted under any key still listed verifies; removing the key ends its links), the mappings'
references under each, the revoked ids and the clock. `resolve` answers None for anything that is not a
genuine link of a mapping still configured (a changed character, a foreign key, garbage): the caller
answers that as it answers an unknown name. Every key is tried, without stopping at the first that
fits, so the work does not depend on which key (if any) tagged the segment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .codec import LinkKey, decode

LinkState = Literal["ok", "expired", "revoked"]


@dataclass(frozen=True)
class LinkUse:
    """A genuine link as resolved now: its id, expiry, the key of the mapping it stands for, its state and
    the seconds it has left (0 once expired)."""

    id: str
    expires_at: int
    mapping_key: str
    state: LinkState
    remaining: float

    @property
    def expiry(self) -> str:
        """The expiry in UTC, as messages and the command line show it."""
        return utc(self.expires_at)

    @property
    def refusal(self) -> str | None:
        """The DENIED message for a link that is no longer good, else None."""
        if self.state == "revoked":
            return "this link was revoked"
        if self.state == "expired":
            return f"this link expired at {self.expiry}"
        return None


def utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LinkBook:
    def __init__(
        self,
        secrets: Iterable[bytes],
        mapping_keys: Iterable[str],
        revoked: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = [LinkKey(s) for s in secrets]
        names = list(mapping_keys)
        self._refs = [{k.ref(name): name for name in names} for k in self._keys]
        self._revoked = frozenset(revoked)
        self._clock = clock

    def resolve(self, segment: str) -> LinkUse | None:
        """The genuine link `segment` is, with its state now; None for anything else."""
        body = decode(segment)
        if body is None:
            return None
        found: tuple[str, int, str] | None = None
        for key, refs in zip(self._keys, self._refs, strict=True):
            link = key.open(body)
            mapping_key = refs.get(link.ref) if link is not None else None
            if link is not None and mapping_key is not None and found is None:
                found = (link.id, link.expires_at, mapping_key)
        if found is None:
            return None
        link_id, expires_at, mapping_key = found
        remaining = max(0.0, expires_at - self._clock())
        state: LinkState = "revoked" if link_id in self._revoked else "ok" if remaining > 0 else "expired"
        return LinkUse(link_id, expires_at, mapping_key, state, remaining)
