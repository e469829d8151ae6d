"""Upstream registry knowledge: realms, token answers and the client (upstream/client.py, upstream/auth.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import Mapping, Upstream
from regproxy.transport import trust
from regproxy.transport.egress import Egress, ProxySpec
from regproxy.transport.trust import Trust
from regproxy.upstream.auth import (
    DEFAULT_EXPIRES_IN,
    MAX_EXPIRES_IN,
    MAX_UPSTREAM_TOKEN,
    AuthMethod,
    UpstreamError,
    UpstreamToken,
    parse_token_response,
    realm_allowed,
)
from regproxy.upstream.client import MAX_TOKEN_RESPONSE, RegistryClient
from rig import badcerts
from rig.httpserver import HandlerServer
from rig.keys import CAP

HTTPS_UP = Upstream("https", "registry.example.com", 443)
HTTP_UP = Upstream("http", "127.0.0.1", 5000)
NONCANONICAL_IP_BUG = "BUG: non-canonical IPv4 forms pass realm_allowed but resolve to loopback (getaddrinfo)"

Handler = Callable[[httpx.Request], httpx.Response]


# --- realm_allowed ---


@pytest.mark.parametrize(
    "realm",
    [
        "https://auth.docker.io/token",
        "https://ghcr.io/token?x=1",
        "https://auth.example.com:8443/token",
        "https://8.8.8.8/token",
        "https://registry.example.com/token",
    ],
)
def test_https_public_realms_are_allowed(realm: str) -> None:
    assert realm_allowed(realm, HTTPS_UP)


def test_http_realm_on_another_host_is_refused() -> None:
    assert not realm_allowed("http://auth.example.com/token", HTTPS_UP)


def test_http_realm_on_https_upstream_own_host_is_refused() -> None:
    assert not realm_allowed("http://registry.example.com/token", HTTPS_UP)


@pytest.mark.parametrize("realm", ["http://127.0.0.1:5001/token", "https://127.0.0.1/token", "http://127.0.0.1/t"])
def test_realm_on_http_upstream_own_host_is_allowed(realm: str) -> None:
    assert realm_allowed(realm, HTTP_UP)


def test_loopback_realm_on_own_https_host_is_allowed() -> None:
    assert realm_allowed("https://localhost:5001/token", Upstream("https", "localhost", 5000))


@pytest.mark.parametrize(
    "realm",
    [
        "file:///etc/passwd",
        "ftp://auth.example.com/token",
        "javascript:alert(1)",
        "gopher://auth.example.com/",
        "https://user:pw@auth.example.com/token",
        "https://user@auth.example.com/token",
        "https://auth.example.com/token#frag",
        "https://127.0.0.1/token",
        "https://10.1.2.3/token",
        "https://192.168.0.1/token",
        "https://172.16.0.1/token",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/token",
        "https://auth.localhost/token",
        "https://[::1]/token",
        "https://[fe80::1]/token",
        "https://[::ffff:127.0.0.1]/token",
        "https://0.0.0.0/token",
        "https:///token",
        "https://auth.example.com:99999/token",
        "//auth.example.com/token",
        "",
        "not a url",
    ],
)
def test_refused_realms(realm: str) -> None:
    assert not realm_allowed(realm, HTTPS_UP)


def test_http_realm_to_other_host_of_http_upstream_is_refused() -> None:
    assert not realm_allowed("http://auth.example.com/token", HTTP_UP)


@pytest.mark.parametrize(
    "realm", ["https://127.1/token", "https://2130706433/token", "https://0x7f000001/token", "https://0177.0.0.1/t"]
)
def test_non_canonical_loopback_addresses_are_refused(realm: str) -> None:
    assert not realm_allowed(realm, HTTPS_UP)


@given(st.text(max_size=60))
def test_realm_allowed_never_raises(text: str) -> None:
    for candidate in (text, "https://" + text):
        realm_allowed(candidate, HTTPS_UP)


# --- parse_token_response ---


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_token_field() -> None:
    assert parse_token_response(body(token="abc", expires_in=300), 1000.0) == UpstreamToken("abc", 1300.0, 1000.0)


def test_access_token_field() -> None:
    assert parse_token_response(body(access_token="abc", expires_in=120), 1000.0).token == "abc"


def test_token_preferred_over_access_token() -> None:
    assert parse_token_response(body(token="t", access_token="a"), 0.0).token == "t"


def test_empty_token_falls_back_to_access_token() -> None:
    assert parse_token_response(body(token="", access_token="a"), 0.0).token == "a"


def test_expires_in_defaults_to_60() -> None:
    assert parse_token_response(body(token="abc"), 1000.0).expires_at == 1000.0 + DEFAULT_EXPIRES_IN


@pytest.mark.parametrize("expires_in", ["300", True, None, [300]])
def test_expires_in_that_is_not_a_number_defaults(expires_in: object) -> None:
    assert parse_token_response(body(token="abc", expires_in=expires_in), 1000.0).expires_at == 1060.0


@pytest.mark.parametrize(
    "raw_expires_in", [b"0", b"-5", b"-1e9", b"0.0", b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 400]
)
def test_impossible_expires_in_is_refused(raw_expires_in: bytes) -> None:
    """Zero, negative, not finite, or beyond any token's life (a 400-digit integer once raised OverflowError)."""
    with pytest.raises(UpstreamError, match="expires_in"):
        parse_token_response(b'{"token":"abc","expires_in":' + raw_expires_in + b"}", 1000.0)


def test_very_long_expires_in_is_believed_for_a_day_at_most() -> None:
    """A cached upstream token is fetched again within a day, whatever the upstream claims."""
    assert parse_token_response(body(token="abc", expires_in=365 * 86400), 1000.0).expires_at == 1000.0 + 86400
    assert parse_token_response(body(token="abc", expires_in=MAX_EXPIRES_IN), 0.0).expires_at == 86400
    with pytest.raises(UpstreamError):
        parse_token_response(body(token="abc", expires_in=MAX_EXPIRES_IN + 1), 0.0)


def test_fractional_expires_in_is_kept() -> None:
    assert parse_token_response(body(token="abc", expires_in=1.5), 1000.0).expires_at == 1001.5


def test_deeply_nested_json_is_refused_not_raised() -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting; it fits in MAX_TOKEN_RESPONSE."""
    with pytest.raises(UpstreamError, match="not JSON"):
        parse_token_response(b"[" * 200_000, 0.0)
    with pytest.raises(UpstreamError, match="not JSON"):
        parse_token_response(b'{"token":' + b'{"a":' * 100_000, 0.0)


def test_issued_at_is_not_trusted() -> None:
    parsed = parse_token_response(body(token="abc", expires_in=300, issued_at="2999-01-01T00:00:00Z"), 1000.0)
    assert parsed.expires_at == 1300.0


def test_token_repr_hides_token() -> None:
    assert "s3cret-token" not in repr(UpstreamToken("s3cret-token", 0.0))


def test_longest_token_is_accepted() -> None:
    assert len(parse_token_response(body(token="a" * MAX_UPSTREAM_TOKEN), 0.0).token) == MAX_UPSTREAM_TOKEN


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b'"token"',
        b"null",
        body(),
        body(token=5),
        body(token=""),
        body(token="a" * (MAX_UPSTREAM_TOKEN + 1)),
        body(token="tök"),
        body(token="a b"),
        body(token='a"b'),
        body(token="a'b"),
        body(token="a,b"),
        body(token="a\r\nX-Header: 1"),
        body(token="a\tb"),
        body(token="a\x00b"),
    ],
)
def test_unusable_token_responses(data: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_token_response(data, 0.0)


@given(st.binary(max_size=100))
def test_parse_token_response_only_raises_upstream_error(data: bytes) -> None:
    try:
        parse_token_response(data, 0.0)
    except UpstreamError:
        pass


# --- RegistryClient ---


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_client(handler: Handler, log: list[httpx.Request]) -> RegistryClient:
    def recording(request: httpx.Request) -> httpx.Response:
        log.append(request)
        return handler(request)

    client = RegistryClient(timeout=5.0)
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(recording), follow_redirects=False)
    return client


def mapping(upstream: Upstream = HTTPS_UP, auth: str | None = "Basic dXNlcjpwYXNz") -> Mapping:
    return Mapping(key="bp/", prefix=("bp",), namespace=True, upstream=upstream, remote="org", auth=auth)


def bearer(realm: str = "https://auth.example.com/token", service: str = "registry.example.com") -> str:
    return f'Bearer realm="{realm}",service="{service}"'


def registry(challenge: str | None = None, status: int = 401, token_answer: httpx.Response | None = None) -> Handler:
    """An upstream whose /v2/ answers 200 (no challenge) or `status` with the challenge."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            if challenge is None:
                return httpx.Response(200)
            return httpx.Response(status, headers={"WWW-Authenticate": challenge})
        return token_answer or httpx.Response(200, json={"token": "up-token", "expires_in": 300})

    return handler


async def discover(client: RegistryClient, upstream: Upstream = HTTPS_UP) -> AuthMethod:
    try:
        return await client.auth_method(upstream)
    finally:
        await client.aclose()


async def fetch(client: RegistryClient, m: Mapping, names: list[str]) -> UpstreamToken | None:
    try:
        return await client.fetch_token(m, names)
    finally:
        await client.aclose()


def test_discovery_none() -> None:
    log: list[httpx.Request] = []
    assert run(discover(make_client(registry(), log))) == AuthMethod("none")
    assert [str(r.url) for r in log] == ["https://registry.example.com/v2/"]


def test_discovery_basic() -> None:
    log: list[httpx.Request] = []
    assert run(discover(make_client(registry('Basic realm="Registry"'), log))) == AuthMethod("basic")


def test_discovery_bearer() -> None:
    log: list[httpx.Request] = []
    method = run(discover(make_client(registry(bearer()), log)))
    assert method == AuthMethod("bearer", "https://auth.example.com/token", "registry.example.com")


def test_discovery_bearer_on_403() -> None:
    log: list[httpx.Request] = []
    method = run(discover(make_client(registry(bearer(), status=403), log)))
    assert method.kind == "bearer"


def test_discovery_sends_no_credentials() -> None:
    log: list[httpx.Request] = []
    run(discover(make_client(registry(bearer()), log)))
    assert "authorization" not in log[0].headers


@pytest.mark.parametrize(
    ("challenge", "status"), [(None, 500), ("Digest realm=x", 401), ("", 401), ("Bearer", 401), (None, 404)]
)
def test_discovery_failures(challenge: str | None, status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"WWW-Authenticate": challenge} if challenge is not None else {}
        return httpx.Response(status, headers=headers)

    with pytest.raises(UpstreamError) as info:
        run(discover(make_client(handler, [])))
    assert not info.value.timeout


def test_discovery_is_cached() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer()), log)

    async def twice() -> tuple[AuthMethod, AuthMethod]:
        try:
            return await client.auth_method(HTTPS_UP), await client.auth_method(HTTPS_UP)
        finally:
            await client.aclose()

    first, second = run(twice())
    assert first == second
    assert len(log) == 1


def test_concurrent_discovery_makes_one_request() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer()), log)

    async def many() -> list[AuthMethod]:
        try:
            return list(await asyncio.gather(*(client.auth_method(HTTPS_UP) for _ in range(5))))
        finally:
            await client.aclose()

    assert len(set(run(many()))) == 1
    assert len(log) == 1


def test_learn_replaces_cached_method() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(), log)
    client.learn(HTTPS_UP, bearer("https://auth2.example.com/token"))
    method = run(discover(client))
    assert method.realm == "https://auth2.example.com/token"
    assert log == []


def test_learn_ignores_unusable_challenge() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(), log)
    client.learn(HTTPS_UP, "Digest realm=x")
    assert run(discover(client)) == AuthMethod("none")
    assert len(log) == 1


def test_forget_drops_cached_method() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(), log)
    client.learn(HTTPS_UP, 'Basic realm="x"')
    client.forget(HTTPS_UP)
    assert run(discover(client)) == AuthMethod("none")


def test_discovery_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(UpstreamError) as info:
        run(discover(make_client(handler, [])))
    assert info.value.timeout


def test_discovery_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UpstreamError) as info:
        run(discover(make_client(handler, [])))
    assert not info.value.timeout


def test_fetch_token_from_allowed_realm() -> None:
    log: list[httpx.Request] = []
    started = time.time()
    token = run(fetch(make_client(registry(bearer()), log), mapping(), ["org/app", "org/web"]))
    assert token is not None and token.token == "up-token"
    assert started + 299 <= token.expires_at <= time.time() + 300
    realm_request = log[1]
    assert realm_request.url.host == "auth.example.com"
    assert realm_request.url.params.get_list("scope") == ["repository:org/app:pull", "repository:org/web:pull"]
    assert realm_request.url.params["service"] == "registry.example.com"
    assert realm_request.headers["authorization"] == "Basic dXNlcjpwYXNz"


def test_fetch_token_without_service() -> None:
    log: list[httpx.Request] = []
    run(fetch(make_client(registry('Bearer realm="https://auth.example.com/token"'), log), mapping(), ["org/app"]))
    assert "service" not in log[1].url.params


def test_fetch_token_anonymous_sends_no_authorization() -> None:
    log: list[httpx.Request] = []
    token = run(fetch(make_client(registry(bearer()), log), mapping(auth=None), ["org/app"]))
    assert token is not None
    assert "authorization" not in log[1].headers


def test_fetch_token_refuses_disallowed_realm_without_sending() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer("http://evil.example.com/token")), log)
    with pytest.raises(UpstreamError):
        run(fetch(client, mapping(), ["org/app"]))
    assert [r.url.path for r in log] == ["/v2/"]


def test_fetch_token_refuses_metadata_realm() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer("https://169.254.169.254/token")), log)
    with pytest.raises(UpstreamError):
        run(fetch(client, mapping(), ["org/app"]))
    assert len(log) == 1


@pytest.mark.parametrize("challenge", [None, 'Basic realm="r"'])
def test_fetch_token_not_needed_without_bearer(challenge: str | None) -> None:
    log: list[httpx.Request] = []
    assert run(fetch(make_client(registry(challenge), log), mapping(), ["org/app"])) is None
    assert len(log) == 1


def test_fetch_token_not_needed_with_configured_bearer() -> None:
    log: list[httpx.Request] = []
    assert run(fetch(make_client(registry(bearer()), log), mapping(auth="Bearer static"), ["org/app"])) is None
    assert log == []


@pytest.mark.parametrize("status", [401, 403])
def test_fetch_token_refused_credentials(status: int) -> None:
    client = make_client(registry(bearer(), token_answer=httpx.Response(status)), [])
    with pytest.raises(UpstreamError, match="refused"):
        run(fetch(client, mapping(), ["org/app"]))


@pytest.mark.parametrize("status", [302, 404, 500])
def test_fetch_token_other_status(status: int) -> None:
    answer = httpx.Response(status, headers={"Location": "https://elsewhere.example.com/"})
    log: list[httpx.Request] = []
    with pytest.raises(UpstreamError) as info:
        run(fetch(make_client(registry(bearer(), token_answer=answer), log), mapping(), ["org/app"]))
    assert not info.value.timeout
    assert len(log) == 2  # no redirect followed


def test_fetch_token_oversized_response() -> None:
    answer = httpx.Response(200, content=b'{"token":"' + b"a" * MAX_TOKEN_RESPONSE + b'"}')
    with pytest.raises(UpstreamError, match="too large"):
        run(fetch(make_client(registry(bearer(), token_answer=answer), []), mapping(), ["org/app"]))


def test_fetch_token_bad_body() -> None:
    answer = httpx.Response(200, content=b"<html>")
    with pytest.raises(UpstreamError):
        run(fetch(make_client(registry(bearer(), token_answer=answer), []), mapping(), ["org/app"]))


def test_fetch_token_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(401, headers={"WWW-Authenticate": bearer()})
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(UpstreamError) as info:
        run(fetch(make_client(handler, []), mapping(), ["org/app"]))
    assert info.value.timeout


def test_fetch_token_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(401, headers={"WWW-Authenticate": bearer()})
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UpstreamError) as info:
        run(fetch(make_client(handler, []), mapping(), ["org/app"]))
    assert not info.value.timeout


def test_fetch_token_error_message_has_no_credentials() -> None:
    client = make_client(registry(bearer(), token_answer=httpx.Response(401)), [])
    with pytest.raises(UpstreamError) as info:
        run(fetch(client, mapping(), ["org/app"]))
    assert "dXNlcjpwYXNz" not in str(info.value)


def test_fetch_token_unparseable_realm_is_upstream_error() -> None:
    client = make_client(registry(bearer("https://256.1.1.1/token")), [])
    with pytest.raises(UpstreamError):
        run(fetch(client, mapping(), ["org/app"]))


# --- upstream token reuse ---


def _token_requests(log: list[httpx.Request]) -> int:
    return sum(1 for r in log if r.url.path != "/v2/")


def test_token_is_reused_for_the_same_mapping_and_repositories() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer()), log)

    async def go() -> list[UpstreamToken | None]:
        try:
            return [await client.fetch_token(mapping(), ["org/a", "org/b"]) for _ in range(3)] + [
                await client.fetch_token(mapping(), ["org/b", "org/a"])
            ]
        finally:
            await client.aclose()

    tokens = run(go())
    assert _token_requests(log) == 1 and client.token_fetches == 1
    assert len({t.token for t in tokens if t}) == 1


def test_token_is_not_shared_across_repositories_mappings_or_credentials() -> None:
    log: list[httpx.Request] = []
    client = make_client(registry(bearer()), log)
    other_key = Mapping(key="cp/", prefix=("cp",), namespace=True, upstream=HTTPS_UP, remote="org", auth=None)

    async def go() -> None:
        try:
            await client.fetch_token(mapping(), ["org/a"])
            await client.fetch_token(mapping(), ["org/b"])
            await client.fetch_token(other_key, ["org/a"])
            await client.fetch_token(mapping(auth="Basic b3RoZXI6cGFzcw=="), ["org/a"])
        finally:
            await client.aclose()

    run(go())
    assert _token_requests(log) == 4
    assert [r.headers.get("authorization") for r in log if r.url.path != "/v2/"] == [
        "Basic dXNlcjpwYXNz",
        "Basic dXNlcjpwYXNz",
        None,
        "Basic b3RoZXI6cGFzcw==",
    ]


def test_token_is_fetched_again_once_half_its_life_is_gone() -> None:
    log: list[httpx.Request] = []
    answer = httpx.Response(200, json={"token": "short", "expires_in": 2})
    client = make_client(registry(bearer(), token_answer=answer), log)

    async def go() -> None:
        try:
            await client.fetch_token(mapping(), ["org/a"])
            await client.fetch_token(mapping(), ["org/a"])
            assert _token_requests(log) == 1
            await asyncio.sleep(1.1)
            await client.fetch_token(mapping(), ["org/a"])
        finally:
            await client.aclose()

    run(go())
    assert _token_requests(log) == 2


def test_reusable_needs_half_the_life_left() -> None:
    t = UpstreamToken("t", expires_at=1300.0, issued_at=1000.0)
    assert t.reusable(1000.0) and t.reusable(1150.0)
    assert not t.reusable(1151.0) and not t.reusable(1400.0)


# --- hostile upstreams (found by tests/e2e/test_attacks.py) ---


def _endless(counter: list[int], delay: float = 0.0, size: int = 1 << 16) -> Callable[[], Any]:
    async def gen() -> Any:
        while True:
            counter[0] += 1
            if delay:
                await asyncio.sleep(delay)
            yield b"x" * size

    return gen


def test_discovery_never_reads_the_ping_body() -> None:
    """A /v2/ answer with an endless body: the challenge is read, the body is not."""
    pulled = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": bearer()}, content=_endless(pulled)())

    method = run(discover(make_client(handler, [])))
    assert method.kind == "bearer"
    assert pulled[0] <= 1


def test_dribbled_token_answer_is_bounded_as_a_whole() -> None:
    """Each chunk comes well within the read timeout; the whole answer never does."""
    pulled = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(401, headers={"WWW-Authenticate": bearer()})
        return httpx.Response(200, content=_endless(pulled, delay=0.05, size=1)())

    client = make_client(handler, [])
    client.timeout = 0.5
    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        run(fetch(client, mapping(), ["org/app"]))
    assert info.value.timeout
    assert time.monotonic() - started < 3
    assert pulled[0] > 2  # it did dribble: each chunk came in time


# --- trust: real TLS to the registry and its realm (each mapping's ca_file / tls_verify) ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> badcerts.Pki:
    return badcerts.make_pki(tmp_path_factory.mktemp("pki"))


def tls_mapping(port: int, t: Trust, host: str = "localhost", label: str = "tls/") -> Mapping:
    return Mapping(
        key=label,
        prefix=(label.rstrip("/"),),
        namespace=True,
        upstream=Upstream("https", host, port),
        remote="org",
        auth="Basic dXNlcjpwYXNz",
        trust=t,
    )


def ca_trust(pki: badcerts.Pki) -> Trust:
    return Trust(True, str(pki.ca_cert), trust.read_ca_file(pki.ca_cert), trust.default_store())


async def discover_with(m: Mapping) -> AuthMethod:
    client = RegistryClient(timeout=5.0, egress=Egress())
    try:
        return await client.auth_method(m.upstream, m)
    finally:
        await client.aclose()


def tls_failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "upstream TLS" in r.getMessage()]


def test_ca_file_makes_a_private_registry_trusted(pki: badcerts.Pki, caplog: pytest.LogCaptureFixture) -> None:
    with badcerts.TlsHttpServer(pki.good()) as server:
        assert run(discover_with(tls_mapping(server.port, ca_trust(pki)))) == AuthMethod("none")
        assert run(discover_with(tls_mapping(server.port, ca_trust(pki), host="127.0.0.1"))) == AuthMethod("none")
        assert server.paths == ["/v2/", "/v2/"]
    assert tls_failure_lines(caplog) == []


@pytest.mark.parametrize(
    ("problem", "category"),
    [("no ca_file", "unknown CA"), ("wrong host", "host name mismatch"), ("expired", "expired certificate")],
)
def test_certificate_failures_are_502_material_with_one_precise_log_line(
    pki: badcerts.Pki, caplog: pytest.LogCaptureFixture, problem: str, category: str
) -> None:
    cert = {"no ca_file": pki.good, "wrong host": pki.wrong_host, "expired": pki.expired}[problem]()
    t = Trust(store=trust.default_store()) if problem == "no ca_file" else ca_trust(pki)
    with badcerts.TlsHttpServer(cert) as server, pytest.raises(UpstreamError) as info:
        port = server.port
        run(discover_with(tls_mapping(port, t)))
    # The client's answer (the 502 body) names the kind of failure, never OpenSSL's words (a host name).
    assert str(info.value) == f"upstream registry unreachable (TLS: {category})"
    assert not info.value.timeout
    (line,) = tls_failure_lines(caplog)
    assert line.startswith(f"registryproxy: upstream TLS to localhost:{port} failed for mapping tls/: {category} (")
    assert "dXNlcjpwYXNz" not in caplog.text


def test_tls_verify_false_connects_to_anything(pki: badcerts.Pki) -> None:
    with badcerts.TlsHttpServer(pki.wrong_host()) as server:
        assert run(discover_with(tls_mapping(server.port, Trust(False)))) == AuthMethod("none")


def test_realm_on_the_same_tls_host_uses_the_mappings_trust(pki: badcerts.Pki) -> None:
    with badcerts.TlsHttpServer(pki.good(), status=401) as server:
        server.challenge = f'Bearer realm="https://localhost:{server.port}/token",service="tls"'
        m = tls_mapping(server.port, ca_trust(pki))

        async def go() -> UpstreamToken | None:
            client = RegistryClient(timeout=5.0, egress=Egress())
            try:
                return await client.fetch_token(m, ["org/app"])
            finally:
                await client.aclose()

        token = run(go())
        assert token is not None and token.token == "tls-token"
        assert server.paths[0] == "/v2/" and server.paths[1].startswith("/token?")


def test_realm_with_a_bad_certificate_fails_with_the_realms_reason(
    pki: badcerts.Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with badcerts.TlsHttpServer(pki.good(), status=401) as registry_srv, badcerts.TlsHttpServer(pki.expired()) as realm:
        realm_port = realm.port
        registry_srv.challenge = f'Bearer realm="https://localhost:{realm_port}/token",service="tls"'
        m = tls_mapping(registry_srv.port, ca_trust(pki))

        async def go() -> None:
            client = RegistryClient(timeout=5.0, egress=Egress())
            try:
                await client.fetch_token(m, ["org/app"])
            finally:
                await client.aclose()

        with pytest.raises(UpstreamError, match=r"^upstream token service unreachable \(TLS: expired certificate\)$"):
            run(go())
        assert realm.paths == []
    (line,) = tls_failure_lines(caplog)
    assert f"to localhost:{realm_port} failed for mapping tls/: expired certificate" in line


def test_one_client_per_trust(pki: badcerts.Pki) -> None:
    client = RegistryClient(timeout=5.0, egress=Egress())
    a = client._client("https://r.example.com/v2/", ca_trust(pki))
    assert client._client("https://other.example.com/v2/", ca_trust(pki)) is a
    assert client._client("https://r.example.com/v2/", Trust(False)) is not a
    run(client.aclose())
    assert client._clients == {}


def test_capability_mappings_are_logged_by_label(pki: badcerts.Pki, caplog: pytest.LogCaptureFixture) -> None:
    key = f"{CAP}/app"
    with badcerts.TlsHttpServer(pki.good()) as server:
        up = Upstream("https", "localhost", server.port)
        m = Mapping(key, tuple(key.split("/")), False, up, "org/app", capability=True)  # default trust
        with pytest.raises(UpstreamError):
            run(discover_with(m))
    assert key not in caplog.text and m.label in caplog.text


# --- egress: the forward proxy the environment names ---


class _ForwardProxy:
    """Records what reaches it; answers absolute-form GETs 200 and refuses CONNECT (403)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int) -> None:
                outer.requests.append((self.requestline, self.headers.get("Proxy-Authorization")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self._answer(200)

            def do_CONNECT(self) -> None:
                self._answer(403)

        self._server = HandlerServer("forward-proxy", Handler).start()

    @property
    def spec(self) -> ProxySpec:
        return ProxySpec("http", "127.0.0.1", self._server.port, "robot", "pw")

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def forward_proxy() -> Any:
    p = _ForwardProxy()
    yield p
    p.stop()


def _discover_via(egress: Egress, upstream: Upstream) -> AuthMethod:
    async def go() -> AuthMethod:
        client = RegistryClient(timeout=5.0, egress=egress)
        try:
            return await client.auth_method(upstream)
        finally:
            await client.aclose()

    return run(go())


def test_plain_http_upstream_goes_through_http_proxy(forward_proxy: _ForwardProxy) -> None:
    up = Upstream("http", "registry.example.com", 5000)
    assert _discover_via(Egress(http=forward_proxy.spec), up) == AuthMethod("none")
    assert forward_proxy.requests == [("GET http://registry.example.com:5000/v2/ HTTP/1.1", "Basic cm9ib3Q6cHc=")]


def test_https_upstream_is_tunnelled_through_https_proxy(forward_proxy: _ForwardProxy) -> None:
    with pytest.raises(UpstreamError, match=r"unreachable \(ProxyError\)"):
        _discover_via(Egress(https=forward_proxy.spec), Upstream("https", "registry.example.com", 443))
    assert forward_proxy.requests == [("CONNECT registry.example.com:443 HTTP/1.1", "Basic cm9ib3Q6cHc=")]


def test_no_proxy_and_loopback_go_direct(forward_proxy: _ForwardProxy, pki: badcerts.Pki) -> None:
    with pytest.raises(UpstreamError):
        _discover_via(
            Egress(https=forward_proxy.spec, no_proxy=("example.invalid",)),
            Upstream("https", "registry.example.invalid", 443),
        )
    with badcerts.TlsHttpServer(pki.good()) as server:
        m = tls_mapping(server.port, ca_trust(pki))

        async def go() -> AuthMethod:
            client = RegistryClient(timeout=5.0, egress=Egress(https=forward_proxy.spec))
            try:
                return await client.auth_method(m.upstream, m)
            finally:
                await client.aclose()

        assert run(go()) == AuthMethod("none")
    assert forward_proxy.requests == []


def test_unusable_proxy_environment_fails_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://robot:hunter2@proxy:1080")
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(UpstreamError, match="forward proxy setting unusable") as info:
        _discover_via_env()
    assert "hunter2" not in str(info.value)


def _discover_via_env() -> AuthMethod:
    async def go() -> AuthMethod:
        client = RegistryClient(timeout=5.0)
        try:
            return await client.auth_method(HTTPS_UP)
        finally:
            await client.aclose()

    return run(go())


# --- token_realms: the operator's explicit allow-list ---


@pytest.mark.parametrize(
    "realm",
    ["https://10.0.0.7/token", "http://10.0.0.7:80/auth?x=1", "https://AUTH.localhost:443/t", "https://[fd00::7]/t"],
)
def test_a_realm_the_mapping_lists_is_allowed_though_the_policy_refuses_it(realm: str) -> None:
    allowed = ("https://10.0.0.7:443", "http://10.0.0.7:80", "https://auth.localhost:443", "https://[fd00::7]:443")
    assert not realm_allowed(realm, HTTPS_UP)
    assert realm_allowed(realm, HTTPS_UP, allowed)


@pytest.mark.parametrize(
    "realm",
    [
        "https://10.0.0.7:8443/token",  # another port
        "http://10.0.0.7/token",  # another scheme
        "https://user:pw@10.0.0.7/token",  # credentials in the URL
        "https://10.0.0.8/token",  # another host
    ],
)
def test_the_allow_list_names_origins_exactly(realm: str) -> None:
    assert not realm_allowed(realm, HTTPS_UP, ("https://10.0.0.7:443",))
