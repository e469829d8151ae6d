"""RegistryClient.on_token_fetch: told once per upstream token request, never for a cached token (upstream/client.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry
from regproxy.config import Mapping, Upstream
from regproxy.ops.metrics import Metrics
from regproxy.upstream.auth import UpstreamError, UpstreamToken
from regproxy.upstream.client import RegistryClient

HTTPS_UP = Upstream("https", "registry.example.com", 443)
HTTP_UP = Upstream("http", "127.0.0.1", 5000)
BEARER = 'Bearer realm="https://auth.example.com/token",service="registry.example.com"'

Handler = Callable[[httpx.Request], httpx.Response]


def mapping(upstream: Upstream = HTTPS_UP, remote: str = "org") -> Mapping:
    return Mapping(key="bp/", prefix=("bp",), namespace=True, upstream=upstream, remote=remote, auth="Basic dTpw")


def registry(token_answer: Callable[[httpx.Request], httpx.Response], challenge: str | None = BEARER) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return (
                httpx.Response(200)
                if challenge is None
                else httpx.Response(401, headers={"WWW-Authenticate": challenge})
            )
        return token_answer(request)

    return handler


def ok_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"token": "up-token", "expires_in": 300})


def observed_client(handler: Handler) -> tuple[RegistryClient, list[tuple[str, bool]], list[str]]:
    """A client on a mock transport, the observer's calls, and the paths it requested."""
    calls: list[tuple[str, bool]] = []
    paths: list[str] = []

    def recording(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return handler(request)

    client = RegistryClient(timeout=5.0)
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(recording), follow_redirects=False)
    client.on_token_fetch = lambda upstream, ok: calls.append((upstream, ok))
    return client, calls, paths


def fetch_all(client: RegistryClient, *requests: tuple[Mapping, list[str]]) -> list[UpstreamToken | None | str]:
    """Each fetch's token, or the UpstreamError's message."""

    async def go() -> list[UpstreamToken | None | str]:
        results: list[UpstreamToken | None | str] = []
        try:
            for m, names in requests:
                try:
                    results.append(await client.fetch_token(m, names))
                except UpstreamError as e:
                    results.append(str(e))
        finally:
            await client.aclose()
        return results

    return asyncio.run(go())


def test_default_is_no_observer() -> None:
    assert RegistryClient(timeout=1.0).on_token_fetch is None


def test_success_is_reported_once_and_cache_hits_never() -> None:
    client, calls, _ = observed_client(registry(ok_answer))
    results = fetch_all(client, (mapping(), ["org/a"]), (mapping(), ["org/a"]), (mapping(), ["org/a"]))
    assert all(isinstance(r, UpstreamToken) for r in results)
    assert calls == [("registry.example.com", True)]
    assert client.token_fetches == 1


def test_each_real_fetch_is_reported() -> None:
    client, calls, _ = observed_client(registry(ok_answer))
    fetch_all(client, (mapping(), ["org/a"]), (mapping(), ["org/b"]), (mapping(), ["org/a"]))
    assert calls == [("registry.example.com", True)] * 2


def test_concurrent_fetches_of_one_token_are_reported_once() -> None:
    client, calls, _ = observed_client(registry(ok_answer))

    async def many() -> None:
        try:
            await asyncio.gather(*(client.fetch_token(mapping(), ["org/a"]) for _ in range(5)))
        finally:
            await client.aclose()

    asyncio.run(many())
    assert calls == [("registry.example.com", True)]


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(401),
        httpx.Response(403),
        httpx.Response(500),
        httpx.Response(200, content=b"<html>"),
        httpx.Response(200, json={"token": ""}),
        httpx.Response(200, content=b'{"token":"' + b"a" * 300_000 + b'"}'),
    ],
)
def test_failures_are_reported(answer: httpx.Response) -> None:
    client, calls, _ = observed_client(registry(lambda request: answer))
    [result] = fetch_all(client, (mapping(), ["org/a"]))
    assert isinstance(result, str)
    assert calls == [("registry.example.com", False)]


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
def test_transport_failures_are_reported(error: type[httpx.TransportError]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)

    client, calls, _ = observed_client(registry(fail))
    [result] = fetch_all(client, (mapping(), ["org/a"]))
    assert isinstance(result, str)
    assert calls == [("registry.example.com", False)]


def test_a_failure_then_a_success_are_both_reported() -> None:
    answers = iter([httpx.Response(503), httpx.Response(200, json={"token": "t", "expires_in": 300})])
    client, calls, _ = observed_client(registry(lambda request: next(answers)))
    fetch_all(client, (mapping(), ["org/a"]), (mapping(), ["org/a"]))
    assert calls == [("registry.example.com", False), ("registry.example.com", True)]


def test_the_label_is_the_upstream_netloc_with_a_non_default_port() -> None:
    challenge = 'Bearer realm="http://127.0.0.1:5000/token"'
    client, calls, _ = observed_client(registry(ok_answer, challenge))
    fetch_all(client, (mapping(HTTP_UP), ["org/a"]))
    assert calls == [("127.0.0.1:5000", True)]


@pytest.mark.parametrize(
    "challenge",
    [None, 'Basic realm="r"', 'Bearer realm="http://evil.example.com/token"'],
)
def test_nothing_is_reported_when_no_token_request_is_sent(challenge: str | None) -> None:
    client, calls, paths = observed_client(registry(ok_answer, challenge))
    fetch_all(client, (mapping(), ["org/a"]))
    assert paths == ["/v2/"]
    assert calls == []


def test_a_failing_observer_changes_nothing() -> None:
    client, _, _ = observed_client(registry(ok_answer))

    def broken(upstream: str, ok: bool) -> None:
        raise RuntimeError("observer bug")

    client.on_token_fetch = broken
    [result] = fetch_all(client, (mapping(), ["org/a"]))
    assert isinstance(result, UpstreamToken) and result.token == "up-token"

    client, _, _ = observed_client(registry(lambda request: httpx.Response(401)))
    client.on_token_fetch = broken
    [result] = fetch_all(client, (mapping(), ["org/a"]))
    assert result == "upstream token service refused the mapping's credentials (401)"


def test_metrics_counts_through_the_observer() -> None:
    metrics = Metrics(CollectorRegistry())
    answers = iter([httpx.Response(200, json={"token": "t", "expires_in": 300}), httpx.Response(500)])
    client, _, _ = observed_client(registry(lambda request: next(answers)))
    client.on_token_fetch = metrics.upstream_token_fetch
    fetch_all(client, (mapping(), ["org/a"]), (mapping(), ["org/a"]), (mapping(), ["org/b"]))
    sample = metrics.registry.get_sample_value
    name = "registryproxy_upstream_token_fetches_total"
    assert sample(name, {"upstream": "registry.example.com", "outcome": "ok"}) == 1
    assert sample(name, {"upstream": "registry.example.com", "outcome": "failed"}) == 1
