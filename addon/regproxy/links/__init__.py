"""Share links: capability URLs that expire and can be revoked, minted without touching the configuration.

`codec` makes and checks the link segment (an HMAC under a key derived from the secret key for links
alone); `book` resolves a segment against the configured keys, revocations and a clock; `durations`
reads `--expires 14d` and `link_max_age`. Pure: no mitmproxy import.
"""

from .book import LinkBook, LinkUse
from .codec import LINK_ID_RE, LINK_LENGTH, LINK_PATTERN, MARKER, Link, LinkKey, looks_like_link, mint, new_link_id
from .durations import DurationError, parse_duration

__all__ = [
    "LINK_ID_RE",
    "LINK_LENGTH",
    "LINK_PATTERN",
    "MARKER",
    "DurationError",
    "Link",
    "LinkBook",
    "LinkKey",
    "LinkUse",
    "looks_like_link",
    "mint",
    "new_link_id",
    "parse_duration",
]
