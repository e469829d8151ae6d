"""What a mapping serves: its `allow` and `deny` patterns and the decisions they take (no mitmproxy).

`patterns` compiles and validates `REPO[:TAG]` patterns; `decide` says whether a repository, a tag or
a digest reference is admitted through a mapping's policy, and why not. The step that applies them is
`steps/policy.py`; the record of digests resolved from admitted tags (`digests: resolved`) lives in the
cache store (cache/keys.py).
"""

from .decide import Decision, Policy, decide, narrowed, refuses_repository, signed_digest, spellings
from .patterns import Pattern, PolicyError, compile_pattern

__all__ = [
    "Decision",
    "Pattern",
    "Policy",
    "PolicyError",
    "compile_pattern",
    "decide",
    "narrowed",
    "refuses_repository",
    "signed_digest",
    "spellings",
]
