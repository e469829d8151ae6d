"""Share links through the matcher, `authorize` and the token service: one resolution for routes and tokens."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from regproxy.config import Config, ConfigError, Mapping, parse
from regproxy.links import LinkBook, mint
from regproxy.mapping.matcher import Matcher
from regproxy.protocol.errors import RegistryError
from regproxy.protocol.names import parse_route
from regproxy.tokens.access import Allowed, Answer, Asked, Challenge, Presented, authorize, log_path
from regproxy.tokens.issuer import TokenRequest, TokenService
from regproxy.tokens.paseto import TokenCodec
from regproxy.upstream.auth import UpstreamToken
from regproxy.upstream.client import RegistryClient
from rig.keys import CAP

KEY = "11" * 32
OLD = "22" * 32
AUD = "http://reg.test"
PROXIES: dict[str, Any] = {
    "bp/": {"registry": "http://127.0.0.1:5001", "remote": "backplane"},
    "team/sub/": {"registry": "http://127.0.0.1:5001", "remote": "deep"},
    f"{CAP}/nginx": {"registry": "http://127.0.0.1:5003", "remote": "private/nginx"},
    "only/": {"registry": "http://127.0.0.1:5004", "remote": "o", "hosts": ["images.example.org"]},
    "*": {"registry": "http://127.0.0.1:5005"},
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def config(**extra: Any) -> Config:
    return parse({"secretkey": KEY, "proxies": PROXIES, **extra}, {})


def matcher(cfg: Config, clock: Clock) -> Matcher:
    return Matcher(cfg.mappings, LinkBook(cfg.secretkeys, (m.key for m in cfg.mappings), cfg.revoked_links, clock))


def link_for(key: str, seconds: float, clock: Clock, secret: str = KEY) -> tuple[str, str]:
    link, made = mint(bytes.fromhex(secret), key, int(clock.now + seconds))
    return link, made.id


def test_a_namespace_link_serves_the_names_below_it() -> None:
    clock = Clock()
    m = matcher(config(), clock)
    link, link_id = link_for("bp/", 3600, clock)
    match = m.match(f"{link}/app/x", "reg.test")
    assert match is not None and match.mapping.key == "bp/" and match.upstream_name == "backplane/app/x"
    assert match.link is not None and match.link.id == link_id and match.link.state == "ok"
    assert match.local_name.split("/")[match.key_length :] == ["app", "x"]
    assert match.log_name == f"<link:{link_id}>/app/x" and link not in match.log_name
    assert m.match(link, "reg.test") is None  # a namespace serves names below it only


def test_a_link_for_a_deeper_namespace_key_stands_for_the_whole_key() -> None:
    clock = Clock()
    link, _ = link_for("team/sub/", 3600, clock)
    match = matcher(config(), clock).match(f"{link}/app", None)
    assert match is not None and match.upstream_name == "deep/app"
    assert match.local_name.split("/")[match.key_length :] == ["app"]


def test_a_repository_link_serves_its_last_segment_only() -> None:
    clock = Clock()
    m = matcher(config(), clock)
    link, link_id = link_for(f"{CAP}/nginx", 3600, clock)
    match = m.match(f"{link}/nginx", None)
    assert match is not None and match.upstream_name == "private/nginx"
    assert match.local_name.split("/")[match.key_length :] == []
    assert match.log_name == f"<link:{link_id}>" and CAP not in match.log_name
    for other in (link, f"{link}/nginx/x", f"{link}/redis", f"{link}/{CAP}/nginx"):
        assert m.match(other, None) is None


def test_hosts_apply_to_a_link_as_to_its_mapping() -> None:
    clock = Clock()
    m = matcher(config(), clock)
    link, _ = link_for("only/", 3600, clock)
    assert m.match(f"{link}/a", "images.example.org") is not None
    assert m.match(f"{link}/a", "reg.test") is None


def test_a_non_genuine_link_matches_nothing_not_even_the_root() -> None:
    clock = Clock()
    m = matcher(config(), clock)
    link, _ = link_for("bp/", 3600, clock)
    foreign, _ = link_for("bp/", 3600, clock, secret=OLD)
    tampered = link[:30] + ("a" if link[30] != "a" else "b") + link[31:]
    for name in (f"{tampered}/app", f"{foreign}/app", f"rpl1{'a' * 64}/app"):
        assert m.match(name, None) is None
    # An ordinary unknown name still goes to the root, as before.
    assert m.match("elsewhere/app", None) is not None


def test_a_link_below_a_key_is_never_sent_upstream() -> None:
    clock = Clock()
    link, _ = link_for("bp/", 3600, clock)
    assert matcher(config(), clock).match(f"bp/{link}", None) is None
    assert matcher(config(), clock).match(f"{link}/{link}", None) is None


def test_expired_and_revoked_links_still_match_with_their_state() -> None:
    clock = Clock()
    link, link_id = link_for("bp/", 10, clock)
    clock.now += 11
    match = matcher(config(), clock).match(f"{link}/app", None)
    assert match is not None and match.link is not None and match.link.state == "expired"
    revoked = matcher(config(revoked_links=[link_id]), clock).match(f"{link}/app", None)
    assert revoked is not None and revoked.link is not None and revoked.link.state == "revoked"


def test_rotation_through_secretkeys() -> None:
    clock = Clock()
    old, _ = link_for("bp/", 3600, clock, secret=OLD)
    rotated = parse({"secretkeys": [KEY, OLD], "proxies": PROXIES}, {})
    assert matcher(rotated, clock).match(f"{old}/app", None) is not None
    assert matcher(config(), clock).match(f"{old}/app", None) is None


# --- authorize ---


def said(reply: object) -> tuple[int, str, str]:
    assert isinstance(reply, RegistryError)
    return reply.status, reply.code, reply.message


def asked(name: str) -> Asked:
    return Asked(parse_route(f"/v2/{name}/manifests/v1"), f"/v2/{name}/manifests/v1", "", "reg.test")


def decide(m: Matcher, codec: TokenCodec, svc: TokenService, name: str, method: str = "GET") -> Answer | Allowed:
    body = asyncio.run(svc.answer(TokenRequest(None, (f"repository:{name}:pull",), False, None, "a"), AUD, "reg.test"))
    token = codec.read_access(str(body.body["token"]), AUD)
    return authorize(asked(name), method, Presented(token), m)


class FakeClient(RegistryClient):
    def __init__(self) -> None:
        super().__init__(timeout=1.0)

    async def fetch_token(self, mapping: Mapping, upstream_names: list[str]) -> UpstreamToken | None:
        return UpstreamToken(f"tok-{mapping.key}", time.time() + 3600)


def setup(cfg: Config, clock: Clock) -> tuple[Matcher, TokenCodec, TokenService]:
    m = matcher(cfg, clock)
    codec = TokenCodec(cfg.secretkeys, clock)
    return m, codec, TokenService(cfg, m, codec, FakeClient())


def test_a_good_link_is_allowed_and_its_grant_names_it() -> None:
    clock = Clock()
    m, codec, svc = setup(config(), clock)
    link, link_id = link_for("bp/", 3600, clock)
    decided = decide(m, codec, svc, f"{link}/app")
    assert isinstance(decided, Allowed) and decided.grant.link == link_id
    assert decided.match.upstream_name == "backplane/app"
    assert link not in log_path(asked(f"{link}/app"), decided.match)
    assert link not in log_path(asked(f"{link}/app"))


def test_a_token_expires_no_later_than_its_link() -> None:
    clock = Clock()
    clock.now = int(clock.now) + 0.3
    _, codec, svc = setup(config(), clock)
    link, _ = link_for("bp/", 90, clock)  # good until int(now) + 90: 89.7 s left
    body = asyncio.run(svc.answer(TokenRequest(None, (f"repository:{link}/app:pull",), False, None, "a"), AUD, None))
    assert body.body["expires_in"] == 89  # truncated, never rounded up past the link
    assert codec.read_access(str(body.body["token"]), AUD).expires_at <= int(clock.now) + 90


def test_a_link_in_its_last_second_is_granted_nothing() -> None:
    clock = Clock()
    clock.now = int(clock.now) + 0.6
    _, codec, svc = setup(config(), clock)
    link, _ = link_for("bp/", 1, clock)  # good until int(now) + 1: 0.4 s left
    body = asyncio.run(svc.answer(TokenRequest(None, (f"repository:{link}/app:pull",), False, None, "a"), AUD, None))
    [grant] = codec.read_access(str(body.body["token"]), AUD).grants
    assert grant.mapping is None and grant.link is None


def test_expired_and_revoked_are_denied_saying_why() -> None:
    clock = Clock()
    m, codec, svc = setup(config(), clock)
    link, link_id = link_for("bp/", 100, clock)
    token = codec.read_access(
        str(
            asyncio.run(
                svc.answer(TokenRequest(None, (f"repository:{link}/app:pull",), False, None, "a"), AUD, None)
            ).body["token"]
        ),
        AUD,
    )
    # The same token, already issued: a reload that revokes the link stops it on the next request.
    m2, _, _ = setup(config(revoked_links=[link_id]), clock)
    decided = authorize(asked(f"{link}/app"), "GET", Presented(token), m2)
    assert isinstance(decided, Answer) and said(decided.reply) == (403, "DENIED", "this link was revoked")
    clock.now += 100
    decided = decide(m, codec, svc, f"{link}/app")
    assert isinstance(decided, Answer) and isinstance(decided.reply, RegistryError)
    assert decided.reply.status == 403 and decided.reply.message.startswith("this link expired at ")


def test_a_grant_of_another_link_is_not_honoured() -> None:
    clock = Clock()
    m, codec, svc = setup(config(), clock)
    link, _ = link_for("bp/", 3600, clock)
    other, _ = link_for("bp/", 3600, clock)
    body = asyncio.run(svc.answer(TokenRequest(None, (f"repository:{link}/app:pull",), False, None, "a"), AUD, None))
    token = codec.read_access(str(body.body["token"]), AUD)
    assert authorize(asked(f"{other}/app"), "GET", Presented(token), m).reply == Challenge(  # type: ignore[union-attr]
        f"repository:{other}/app:pull", "insufficient_scope"
    )


def test_a_non_genuine_link_is_answered_as_an_unknown_name() -> None:
    clock = Clock()
    m, codec, svc = setup(parse({"secretkey": KEY, "proxies": {"bp/": PROXIES["bp/"]}}, {}), clock)
    link, _ = link_for("bp/", 3600, clock)
    tampered = link[:-1] + ("a" if link[-1] != "a" else "b")
    unknown = decide(m, codec, svc, "nothere/app")
    fake = decide(m, codec, svc, f"{tampered}/app")
    assert isinstance(unknown, Answer) and isinstance(fake, Answer)
    assert said(unknown.reply) == said(fake.reply) == (404, "NAME_UNKNOWN", "")
    assert (
        (unknown.token, unknown.refusal, unknown.match) == (fake.token, fake.refusal, fake.match) == ("ok", None, None)
    )
    assert isinstance(fake.reply, RegistryError) and isinstance(unknown.reply, RegistryError)
    assert fake.reply.body() == unknown.reply.body()


def test_pull_only_as_for_the_mapping() -> None:
    clock = Clock()
    m, codec, svc = setup(config(), clock)
    link, _ = link_for("bp/", 3600, clock)
    decided = decide(m, codec, svc, f"{link}/app", method="PUT")
    assert isinstance(decided, Answer) and said(decided.reply) == (405, "UNSUPPORTED", "this registry is pull-only")


# --- configuration ---


def test_the_configuration_keys() -> None:
    cfg = config(revoked_links=["abcdefghijklmnop"], link_max_age="14d")
    assert cfg.revoked_links == frozenset({"abcdefghijklmnop"}) and cfg.link_max_age == 14 * 86400
    assert config().link_max_age == 90 * 86400 and config().revoked_links == frozenset()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"revoked_links": "abcdefghijklmnop"}, "revoked_links: must be a list"),
        ({"revoked_links": ["abc"]}, "revoked_links[0]: not a link id"),
        ({"revoked_links": [12]}, "revoked_links[0]: not a link id"),
        ({"link_max_age": "forever"}, "link_max_age: must be a duration"),
        ({"link_max_age": 0}, "link_max_age: must be at least 1s"),
        ({"link_max_age": "4000d"}, "link_max_age: must be at most 3650d"),
    ],
)
def test_bad_configuration_keys(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(**extra)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
