"""Redaction of secrets from text: one mechanism for everything that is kept or shown.

Tokens (PASETOs, JWTs), credentials after an auth scheme, share links (anything of a link's shape:
they are minted, not configured) and the configured capability keys are replaced. Used on flows before they are saved (`-w`), where the proxy cannot stop the bytes that
were sent to a client from also being recorded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..config import Mapping
from ..links import LINK_PATTERN, MARKER
from ..protocol.names import looks_like_capability

_PASETO = re.compile(r"v[1-4]\.(?:local|public)\.[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)?")
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
# A credential after its scheme word; not a challenge's `realm="…"` (possessive, so no backtracking).
_CREDENTIAL = re.compile(r'(?i)\b(basic|bearer)(\s+)[A-Za-z0-9+/._\-~]++=*+(?!")')
_LINK = re.compile(LINK_PATTERN, re.IGNORECASE)
_FORM_SECRET = re.compile(r"(?i)\b(password|refresh_token|access_token|token)=[^&\s]*")
_JSON_SECRET = re.compile(r'(?i)"(token|access_token|refresh_token|password)"\s*:\s*"[^"]*"')


def capability_keys(mappings: Iterable[Mapping]) -> list[str]:
    """The secret parts of capability mappings' keys: their capability-like segments, else the key."""
    keys: set[str] = set()
    for m in mappings:
        if not m.capability:
            continue
        secret = [s for s in m.prefix if looks_like_capability(s)]
        keys.update(secret or ["/".join(m.prefix)])
    return sorted(keys, key=len, reverse=True)


# Every pattern above (matched case-insensitively here) contains one of these: text holding none
# of them (nor a capability key) is returned as it is, after a few substring scans (most headers and
# log lines hold nothing to redact, and a regular expression over them costs ten times more).
_TRIGGERS = ("v1.", "v2.", "v3.", "v4.", "eyj", "basic", "bearer", "token", "password", MARKER)


class Redactor:
    """`capabilities` are shown as `<capability>`; `secrets` (the cache's S3 credentials: values the
    configuration read from the environment) as `[redacted]`."""

    def __init__(self, capabilities: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        self._caps = [c for c in capabilities if c]
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._triggers = _TRIGGERS + tuple(c.lower() for c in self._caps) + tuple(s.lower() for s in self._secrets)

    def needed(self, value: str) -> bool:
        """Whether `text` could change `value` (no false negatives)."""
        lowered = value.lower()
        return any(t in lowered for t in self._triggers)

    def text(self, value: str) -> str:
        if not self.needed(value):
            return value
        value = _JSON_SECRET.sub(lambda m: f'"{m[1]}":"[redacted]"', value)
        value = _FORM_SECRET.sub(lambda m: f"{m[1]}=[redacted]", value)
        value = _CREDENTIAL.sub(lambda m: f"{m[1]}{m[2]}[redacted]", value)
        value = _PASETO.sub("[token]", value)
        value = _JWT.sub("[token]", value)
        value = _LINK.sub("<link>", value)
        for cap in self._caps:
            value = value.replace(cap, "<capability>")
        for secret in self._secrets:
            value = value.replace(secret, "[redacted]")
        return value
