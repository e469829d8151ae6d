"""admission.py: the checks a routed request must pass, in order, and what an admitted one holds."""

from __future__ import annotations

import pytest
from regproxy.config import Mapping, Upstream
from regproxy.limits.admission import Held, admission
from regproxy.limits.settings import Rate, Rules, parse_limits
from regproxy.limits.store import Check
from regproxy.protocol.names import RouteKind

DEFAULTS = parse_limits(
    {
        "client_requests": "60/1m",
        "client_burst": 10,
        "manifest_gets": "100/1h",
        "mapping_bytes": "1GB/1h",
        "client_bytes": "100MB/1h",
        "client_transfers": 2,
    },
    "limits",
    top=True,
)
BP = Mapping("bp/", ("bp",), True, Upstream("http", "127.0.0.1", 5001), "backplane")
OWN = parse_limits({"client_bytes": "5MB/1h", "count_heads": True}, "proxies.own/.limits")
SELF_LIMITED = Mapping("own/", ("own",), True, Upstream("http", "127.0.0.1", 5002), "x", limits=OWN)
CLIENT = "192.0.2.1"


def names(rules: Rules, kind: RouteKind | None, method: str = "GET", mapping: Mapping = BP) -> list[str]:
    return admission(rules, mapping, kind, method, CLIENT, lambda: "L").names


def test_a_blob_get_passes_every_limit_in_order() -> None:
    a = admission(DEFAULTS, BP, RouteKind.BLOB, "GET", CLIENT, lambda: "lease-1")
    assert a.names == ["client_requests", "mapping_bytes", "client_bytes", "client_transfers"]
    assert a.checks == [
        Check("bucket", f"client_requests:*:{CLIENT}", 10, 1.0),
        Check("window", "mapping_bytes:bp/", 10**9, 3600, count=False),
        Check("window", f"client_bytes:*:{CLIENT}", 10**8, 3600, count=False),
        Check("slots", f"client_transfers:*:{CLIENT}", 2, lease="lease-1"),
    ]
    assert a.held == Held(
        "bp/",
        [
            ("mapping_bytes", "mapping_bytes:bp/", Rate(10**9, 3600)),
            ("client_bytes", f"client_bytes:*:{CLIENT}", Rate(10**8, 3600)),
        ],
        (f"client_transfers:*:{CLIENT}", "lease-1"),
    )


def test_a_manifest_get_counts_in_the_mappings_window_and_is_charged_never_refused_for_bytes() -> None:
    a = admission(DEFAULTS, BP, RouteKind.MANIFEST, "GET", CLIENT)
    assert a.names == ["client_requests", "manifest_gets"]
    assert a.checks[1] == Check("window", "manifest_gets:bp/", 100, 3600)
    assert [w[0] for w in a.held.byte_windows] == ["mapping_bytes", "client_bytes"] and a.held.slot is None


@pytest.mark.parametrize(
    ("kind", "method", "expected"),
    [
        (RouteKind.MANIFEST, "HEAD", ["client_requests"]),  # HEADs count only with count_heads
        (RouteKind.BLOB, "HEAD", ["client_requests"]),
        (RouteKind.TAGS, "GET", ["client_requests"]),
        (RouteKind.REFERRERS, "GET", ["client_requests"]),
        (None, "GET", ["client_requests"]),
    ],
)
def test_other_requests_take_only_from_the_clients_bucket(
    kind: RouteKind | None, method: str, expected: list[str]
) -> None:
    a = admission(DEFAULTS, BP, kind, method, CLIENT)
    assert a.names == expected and a.held.byte_windows == [] and a.held.slot is None


def test_a_limit_the_mapping_sets_itself_is_its_own_budget() -> None:
    rules = DEFAULTS.over(OWN)
    a = admission(rules, SELF_LIMITED, RouteKind.BLOB, "GET", CLIENT, lambda: "L")
    keys = dict(zip(a.names, (c.key for c in a.checks), strict=True))
    assert keys["client_bytes"] == f"client_bytes:own/:{CLIENT}"  # set by the mapping
    assert keys["client_requests"] == f"client_requests:*:{CLIENT}"  # the default: one budget
    assert names(rules, RouteKind.MANIFEST, "HEAD", SELF_LIMITED) == ["client_requests", "manifest_gets"]


def test_without_rules_there_is_nothing_to_check() -> None:
    a = admission(Rules(), BP, RouteKind.BLOB, "GET", "")
    assert a.checks == [] and a.names == [] and a.held == Held("bp/")


def test_per_client_says_whether_the_client_must_be_told_apart() -> None:
    assert DEFAULTS.per_client
    assert not Rules(manifest_gets=Rate(1, 60), mapping_bytes=Rate(1, 60)).per_client
    assert Rules(client_transfers=1).per_client and Rules(client_bytes=Rate(1, 60)).per_client


def test_an_answer_from_the_cache_neither_spends_nor_is_refused_by_mapping_bytes() -> None:
    a = admission(DEFAULTS, BP, RouteKind.BLOB, "GET", CLIENT, lambda: "lease-1", cached=True)
    assert a.names == ["client_requests", "client_bytes", "client_transfers"]  # the client's limits still apply
    assert [w[0] for w in a.held.byte_windows] == ["client_bytes"]
    m = admission(DEFAULTS, BP, RouteKind.MANIFEST, "GET", CLIENT, cached=True)
    assert m.names == ["client_requests", "manifest_gets"]
    assert [w[0] for w in m.held.byte_windows] == ["client_bytes"]
