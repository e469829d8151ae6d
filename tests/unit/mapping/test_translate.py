"""mapping/translate.py: where the upstream points, said in the proxy's names (pure functions over a `Match`)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from regproxy.config import Mapping, Upstream
from regproxy.mapping.matcher import Match, Matcher
from regproxy.mapping.translate import (
    local_path,
    rewrite_link,
    rewrite_location,
    rewrite_tags,
    upstream_params,
    upstream_path,
)
from regproxy.protocol.names import NAME_RE, TAG_RE, Route, parse_route
from rig.keys import CAP

NAMESPACE = Mapping("bp/", ("bp",), True, Upstream("http", "127.0.0.1", 5001), "backplane")
CAPABILITY = Mapping(
    f"{CAP}/nginx",
    (CAP, "nginx"),
    False,
    Upstream("https", "registry.example.com", 443),
    "private/nginx",
    capability=True,
)
DIGEST = "sha256:" + "c" * 64


def match_of(mapping: Mapping, name: str) -> Match:
    found = Matcher((mapping,)).match(name, None)
    assert found is not None
    return found


BP = match_of(NAMESPACE, "bp/true")  # bp/true <- backplane/true
CAPM = match_of(CAPABILITY, f"{CAP}/nginx")  # <capability>/nginx <- private/nginx
BP_URL = f"http://127.0.0.1:5001/v2/backplane/true/blobs/{DIGEST}"
CAP_URL = f"https://registry.example.com/v2/private/nginx/blobs/{DIGEST}"

names = st.from_regex(NAME_RE, fullmatch=True).filter(lambda n: len(n) <= 60)


# --- upstream_params ----------------------------------------------------------------------


def route(path: str) -> Route:
    return parse_route(path)


TAGS = route("/v2/bp/true/tags/list")
REFERRERS = route(f"/v2/bp/true/referrers/{DIGEST}")


@pytest.mark.parametrize("path", ["/v2/bp/true/manifests/v1", f"/v2/bp/true/blobs/{DIGEST}", "/v2/"])
def test_routes_without_parameters_send_none(path: str) -> None:
    assert upstream_params(route(path), "n=1&last=a") == []


def test_a_tags_list_sends_n_and_last_in_order() -> None:
    assert upstream_params(TAGS, "last=v1&evil=1&n=10") == [("last", "v1"), ("n", "10")]


@pytest.mark.parametrize("query", ["n=ten", "n=1234567", "n=-1", "last=..%2Fx", "last=a%20b", "last=", "n="])
def test_invalid_paging_parameters_are_dropped(query: str) -> None:
    assert upstream_params(TAGS, query) == []


def test_referrers_send_only_a_valid_artifact_type() -> None:
    query = "artifactType=application/vnd.example.sbom.v1%2Bjson&n=1&artifactType=a%3Cb"
    assert upstream_params(REFERRERS, query) == [("artifactType", "application/vnd.example.sbom.v1+json")]


def test_only_the_first_eight_parameters_are_looked_at() -> None:
    assert upstream_params(TAGS, "&".join(["x=1"] * 8 + ["n=5"])) == []


def test_an_empty_query_sends_nothing() -> None:
    assert upstream_params(TAGS, "") == []


@given(st.text(max_size=200))
def test_whatever_the_query_only_valid_paging_parameters_go_upstream(query: str) -> None:
    for k, v in upstream_params(TAGS, query):
        assert (k == "n" and v.isdigit() and len(v) <= 6) or (k == "last" and TAG_RE.fullmatch(v))
    assert len(upstream_params(TAGS, query)) <= 8


# --- local_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/backplane/true/tags/list", "/v2/bp/true/tags/list"),
        (f"/v2/backplane/true/blobs/{DIGEST}", f"/v2/bp/true/blobs/{DIGEST}"),
        ("/v2/backplane/other/tags/list", None),
        ("/v2/backplane/truex/tags/list", None),
        ("/v2/backplane/true", None),
        ("/v2/bp/true/tags/list", None),
    ],
)
def test_local_path(path: str, expected: str | None) -> None:
    assert local_path(path, BP) == expected


@given(
    st.builds(
        str.__add__,
        st.sampled_from(["", "/v2/backplane/true/", "/v2/backplane/true", "/v2/backplane/", "/v2/bp/true/"]),
        st.text(max_size=30),
    )
)
def test_a_local_path_is_the_upstream_path_under_the_local_name(path: str) -> None:
    local = local_path(path, BP)
    if local is not None:
        assert path.startswith("/v2/backplane/true/")
        assert local == "/v2/bp/true/" + path[len("/v2/backplane/true/") :]


# --- rewrite_location ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (f"/v2/backplane/true/blobs/{DIGEST}", f"/v2/bp/true/blobs/{DIGEST}"),
        ("http://127.0.0.1:5001/v2/backplane/true/blobs/x?y=1", "/v2/bp/true/blobs/x?y=1"),
        ("  /v2/backplane/true/blobs/x  ", "/v2/bp/true/blobs/x"),
        ("x", "/v2/bp/true/blobs/x"),
        ("https://cdn.example.net/data?sig=1", "https://cdn.example.net/data?sig=1"),
        ("//cdn.example.net/data", "http://cdn.example.net/data"),
        ("/docker/registry/v2/blobs/data", "http://127.0.0.1:5001/docker/registry/v2/blobs/data"),
        ("/v2/backplane/other/blobs/x", None),
        ("/v2/backplane/true/../other/blobs/x", None),
        ("javascript:alert(1)", None),
        ("data:text/plain,x", None),
        ("ftp://cdn.example.net/data", None),
    ],
)
def test_a_namespace_redirect_is_absolute_or_local(location: str, expected: str | None) -> None:
    assert rewrite_location(location, BP_URL, BP) == expected


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (f"/v2/private/nginx/blobs/{DIGEST}", f"/v2/{CAP}/nginx/blobs/{DIGEST}"),
        ("https://cdn.example.net/data?sig=1", "https://cdn.example.net/data?sig=1"),
        ("/docker/registry/v2/blobs/data", None),  # elsewhere on the upstream: it would name the upstream
        ("/v2/private/other/blobs/x", None),
    ],
)
def test_a_capability_redirect_never_names_the_upstream(location: str, expected: str | None) -> None:
    assert rewrite_location(location, CAP_URL, CAPM) == expected


def spellings_of_the_upstream() -> st.SearchStrategy[str]:
    """The capability mapping's upstream origin as an upstream may spell it (RFC 3986 equivalents)."""
    hosts = st.sampled_from(["registry.example.com", "REGISTRY.example.com", "Registry.Example.Com"])
    ports = st.sampled_from(["", ":443"])
    schemes = st.sampled_from(["https", "HTTPS"])
    return st.builds(lambda s, h, p: f"{s}://{h}{p}", schemes, hosts, ports)


@given(spellings_of_the_upstream(), names, st.sampled_from([f"blobs/{DIGEST}", "manifests/v1", "tags/list"]))
@example("https://registry.example.com:443", "private/other", "manifests/v1")
@example("https://REGISTRY.example.com", "private/other", "manifests/v1")
def test_a_redirect_into_the_upstream_api_never_names_another_repository(origin: str, name: str, rest: str) -> None:
    """However the upstream spells its own origin, a capability holder never learns an upstream name."""
    result = rewrite_location(f"{origin}/v2/{name}/{rest}", CAP_URL, CAPM)
    if name == "private/nginx":
        assert result == f"/v2/{CAP}/nginx/{rest}"
    elif not name.startswith("private/nginx/"):
        assert result is None


@given(st.text(max_size=80))
def test_any_redirect_is_dropped_local_or_absolute_http(location: str) -> None:
    result = rewrite_location(location, BP_URL, BP)
    if result is not None:
        local = result.startswith("/v2/bp/true/")
        assert local or urlsplit(result).scheme in ("http", "https")
        assert not result.startswith("http://127.0.0.1:5001/v2/")


# --- rewrite_link -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('</v2/backplane/true/tags/list?last=b&n=2>; rel="next"', '</v2/bp/true/tags/list?last=b&n=2>; rel="next"'),
        ("</v2/backplane/true/tags/list?n=2>", "</v2/bp/true/tags/list?n=2>"),
        ('  <http://127.0.0.1:5001/v2/backplane/true/tags/list>; rel="next"', '</v2/bp/true/tags/list>; rel="next"'),
        ('</v2/backplane/other/tags/list>; rel="next"', None),
        ('</v2/backplane/truex/tags/list>; rel="next"', None),
        ('/v2/backplane/true/tags/list; rel="next"', None),
        ("", None),
    ],
)
def test_a_link_is_local_or_dropped(value: str, expected: str | None) -> None:
    assert rewrite_link(value, BP) == expected


def link_values() -> st.SearchStrategy[str]:
    """Link header field values (RFC 8288): one or more `<target>; params`, comma-separated."""
    target = st.builds(
        lambda origin, name, query: f"{origin}/v2/{name}/tags/list{query}",
        st.sampled_from(["", "https://registry.example.com"]),
        st.one_of(st.sampled_from(["private/nginx", "private/other", "private/nginx/sub"]), names),
        st.sampled_from(["", "?n=2", "?last=b&n=2"]),
    )
    one = st.builds(lambda t, p: f"<{t}>{p}", target, st.sampled_from(["", '; rel="next"', "; rel=next; title=x"]))
    return st.lists(one, min_size=1, max_size=3).map(", ".join)


@given(link_values())
@example('</v2/private/nginx/tags/list?n=2>; rel="next", </v2/private/other/tags/list>; rel="prev"')
def test_a_link_never_names_an_upstream_repository(value: str) -> None:
    """Every upstream name is under `private/`; no local name is."""
    result = rewrite_link(value, CAPM)
    assert result is None or "private/" not in result


# --- rewrite_tags -------------------------------------------------------------------------


def tags_of(body: bytes) -> object:
    return json.loads(body)["tags"]


def test_the_name_is_the_local_one() -> None:
    result = rewrite_tags(b'{"name":"backplane/true","tags":["b","a"]}', BP, {}, False)
    assert result is not None
    body, link = result
    assert json.loads(body) == {"name": "bp/true", "tags": ["a", "b"]} and link is None


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'"x"', b'{"tags":"a"}', b'{"tags":{}}'])
def test_a_body_that_is_not_a_tags_list_is_refused(body: bytes) -> None:
    assert rewrite_tags(body, BP, {}, False) is None


@pytest.mark.parametrize(("body", "tags"), [(b'{"name":"x","tags":null}', None), (b'{"name":"x"}', "absent")])
def test_no_tags_stay_no_tags(body: bytes, tags: object) -> None:
    result = rewrite_tags(body, BP, {"n": "1"}, False)
    assert result is not None
    data = json.loads(result[0])
    assert data.get("tags", "absent") == tags and result[1] is None


def test_an_upstream_that_ignored_n_is_paged_here() -> None:
    result = rewrite_tags(b'{"name":"x","tags":["c","a","b","d"]}', BP, {"n": "2"}, False)
    assert result is not None
    assert tags_of(result[0]) == ["a", "b"]
    assert result[1] == '</v2/bp/true/tags/list?n=2&last=b>; rel="next"'


def test_the_page_after_last() -> None:
    result = rewrite_tags(b'{"name":"x","tags":["a","b","c","d"]}', BP, {"n": "2", "last": "b"}, False)
    assert result is not None and tags_of(result[0]) == ["c", "d"] and result[1] is None


def test_an_upstream_link_is_left_to_the_upstream() -> None:
    result = rewrite_tags(b'{"name":"x","tags":["a","b","c"]}', BP, {"n": "2"}, True)
    assert result is not None and tags_of(result[0]) == ["a", "b", "c"] and result[1] is None


def test_n_zero_answers_no_tags_and_no_link() -> None:
    result = rewrite_tags(b'{"name":"x","tags":["a","b"]}', BP, {"n": "0"}, False)
    assert result is not None and tags_of(result[0]) == [] and result[1] is None


def test_tags_that_are_not_strings_are_dropped() -> None:
    result = rewrite_tags(b'{"name":"x","tags":["b",1,null,"a"]}', BP, {}, False)
    assert result is not None and tags_of(result[0]) == ["a", "b"]


tag_values = st.from_regex(r"[a-c0-9_][a-c0-9_.-]{0,3}", fullmatch=True)  # tags (TAG_RE), from a few characters


@given(
    st.lists(tag_values, max_size=12, unique=True),
    st.one_of(st.none(), st.integers(min_value=0, max_value=15)),
    st.one_of(st.none(), tag_values),
)
def test_a_page_is_sorted_after_last_at_most_n_and_links_to_the_rest(
    listed: list[str], n: int | None, last: str | None
) -> None:
    page = {k: v for k, v in (("n", None if n is None else str(n)), ("last", last)) if v is not None}
    result = rewrite_tags(json.dumps({"name": "backplane/true", "tags": listed}).encode(), BP, page, False)
    assert result is not None
    body, link = result
    rest = sorted(t for t in listed if last is None or t > last)
    shown = tags_of(body)
    assert shown == rest[: n if n is not None else len(rest)]
    if link is None:
        assert n is None or n == 0 or len(rest) <= n
    else:
        assert n is not None and len(rest) > n > 0
        target = link.removeprefix("<").partition(">")[0]
        assert target.startswith("/v2/bp/true/tags/list?")
        assert dict(parse_qsl(urlsplit(target).query)) == {"n": str(n), "last": rest[n - 1]}


# --- upstream_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "path", "query", "expected"),
    [
        (BP, "/v2/bp/true/manifests/v1", "", "/v2/backplane/true/manifests/v1"),
        (BP, f"/v2/bp/true/blobs/{DIGEST}", "ns=x", f"/v2/backplane/true/blobs/{DIGEST}"),
        (BP, "/v2/bp/true/tags/list", "last=v1&evil=1&n=10", "/v2/backplane/true/tags/list?last=v1&n=10"),
        (
            CAPM,
            f"/v2/{CAP}/nginx/referrers/{DIGEST}",
            "artifactType=a/b",
            f"/v2/private/nginx/referrers/{DIGEST}?artifactType=a%2Fb",
        ),
    ],
)
def test_a_pull_goes_upstream_under_the_upstream_name_with_its_parameters(
    match: Match, path: str, query: str, expected: str
) -> None:
    r = route(path)
    assert upstream_path(match, r, upstream_params(r, query)) == expected


def test_a_policy_filters_before_the_page_is_cut() -> None:
    body = b'{"name":"x","tags":["a","b","c","d","e","f"]}'
    admit = {"b", "d", "e", "f"}.__contains__
    result = rewrite_tags(body, BP, {"n": "2"}, False, admit)
    assert result is not None and tags_of(result[0]) == ["b", "d"]
    assert result[1] == '</v2/bp/true/tags/list?n=2&last=d>; rel="next"'
    result = rewrite_tags(body, BP, {"n": "2", "last": "d"}, False, admit)
    assert result is not None and tags_of(result[0]) == ["e", "f"] and result[1] is None
    # An upstream that paged itself: its page filtered, its Link left to lead on.
    result = rewrite_tags(b'{"name":"x","tags":["a","b"]}', BP, {"n": "2"}, True, admit)
    assert result is not None and tags_of(result[0]) == ["b"] and result[1] is None
    result = rewrite_tags(body, BP, {}, False, lambda t: False)
    assert result is not None and tags_of(result[0]) == []
