"""Keys the tests share, so that one name means one value everywhere.

- `CAP`: a capability key in UUID form (a mapping `CAP/nginx` or `CAP/app` is reached only by who knows
  it); unit, hook and end-to-end tests use it;
- `CAP20`: a capability key of 20 hex characters (no UUID), the shortest kind the configuration accepts.
"""

from __future__ import annotations

CAP = "0ebb01be-0a22-4639-898c-bc8c2d20942d"
CAP20 = "b7e2d4f6a8c0e2f4a6b8"

__all__ = ["CAP", "CAP20"]
