"""The registry error format and the errors made from a status alone (protocol/errors.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.protocol.errors import MESSAGES, SPEC_CODES, RegistryError, for_proxy_failure, for_upstream_status
from regproxy.protocol.names import RouteKind

ROUTE_KINDS = [k.value for k in RouteKind]


def _entry(err: RegistryError) -> dict[str, object]:
    doc = json.loads(err.body())
    assert list(doc) == ["errors"] and len(doc["errors"]) == 1
    entry: dict[str, object] = doc["errors"][0]
    return entry


def test_body_is_the_spec_shape_with_the_standard_message() -> None:
    err = RegistryError(404, "MANIFEST_UNKNOWN")
    assert err.body() == b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown to registry"}]}'


def test_body_carries_a_given_message_and_detail() -> None:
    err = RegistryError(400, "DIGEST_INVALID", "invalid digest", {"digest": "sha256:zzz"})
    assert _entry(err) == {"code": "DIGEST_INVALID", "message": "invalid digest", "detail": {"digest": "sha256:zzz"}}


def test_unknown_codes_are_refused() -> None:
    with pytest.raises(ValueError):
        RegistryError(404, "NOT_A_CODE")


def test_codes_have_the_spec_form() -> None:
    assert SPEC_CODES <= set(MESSAGES)
    assert all(code.replace("_", "").isalpha() and code.isupper() for code in MESSAGES)
    assert len(SPEC_CODES) == 14  # distribution-spec v1.1, "Error Codes"


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (401, "manifest", (401, "UNAUTHORIZED")),
        (403, "blob", (403, "DENIED")),
        (404, "manifest", (404, "MANIFEST_UNKNOWN")),
        (404, "blob", (404, "BLOB_UNKNOWN")),
        (404, "tags", (404, "NAME_UNKNOWN")),
        (404, "referrers", (404, "NAME_UNKNOWN")),  # also: an upstream without the referrers API
        (405, "manifest", (405, "UNSUPPORTED")),
        (416, "blob", (416, "SIZE_INVALID")),  # a Range past the end: no range code in the spec
        (429, "manifest", (429, "TOOMANYREQUESTS")),
        (400, "manifest", (400, "MANIFEST_INVALID")),
        (400, "blob", (400, "DIGEST_INVALID")),
        (400, "tags", (400, "NAME_INVALID")),
        (406, "manifest", (406, "UNSUPPORTED")),
        (410, "blob", (410, "UNSUPPORTED")),
        (500, "manifest", (502, "UNAVAILABLE")),  # distribution 2.8 on `manifests/sha256:<not hex>`
        (502, "blob", (502, "UNAVAILABLE")),
        (503, "tags", (502, "UNAVAILABLE")),
        (504, "manifest", (504, "UNAVAILABLE")),
    ],
)
def test_for_upstream_status(status: int, kind: str, expected: tuple[int, str]) -> None:
    err = for_upstream_status(status, kind)
    assert (err.status, err.code) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, (400, "UNSUPPORTED")),
        (413, (413, "SIZE_INVALID")),
        (431, (431, "UNSUPPORTED")),
        (502, (502, "UNAVAILABLE")),
    ]
    + [(504, (504, "UNAVAILABLE")), (500, (502, "UNAVAILABLE"))],
)
def test_for_proxy_failure(status: int, expected: tuple[int, str]) -> None:
    err = for_proxy_failure(status)
    assert (err.status, err.code) == expected


@given(st.integers(min_value=400, max_value=599), st.sampled_from(ROUTE_KINDS))
def test_every_4xx_made_from_an_upstream_status_has_a_spec_code(status: int, kind: str) -> None:
    err = for_upstream_status(status, kind)
    assert 400 <= err.status <= 599
    if err.status < 500:
        assert err.code in SPEC_CODES
        assert err.status == status  # a client error stays the client's
    else:
        assert err.status in (502, 504)


@given(st.integers(min_value=400, max_value=599))
def test_every_4xx_made_from_a_proxy_failure_has_a_spec_code(status: int) -> None:
    err = for_proxy_failure(status)
    if err.status < 500:
        assert err.code in SPEC_CODES


@given(st.integers(min_value=400, max_value=599), st.sampled_from(ROUTE_KINDS))
def test_bodies_are_decided_by_status_and_route_kind_alone(status: int, kind: str) -> None:
    """Nothing an upstream says reaches the body: it depends on the status and route kind only, and
    names no repository."""
    body = for_upstream_status(status, kind).body()
    assert body == for_upstream_status(status, kind).body()
    entry = json.loads(body)["errors"][0]
    assert set(entry) == {"code", "message"}
    assert "/" not in str(entry["message"])
