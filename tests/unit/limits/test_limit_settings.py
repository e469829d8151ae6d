"""limits/settings.py: the limits keys validated strictly; limits/forwarded.py: who the client is."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from regproxy.limits.forwarded import client_address, client_key, forwarded_for, parse_ip
from regproxy.limits.settings import (
    LimitsError,
    LimitSettings,
    Rate,
    Rules,
    parse_limits,
    parse_rate,
    parse_settings,
    refusal_message,
)


def test_absent_means_unlimited() -> None:
    s = parse_settings({"proxies": {}})
    assert s == LimitSettings() and not s.defaults.any and s.redis_url is None and s.on_store_failure == "open"


def test_a_full_top_level_block() -> None:
    s = parse_settings(
        {
            "limits": {
                "client_requests": "600/10m",
                "client_burst": 50,
                "manifest_gets": "100/6h",
                "count_heads": True,
                "mapping_bytes": "50GiB/1d",
                "client_bytes": "1.5GB/1h",
                "client_transfers": 4,
                "on_store_failure": "closed",
            },
            "redis_url": "redis://:pw@127.0.0.1:6379/2",
            "trusted_proxies": ["127.0.0.1", "10.0.0.0/8", "::1"],
        }
    )
    d = s.defaults
    assert d.client_requests == Rate(600, 600) and d.burst == 50
    assert d.manifest_gets == Rate(100, 6 * 3600) and d.count_heads
    assert d.mapping_bytes == Rate(50 * 1024**3, 86400) and d.client_bytes == Rate(1_500_000_000, 3600)
    assert d.client_transfers == 4 and s.on_store_failure == "closed"
    assert s.redis_url == "redis://:pw@127.0.0.1:6379/2" and "pw" not in repr(s)
    assert ipaddress.ip_address("10.2.3.4") in s.trusted_proxies[1]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("100/6h", Rate(100, 21600)),
        ("5/m", Rate(5, 60)),
        ("20/90s", Rate(20, 90)),
        ("7/30", Rate(7, 30)),
        ("1/1d", Rate(1, 86400)),
    ],
)
def test_rates(text: str, want: Rate) -> None:
    assert parse_rate(text, "k") == want


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"limits": {"client_request": "1/1s"}}, "limits.client_request: unknown key"),
        ({"limits": {"manifest_gets": 100}}, "limits.manifest_gets: must be written AMOUNT/WINDOW"),
        ({"limits": {"manifest_gets": "100/6w"}}, "limits.manifest_gets: must be written AMOUNT/WINDOW"),
        ({"limits": {"manifest_gets": "0/6h"}}, "limits.manifest_gets: the amount must be at least 1"),
        ({"limits": {"manifest_gets": "1.5/6h"}}, "limits.manifest_gets: the amount must be a whole number"),
        ({"limits": {"manifest_gets": "10MB/6h"}}, "limits.manifest_gets: 10mb is not a whole number of requests"),
        ({"limits": {"client_bytes": "10XB/1h"}}, "limits.client_bytes: 10xb is not a size unit"),
        ({"limits": {"client_bytes": "1GB/0s"}}, "limits.client_bytes: the window must be from 1s to 366d"),
        ({"limits": {"client_bytes": "1GB/400d"}}, "limits.client_bytes: the window must be from 1s to 366d"),
        ({"limits": {"client_transfers": 0}}, "limits.client_transfers: must be a whole number from 1"),
        ({"limits": {"client_transfers": True}}, "limits.client_transfers: must be a whole number from 1"),
        ({"limits": {"count_heads": "yes"}}, "limits.count_heads: must be true or false"),
        ({"limits": {"client_burst": 5}}, "limits.client_burst: needs client_requests"),
        ({"limits": {"on_store_failure": "maybe"}}, "limits.on_store_failure: must be open"),
        ({"limits": ["client_requests"]}, "limits: must be a mapping of limits"),
        ({"redis_url": "http://127.0.0.1:6379"}, "redis_url: the scheme must be redis, rediss or unix"),
        ({"redis_url": "redis://127.0.0.1:99999"}, "redis_url: has an invalid port"),
        ({"redis_url": "redis://127.0.0.1/x"}, "redis_url: the path must be a database number"),
        ({"redis_url": 6379}, "redis_url: must be a URL"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies: must be a list"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies: '10.0.0.1/8' is not an IP address or network"),
        ({"trusted_proxies": ["lb.example"]}, "trusted_proxies: 'lb.example' is not an IP address"),
    ],
)
def test_refused_with_one_line_naming_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(LimitsError) as e:
        parse_settings(raw)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_the_redis_password_is_never_echoed() -> None:
    with pytest.raises(LimitsError) as e:
        parse_settings({"redis_url": "redis://:sekrit@127.0.0.1:bad/0"})
    assert "sekrit" not in str(e.value)


def test_a_mapping_overrides_only_the_keys_it_names() -> None:
    defaults = parse_settings({"limits": {"client_requests": "10/1m", "manifest_gets": "100/6h"}}).defaults
    own = parse_limits({"manifest_gets": "20/1h", "client_requests": "unlimited"}, "proxies.bp/.limits")
    assert own.given == {"manifest_gets", "client_requests"}
    rules = defaults.over(own)
    assert rules.manifest_gets == Rate(20, 3600) and rules.client_requests is None and rules.given == frozenset()
    assert defaults.over(None) is defaults and defaults.over(Rules()) is defaults


def test_on_store_failure_is_top_level_only() -> None:
    with pytest.raises(
        LimitsError, match=r"proxies\.bp/\.limits\.on_store_failure: unknown key \(a top-level setting\)"
    ):
        parse_limits({"on_store_failure": "open"}, "proxies.bp/.limits")


# --- limits/forwarded.py -----------------------------------------------------------------------------

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


def test_forwarding_headers_from_an_untrusted_peer_change_nothing() -> None:
    got = client_address("203.0.113.9", ['for="198.51.100.1"'], ["198.51.100.1"], TRUSTED)
    assert str(got) == "203.0.113.9"


def test_a_trusted_chain_is_walked_from_the_right() -> None:
    assert str(client_address("127.0.0.1", [], ["1.2.3.4, 198.51.100.7, 10.0.0.5"], TRUSTED)) == "198.51.100.7"
    # A client's own spoofed entry on the left is never reached.
    assert str(client_address("127.0.0.1", [], ["6.6.6.6", "198.51.100.7"], TRUSTED)) == "198.51.100.7"
    # Every hop trusted: the leftmost is the client.
    assert str(client_address("127.0.0.1", [], ["10.1.1.1"], TRUSTED)) == "10.1.1.1"
    # Garbage stops the walk at the last address known.
    assert str(client_address("127.0.0.1", [], ["1.2.3.4, nonsense"], TRUSTED)) == "127.0.0.1"
    assert str(client_address("127.0.0.1", [], [], TRUSTED)) == "127.0.0.1"


def test_forwarded_wins_and_is_parsed() -> None:
    fwd = ['for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"']
    assert forwarded_for(fwd) == ["192.0.2.60", '"[2001:db8:cafe::17]:4711"']
    got = client_address("10.0.0.1", fwd, ["9.9.9.9"], TRUSTED)
    assert str(got) == "2001:db8:cafe::17"
    assert client_key(got) == "2001:db8:cafe::/64"
    assert str(client_address("10.0.0.1", ["for=_hidden"], [], TRUSTED)) == "10.0.0.1"


def test_addresses() -> None:
    assert str(parse_ip("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(parse_ip("192.0.2.1:5000")) == "192.0.2.1"
    assert parse_ip("unknown") is None and parse_ip(None) is None
    assert client_key(None) == "unknown" and client_key(parse_ip("192.0.2.1")) == "192.0.2.1"


def test_a_refusal_names_the_limit_and_its_size_only() -> None:
    rules = parse_limits(
        {
            "client_requests": "600/10m",
            "client_burst": 120,
            "manifest_gets": "90/6h",
            "mapping_bytes": "2GB/1d",
            "client_transfers": 6,
            "client_bytes": "20/90s",
        },
        "limits",
    )
    assert refusal_message("client_requests", rules) == (
        "limit client_requests reached (600 per 10m, bursts of 120 requests per client)"
    )
    assert refusal_message("manifest_gets", rules) == (
        "limit manifest_gets reached (90 per 6h manifest requests for this repository's mapping)"
    )
    assert refusal_message("mapping_bytes", rules) == (
        "limit mapping_bytes reached (2GB per 1d bytes for this repository's mapping)"
    )
    assert refusal_message("client_bytes", rules) == "limit client_bytes reached (20B per 90s bytes per client)"
    assert refusal_message("client_transfers", rules) == (
        "limit client_transfers reached (6 blob transfers at once per client)"
    )
