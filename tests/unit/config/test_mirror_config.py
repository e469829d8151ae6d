"""Mirror mode in the pure modules: the root key `*`, `mirror_of` and `?ns=` (config/, mapping/,
tokens/issuer.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import Config, ConfigError, Mapping, loads, mirror_host, parse
from regproxy.mapping.matcher import Matcher
from regproxy.tokens.issuer import TokenRequest, TokenService, mirror_base, token_path
from regproxy.tokens.paseto import TokenCodec, TokenError
from regproxy.upstream.auth import UpstreamToken
from regproxy.upstream.client import RegistryClient
from rig.keys import CAP as UUID
from rig.keys import CAP20

KEY = "22" * 32
AUD = "https://reg.example.com"


def config(proxies: dict[str, Any]) -> Config:
    return parse({"secretkey": KEY, "proxies": proxies}, {})


def error(proxies: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config(proxies)
    return str(info.value)


MIRROR = {
    "*": {"registry": "docker.io", "mirror_of": ["docker.io"]},
    "gh/": {"registry": "ghcr.io", "mirror_of": ["ghcr.io"]},
    "quay/": {"registry": "quay.io", "remote": "mirror", "mirror_of": ["quay.io", "registry.example.com:5000"]},
    "bp/": {"registry": "docker.io", "remote": "backplane"},
    f"{UUID}/nginx": {"registry": "ghcr.io", "remote": "private/nginx"},
    f"team/{CAP20}/": {"registry": "ghcr.io", "remote": "team"},
}


def matcher(proxies: dict[str, Any] = MIRROR) -> Matcher:
    return Matcher(config(proxies).mappings)


def served(m: Matcher, name: str, ns: str | None = None, host: str | None = None) -> tuple[str, str] | None:
    match = m.match(name, host, ns)
    return None if match is None else (match.mapping.key, match.upstream_name)


# --- configuration ---


def test_root_key_is_a_namespace_of_no_segments() -> None:
    root = config({"*": {"registry": "docker.io"}}).mappings[0]
    assert (root.key, root.prefix, root.namespace, root.remote, root.capability) == ("*", (), True, "", False)
    assert root.label == "*"


def test_root_key_in_yaml_must_be_quoted() -> None:
    text = f"secretkey: '{KEY}'\nproxies:\n  *:\n    registry: docker.io\n"
    with pytest.raises(ConfigError) as info:
        loads(text, {})
    assert (
        str(info.value)
        == 'config: not valid YAML at line 3 (a key or value starting with * must be quoted, as the root key "*")'
    )
    quoted = loads(text.replace("  *:", '  "*":'), {})
    assert quoted.mappings[0].prefix == ()


def test_slash_is_not_the_root_key() -> None:
    message = error({"/": {"registry": "docker.io"}})
    assert "not a valid repository name" in message and message.endswith("the root of every name is the key *")


def test_root_key_cannot_be_a_capability() -> None:
    assert error({"*": {"registry": "docker.io", "capability": True}}) == (
        "proxies.*.capability: the root key * serves every name; it has no key to keep secret"
    )


def test_root_key_may_have_a_remote_and_hosts() -> None:
    root = config({"*": {"registry": "ghcr.io", "remote": "org", "hosts": ["mirror.example.com"]}}).mappings[0]
    assert (root.remote, root.hosts) == ("org", ("mirror.example.com",))


def test_mirror_of_is_normalised() -> None:
    mappings = config(
        {
            "*": {"registry": "docker.io", "mirror_of": [" INDEX.docker.io "]},
            "g/": {"registry": "ghcr.io", "mirror_of": ["GHCR.io", "10.0.0.5:5000", "[::1]:5000"]},
        }
    ).mappings
    assert mappings[0].mirror_of == ("docker.io",)
    assert mappings[1].mirror_of == ("ghcr.io", "10.0.0.5:5000", "[::1]:5000")


def test_docker_hub_aliases_in_mirror_of_are_one_registry() -> None:
    message = error({"*": {"registry": "docker.io", "mirror_of": ["docker.io", "index.docker.io"]}})
    assert message == "proxies.*.mirror_of: docker.io is listed twice"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("docker.io", "proxies.a/.mirror_of: must be a list of registry hosts such as [docker.io, ghcr.io]"),
        ([5], "proxies.a/.mirror_of: must be a list of registry hosts such as [docker.io, ghcr.io]"),
        (["bad host"], "proxies.a/.mirror_of: 'bad host' is not a registry host[:port]"),
        (["ghcr.io:0"], "proxies.a/.mirror_of: 'ghcr.io:0' is not a registry host[:port]"),
        (["ghcr.io/org"], "proxies.a/.mirror_of: 'ghcr.io/org' is not a registry host[:port]"),
        (["https://ghcr.io"], "proxies.a/.mirror_of: 'https://ghcr.io' is not a registry host[:port]"),
    ],
)
def test_bad_mirror_of_is_refused(value: object, expected: str) -> None:
    assert error({"a/": {"registry": "ghcr.io", "mirror_of": value}}) == expected


def test_mirror_of_needs_a_namespace() -> None:
    assert error({"a/app": {"registry": "ghcr.io", "remote": "x/app", "mirror_of": ["ghcr.io"]}}) == (
        "proxies.a/app.mirror_of: needs a namespace key (ending in /, or the root key *)"
    )


@pytest.mark.parametrize("key", [f"{UUID}/", "secret/"])
def test_a_capability_mapping_cannot_be_a_mirror(key: str) -> None:
    extra = {"capability": True} if key == "secret/" else {}
    message = error({key: {"registry": "ghcr.io", "mirror_of": ["ghcr.io"], **extra}})
    assert message.endswith(".mirror_of: a capability mapping cannot be a mirror (?ns= would reach it without its key)")
    assert UUID not in message


def test_one_registry_is_mirrored_by_one_mapping() -> None:
    message = error(
        {
            "a/": {"registry": "ghcr.io", "mirror_of": ["ghcr.io"]},
            "b/": {"registry": "ghcr.io", "mirror_of": ["ghcr.io"]},
        }
    )
    assert message == "proxies.b/.mirror_of: ghcr.io is already mirrored by proxies.a/"


def test_old_configs_have_no_mirror_mode() -> None:
    m = Matcher(config({"bp/": {"registry": "docker.io", "remote": "backplane"}}).mappings)
    assert not m.mirror_mode
    assert Matcher(config({"*": {"registry": "docker.io"}}).mappings).mirror_mode
    assert Matcher(config({"a/": {"registry": "ghcr.io", "mirror_of": ["ghcr.io"]}}).mappings).mirror_mode


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io:443", "docker.io:443"),
        ("GHCR.IO", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
        ("127.0.0.1:65535", "127.0.0.1:65535"),
        ("[::1]", "[::1]"),
        ("[::1]:5000", "[::1]:5000"),
        ("", None),
        ("ghcr.io:", None),
        ("ghcr.io:65536", None),
        ("ghcr.io:05", None),
        ("ghcr.io:1:2", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[nothex]", None),
        ("::1", None),
        ("a b", None),
        ("a/b", None),
        ("-a.io", None),
        ("x" * 301, None),
        (None, None),
    ],
)
def test_mirror_host(value: object, expected: str | None) -> None:
    assert mirror_host(value) == expected


@given(st.text(max_size=40))
def test_mirror_host_is_idempotent_and_never_raises(text: str) -> None:
    host = mirror_host(text)
    if host is not None:
        assert mirror_host(host) == host
        assert all(c not in host for c in "/?#@ \r\n\0")


# --- matching ---


def test_root_serves_every_name_no_longer_key_matches() -> None:
    m = matcher()
    assert served(m, "library/alpine") == ("*", "library/alpine")
    assert served(m, "alpine") == ("*", "library/alpine")  # Docker Hub's rule
    assert served(m, "someuser/app") == ("*", "someuser/app")
    assert served(m, "bp/true") == ("bp/", "backplane/true")
    assert served(m, "bp") == ("*", "library/bp")
    assert served(m, "bpx/app") == ("*", "bpx/app")
    assert served(m, "gh/org/app") == ("gh/", "org/app")
    assert served(m, f"{UUID}/nginx") == (f"{UUID}/nginx", "private/nginx")


def test_root_with_a_remote() -> None:
    m = matcher({"*": {"registry": "ghcr.io", "remote": "org"}})
    assert served(m, "a/b") == ("*", "org/a/b")
    assert served(m, "a") == ("*", "org/a")


def test_a_capability_key_typo_never_reaches_the_root() -> None:
    m = matcher()
    for name in (f"{UUID}/ngnix", f"{UUID}/nginx/x", UUID, f"x/{UUID}/nginx", f"team/{CAP20}", f"x/{CAP20}/y"):
        assert served(m, name) is None, name
    # Nor a namespace mapping's upstream: the key is never sent upstream inside a name.
    assert served(m, f"bp/{UUID}/nginx") is None
    assert served(m, f"team/{CAP20}/app") == (f"team/{CAP20}/", "team/app")
    # A segment that is merely close to a key is an ordinary name.
    assert served(m, f"{UUID[:-1]}0/nginx") == ("*", f"{UUID[:-1]}0/nginx")


def test_host_restricted_root() -> None:
    m = matcher({"*": {"registry": "docker.io", "hosts": ["mirror.example.com"]}, "a/": {"registry": "ghcr.io"}})
    assert served(m, "x/y", host="mirror.example.com") == ("*", "x/y")
    assert served(m, "x/y", host="other.example.com") is None
    assert served(m, "a/y", host="other.example.com") == ("a/", "y")


def test_ns_selects_the_mirror_of_that_registry() -> None:
    m = matcher()
    assert served(m, "library/alpine", "docker.io") == ("*", "library/alpine")
    assert served(m, "alpine", "index.docker.io") == ("*", "library/alpine")
    assert served(m, "org/app", "ghcr.io") == ("gh/", "org/app")
    # The whole name goes below the mirror's remote; its key plays no part.
    assert served(m, "gh/app", "ghcr.io") == ("gh/", "gh/app")
    assert served(m, "org/app", "QUAY.io") == ("quay/", "mirror/org/app")
    assert served(m, "org/app", "registry.example.com:5000") == ("quay/", "mirror/org/app")
    # Longer keys do not apply to ns requests: bp/ is a docker.io mapping, not that registry's bp/.
    assert served(m, "bp/true", "docker.io") == ("*", "bp/true")


@pytest.mark.parametrize("ns", ["registry.example.com", "registry.example.com:5001", "gcr.io", "", "bad host", "a/b"])
def test_unknown_ns_matches_nothing(ns: str) -> None:
    assert served(matcher(), "org/app", ns) is None


def test_ns_never_reaches_a_capability_mapping_or_carries_its_key() -> None:
    m = matcher()
    assert served(m, f"{UUID}/nginx", "docker.io") is None
    assert served(m, f"{UUID}/nginx", "ghcr.io") is None
    assert served(m, f"org/{CAP20}", "ghcr.io") is None


def test_ns_respects_hosts() -> None:
    m = matcher({"g/": {"registry": "ghcr.io", "mirror_of": ["ghcr.io"], "hosts": ["mirror.example.com"]}})
    assert served(m, "org/app", "ghcr.io", "mirror.example.com") == ("g/", "org/app")
    assert served(m, "org/app", "ghcr.io", "other.example.com") is None


_seg = st.sampled_from(["a", "b", "bp", "library", UUID, CAP20, f"{UUID[:-1]}0"])
_names = st.lists(_seg, min_size=1, max_size=4).map("/".join)


@given(_names, st.sampled_from([None, "docker.io", "ghcr.io", "quay.io", "elsewhere.io"]))
def test_no_capability_secret_is_ever_sent_upstream(name: str, ns: str | None) -> None:
    match = matcher().match(name, None, ns)
    if match is None:
        return
    if match.mapping.capability:
        assert ns is None and name.split("/")[: len(match.mapping.prefix)] == list(match.mapping.prefix)
        rest = name.split("/")[len(match.mapping.prefix) :]
    else:
        rest = match.upstream_name.split("/")
    assert UUID not in rest and CAP20 not in rest


# --- tokens at the mirror realm ---


class FakeClient(RegistryClient):
    def __init__(self) -> None:
        super().__init__(timeout=1.0)
        self.calls: list[tuple[str, list[str]]] = []

    async def fetch_token(self, mapping: Mapping, upstream_names: list[str]) -> UpstreamToken | None:
        self.calls.append((mapping.key, list(upstream_names)))
        return UpstreamToken(f"tok-{mapping.key}", time.time() + 3600)


def test_mirror_base_and_token_path() -> None:
    assert mirror_base(AUD, "docker.io") == f"{AUD}/ns/docker.io"
    assert token_path("/token") == (True, None)
    assert token_path("/ns/docker.io/token") == (True, "docker.io")
    assert token_path("/ns/INDEX.docker.io/token") == (True, "docker.io")
    assert token_path("/ns/localhost:5000/token") == (True, "localhost:5000")
    for path in ("/ns//token", "/ns/a/b/token", "/ns/bad host/token", "/ns/token", "/x/docker.io/token", "/tokens"):
        assert token_path(path) == (False, None), path


def issue(ns: str | None, *scopes: str, offline: bool = False) -> tuple[FakeClient, TokenCodec, dict[str, object]]:
    cfg = config(MIRROR)
    client, codec = FakeClient(), TokenCodec(cfg.secretkeys)
    svc = TokenService(cfg, Matcher(cfg.mappings), codec, client)
    req = TokenRequest(None, scopes, offline, None, "anonymous")
    answer = asyncio.run(svc.answer(req, AUD, "reg.example.com", ns=ns))
    return client, codec, answer.body


def test_a_token_at_the_mirror_realm_names_that_registry() -> None:
    client, codec, body = issue("ghcr.io", "repository:org/app:pull", "repository:library/alpine:pull")
    assert client.calls == [("gh/", ["org/app", "library/alpine"])]
    token = codec.read_access(str(body["token"]), f"{AUD}/ns/ghcr.io")
    gh = next(m for m in config(MIRROR).mappings if m.key == "gh/")
    assert [(g.mapping, g.names) for g in token.grants] == [(gh.identity, ("org/app", "library/alpine"))]
    # Good only with that ns: not at the base, not for another registry.
    for audience in (AUD, f"{AUD}/ns/docker.io"):
        with pytest.raises(TokenError):
            codec.read_access(str(body["token"]), audience)


def test_the_same_scope_without_ns_is_matched_by_key() -> None:
    client, codec, body = issue(None, "repository:org/app:pull")
    assert client.calls == [("*", ["org/app"])]
    assert codec.read_access(str(body["token"]), AUD).grants[0].names == ("org/app",)


def test_unknown_ns_grants_nothing_and_asks_nobody() -> None:
    client, codec, body = issue("elsewhere.io", "repository:org/app:pull")
    assert client.calls == []
    grants = codec.read_access(str(body["token"]), f"{AUD}/ns/elsewhere.io").grants
    assert [(g.mapping, g.upstream_token) for g in grants] == [(None, None)]


def test_a_refresh_token_stays_at_the_base() -> None:
    _, codec, body = issue("docker.io", "repository:library/alpine:pull", offline=True)
    refresh = str(body["refresh_token"])
    assert codec.read_refresh(refresh, AUD) == "anonymous"
    # ... and a refresh token from the base (docker login) is good at a mirror realm.
    cfg = config(MIRROR)
    svc = TokenService(cfg, Matcher(cfg.mappings), codec, FakeClient())
    req = TokenRequest("refresh_token", ("repository:org/app:pull",), True, refresh, "anonymous")
    renewed = asyncio.run(svc.answer(req, AUD, None, ns="ghcr.io")).body
    assert codec.read_access(str(renewed["token"]), f"{AUD}/ns/ghcr.io").grants[0].names == ("org/app",)


# --- the name a policy decides on (Match.rest) ---


def test_the_rest_is_the_name_below_the_key_and_the_whole_name_for_the_root_and_ns() -> None:
    m = matcher()
    rests = {
        ("bp/tools/true", None): "tools/true",
        ("library/nginx", None): "library/nginx",  # the root key: no segment of its own
        ("gh/org/app", None): "org/app",
        ("org/app", "ghcr.io"): "org/app",  # ?ns=: the whole name, though gh/ has a key segment
        ("mirror/app", "quay.io"): "mirror/app",
        ("quay/x", "quay.io"): "quay/x",
    }
    for (name, ns), rest in rests.items():
        match = m.match(name, None, ns)
        assert match is not None and match.rest == rest, (name, ns)


def test_a_policy_on_a_mirror_decides_on_the_whole_name() -> None:
    from regproxy.mapping.matcher import policy_names
    from regproxy.policy import decide

    m = matcher({"*": {"registry": "docker.io", "mirror_of": ["docker.io"], "deny": ["library/busybox"]}})
    for name, ns in (("library/busybox", "docker.io"), ("busybox", "docker.io"), ("busybox", None)):
        match = m.match(name, None, ns)
        assert match is not None
        assert decide(match.mapping.policy, policy_names(match), None).refused == "repository", (name, ns)
    match = m.match("library/nginx", None, "docker.io")
    assert match is not None and decide(match.mapping.policy, policy_names(match), "latest").admitted
