"""Redaction of tokens, credentials and capability keys from text (debug/redact.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import loads
from regproxy.debug.redact import Redactor, capability_keys
from rig.keys import CAP


def test_capability_keys_are_the_secret_segments_of_capability_mappings() -> None:
    config = loads(
        f"proxies:\n  '{CAP}/nginx':\n    registry: ghcr.io\n    remote: a/b\n"
        "  'team/':\n    registry: ghcr.io\n  'hidden/app':\n    registry: ghcr.io\n    remote: x\n"
        "    capability: true\n",
        environ={},
    )
    assert capability_keys(config.mappings) == [CAP, "hidden/app"]  # longest first


def test_tokens_credentials_and_keys_are_replaced() -> None:
    r = Redactor([CAP])
    text = (
        f'Bearer realm="https://r/token",scope="repository:{CAP}/nginx:pull" '
        "Authorization: Basic dXNlcjpwYXNz Bearer abc.def "
        '{"token": "v4.local.AAAA.eyJraWQiOiAiMSJ9", "access_token":"x", "expires_in": 60} '
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.sig grant_type=password&password=hunter2&refresh_token=v4.local.B"
    )
    out = r.text(text)
    for secret in (CAP, "dXNlcjpwYXNz", "abc.def", "v4.local.", "eyJ", "hunter2"):
        assert secret not in out
    assert "expires_in" in out and "grant_type=password" in out
    assert 'realm="https://r/token"' in out  # the challenge's scheme word is not a credential


def test_plain_text_is_unchanged() -> None:
    assert Redactor([CAP]).text("GET team/app/manifests/v1 status=200") == "GET team/app/manifests/v1 status=200"


@given(
    st.lists(
        st.sampled_from(
            [
                "Bearer abc.def",
                "BASIC dXNlcjpwdw==",
                "v4.local.AAAA",
                "V2.public.x",
                "eyJhbGciOi.eyJzdWIi.sig",
                '"TOKEN": "x"',
                "Password=hunter2",
                "access_token=z",
                "5F0C2B7E-8A41-4D93-B6E2-71C9A3D04F58",
                "5f0c2b7e-8a41-4d93-b6e2-71c9a3d04f58",
                "plain text",
                " ",
                "/v2/bp/true",
            ]
        )
        | st.text(max_size=20),
        max_size=6,
    )
)
def test_the_fast_check_never_skips_what_text_would_change(parts: list[str]) -> None:
    redactor = Redactor(["5f0c2b7e-8a41-4d93-b6e2-71c9a3d04f58"])
    value = "".join(parts)
    full = _full_text(redactor, value)
    assert redactor.text(value) == full
    if full != value:
        assert redactor.needed(value)


class _NoFastCheck(Redactor):
    """`Redactor.text` without its fast check."""

    def needed(self, value: str) -> bool:
        return True


def _full_text(redactor: Redactor, value: str) -> str:
    return _NoFastCheck(["5f0c2b7e-8a41-4d93-b6e2-71c9a3d04f58"]).text(value)
