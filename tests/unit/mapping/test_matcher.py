"""Which mapping serves a name (mapping/matcher.py, with config.Mapping's helpers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import DOCKER_HUB_API_HOST, Mapping, Upstream
from regproxy.mapping.matcher import Matcher, redact_name
from rig.keys import CAP as UUID

GHCR = Upstream("https", "ghcr.io", 443)
HUB = Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)


def mapping(
    key: str,
    remote: str = "up",
    upstream: Upstream = GHCR,
    hosts: tuple[str, ...] = (),
    capability: bool = False,
) -> Mapping:
    namespace = key.endswith("/")
    name = key[:-1] if namespace else key
    return Mapping(
        key=key,
        prefix=tuple(name.split("/")),
        namespace=namespace,
        upstream=upstream,
        remote=remote,
        hosts=hosts,
        capability=capability,
    )


def matched_key(matcher: Matcher, name: str, host: str | None = None) -> str | None:
    match = matcher.match(name, host)
    return None if match is None else match.mapping.key


def test_namespace_matches_names_below_it() -> None:
    assert matched_key(Matcher((mapping("bp/"),)), "bp/app") == "bp/"


def test_namespace_matches_deep_names() -> None:
    assert matched_key(Matcher((mapping("bp/"),)), "bp/a/b/c") == "bp/"


def test_namespace_does_not_match_its_bare_name() -> None:
    assert matched_key(Matcher((mapping("bp/"),)), "bp") is None


def test_namespace_does_not_match_by_characters() -> None:
    assert matched_key(Matcher((mapping("bp/"),)), "bpx/app") is None


def test_longer_namespace_wins() -> None:
    matcher = Matcher((mapping("bp/"), mapping("bp/sub/")))
    assert matched_key(matcher, "bp/sub/app") == "bp/sub/"
    assert matched_key(matcher, "bp/other") == "bp/"
    assert matched_key(matcher, "bp/sub") == "bp/"


def test_order_of_mappings_does_not_matter() -> None:
    matcher = Matcher((mapping("bp/sub/"), mapping("bp/")))
    assert matched_key(matcher, "bp/sub/app") == "bp/sub/"


def test_exact_key_beats_namespace() -> None:
    matcher = Matcher((mapping("team/"), mapping("team/app", remote="other/app")))
    assert matched_key(matcher, "team/app") == "team/app"
    assert matched_key(matcher, "team/web") == "team/"


def test_exact_key_matches_only_itself() -> None:
    matcher = Matcher((mapping("team/app"),))
    assert matched_key(matcher, "team/app") == "team/app"
    assert matched_key(matcher, "team/app/sub") is None
    assert matched_key(matcher, "team") is None


def test_no_mappings_matches_nothing() -> None:
    assert Matcher(()).match("a/b", None) is None


def test_hosts_restrict_a_mapping() -> None:
    matcher = Matcher((mapping("bp/", hosts=("reg.example.com",)),))
    assert matched_key(matcher, "bp/app", "reg.example.com") == "bp/"
    assert matched_key(matcher, "bp/app", "reg.example.com:5000") == "bp/"
    assert matched_key(matcher, "bp/app", "REG.example.com") == "bp/"
    assert matched_key(matcher, "bp/app", "other.example.com") is None
    assert matched_key(matcher, "bp/app", None) is None


def test_hosts_with_port_need_that_port() -> None:
    matcher = Matcher((mapping("bp/", hosts=("reg.example.com:5000",)),))
    assert matched_key(matcher, "bp/app", "reg.example.com:5000") == "bp/"
    assert matched_key(matcher, "bp/app", "reg.example.com") is None
    assert matched_key(matcher, "bp/app", "reg.example.com:6000") is None


def test_host_restricted_mapping_falls_back_to_shorter_key() -> None:
    matcher = Matcher((mapping("bp/"), mapping("bp/sub/", hosts=("a.example.com",))))
    assert matched_key(matcher, "bp/sub/app", "a.example.com") == "bp/sub/"
    assert matched_key(matcher, "bp/sub/app", "b.example.com") == "bp/"


def test_unrestricted_mapping_serves_any_host() -> None:
    assert matched_key(Matcher((mapping("bp/"),)), "bp/app", "anything.example") == "bp/"


def test_upstream_name_with_remote_prefix() -> None:
    match = Matcher((mapping("bp/", remote="backplane"),)).match("bp/sub/app", None)
    assert match is not None
    assert (match.local_name, match.upstream_name) == ("bp/sub/app", "backplane/sub/app")


def test_upstream_name_with_empty_remote() -> None:
    match = Matcher((mapping("mirror/", remote=""),)).match("mirror/org/app", None)
    assert match is not None and match.upstream_name == "org/app"


def test_upstream_name_of_exact_key_is_remote() -> None:
    match = Matcher((mapping(f"{UUID}/nginx", remote="library/nginx"),)).match(f"{UUID}/nginx", None)
    assert match is not None and match.upstream_name == "library/nginx"


def test_docker_hub_one_component_names_get_library() -> None:
    match = Matcher((mapping("hub/", remote="", upstream=HUB),)).match("hub/nginx", None)
    assert match is not None and match.upstream_name == "library/nginx"


def test_docker_hub_two_component_names_are_kept() -> None:
    match = Matcher((mapping("hub/", remote="", upstream=HUB),)).match("hub/bitnami/redis", None)
    assert match is not None and match.upstream_name == "bitnami/redis"


def test_docker_hub_remote_prefix_is_not_doubled() -> None:
    match = Matcher((mapping("bp/", remote="backplane", upstream=HUB),)).match("bp/true", None)
    assert match is not None and match.upstream_name == "backplane/true"


def test_non_docker_hub_one_component_names_are_kept() -> None:
    match = Matcher((mapping("g/", remote=""),)).match("g/app", None)
    assert match is not None and match.upstream_name == "app"


def test_log_name_of_ordinary_mapping_is_local_name() -> None:
    match = Matcher((mapping("bp/"),)).match("bp/app", None)
    assert match is not None and match.log_name == "bp/app"


def test_log_name_hides_capability_key() -> None:
    m = mapping(f"{UUID}/", capability=True)
    match = Matcher((m,)).match(f"{UUID}/nginx", None)
    assert match is not None
    assert UUID not in match.log_name
    assert match.log_name == f"<{m.label}>/nginx"


def test_log_name_of_capability_repository_key() -> None:
    m = mapping(f"team/{UUID}", capability=True)
    match = Matcher((m,)).match(f"team/{UUID}", None)
    assert match is not None and match.log_name == f"<{m.label}>"


@pytest.mark.parametrize(
    ("name", "redacted"),
    [
        ("bp/app", "bp/app"),
        (f"{UUID}/nginx", "<capability?>/nginx"),
        (f"a/{UUID.replace('-', '')}", "a/<capability?>"),
        ("x/abcdefghij0123456789k", "x/<capability?>"),
    ],
)
def test_redact_name(name: str, redacted: str) -> None:
    assert redact_name(name) == redacted


# --- property: longest whole-segment prefix wins ---

_segment = st.sampled_from(["a", "b", "bp", "bpx", "c1", "x.y"])
_prefix = st.lists(_segment, min_size=1, max_size=3).map(tuple)
_keys = st.lists(st.tuples(_prefix, st.booleans()), max_size=8, unique_by=lambda kn: kn[0])
_names = st.lists(_segment, min_size=1, max_size=5).map("/".join)


def reference_match(specs: list[tuple[tuple[str, ...], bool]], name: str) -> tuple[tuple[str, ...], bool] | None:
    """Brute force: of the keys that match by whole segments, the one with the most segments."""
    segments = tuple(name.split("/"))
    candidates = [
        (prefix, namespace)
        for prefix, namespace in specs
        if (namespace and len(segments) > len(prefix) and segments[: len(prefix)] == prefix)
        or (not namespace and segments == prefix)
    ]
    return max(candidates, key=lambda kn: len(kn[0]), default=None)


def build(specs: list[tuple[tuple[str, ...], bool]]) -> Matcher:
    return Matcher(tuple(mapping("/".join(p) + ("/" if ns else "")) for p, ns in specs))


@given(_keys, _names)
def test_matcher_agrees_with_reference(specs: list[tuple[tuple[str, ...], bool]], name: str) -> None:
    match = build(specs).match(name, None)
    expected = reference_match(specs, name)
    if expected is None:
        assert match is None
    else:
        assert match is not None
        assert (match.mapping.prefix, match.mapping.namespace) == expected


@given(_keys, _names)
def test_match_is_independent_of_mapping_order(specs: list[tuple[tuple[str, ...], bool]], name: str) -> None:
    forward = build(specs).match(name, None)
    backward = build(list(reversed(specs))).match(name, None)
    assert (forward and forward.mapping.key) == (backward and backward.mapping.key)


@given(_keys, _names)
def test_upstream_name_keeps_the_rest_of_the_name(specs: list[tuple[tuple[str, ...], bool]], name: str) -> None:
    match = build(specs).match(name, None)
    if match is not None:
        rest = name.split("/")[len(match.mapping.prefix) :]
        assert match.upstream_name == "/".join(["up", *rest])


def test_the_rest_through_a_share_link_is_the_name_below_the_link() -> None:
    import time

    from regproxy.config import parse
    from regproxy.links import LinkBook, mint
    from regproxy.mapping.matcher import policy_names
    from regproxy.policy import decide

    key = "11" * 32
    proxies = {"bp/": {"registry": "http://127.0.0.1:5001", "remote": "backplane", "deny": ["app/x"]}}
    cfg = parse({"secretkey": key, "proxies": proxies}, {})
    m = Matcher(cfg.mappings, LinkBook(cfg.secretkeys, ("bp/",), cfg.revoked_links, time.time))
    link, _ = mint(bytes.fromhex(key), "bp/", int(time.time() + 3600))
    through, direct = m.match(f"{link}/app/x", None), m.match("bp/app/x", None)
    assert through is not None and direct is not None and through.rest == direct.rest == "app/x"
    # A link is no way around the mapping's policy.
    assert decide(through.mapping.policy, policy_names(through), "v1").refused == "repository"
    other = m.match(f"{link}/app/y", None)
    assert (
        other is not None and other.rest == "app/y" and decide(other.mapping.policy, policy_names(other), "v1").admitted
    )
