"""steps/limits.py: `Limits` admits or refuses routed requests (429 with Retry-After), in memory."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence

import pytest
from hooks.conftest import BACKPLANE, MakeConfig, config_text, new_metrics, nginx, request_flow, sample, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.flow import background
from regproxy.flow.state import FlowState
from regproxy.limits.keeper import StoreKeeper
from regproxy.limits.settings import FailMode
from regproxy.limits.store import Charge, Check, MemoryStore, StoreError, Verdict
from regproxy.ops.metrics import Metrics
from regproxy.steps.config_loader import Configuration
from regproxy.steps.limits import MARK_LIMITED, Limits
from regproxy.steps.routing import Router
from regproxy.tokens.paseto import Grant
from rig.keys import CAP

LIMITED_NGINX = nginx(
    "http://127.0.0.1:5002",
    limits={"client_requests": "unlimited", "manifest_gets": "1/1h", "count_heads": True},
)
LIMITS = {"client_requests": "3/1h", "manifest_gets": "2/1h", "client_transfers": 1, "client_bytes": "100/1h"}
CONFIG = config_text(BACKPLANE, LIMITED_NGINX, trusted_proxies=["127.0.0.1"], limits=LIMITS)
BASE = "http://reg.test"
DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def limits(config: Configuration, metrics: Metrics) -> Iterator[Limits]:
    addon = Limits(config, metrics)
    with taddons.context(addon):
        yield addon


def auth(config: Configuration, key: str, name: str) -> tuple[str, str]:
    state = config.state
    assert state is not None
    mapping = next(m for m in state.config.mappings if m.key == key)
    return ("Authorization", f"Bearer {state.codec.issue_access(BASE, (Grant(mapping.identity, (name,), 'UP'),), 60)}")


def send(
    config: Configuration,
    limits: Limits,
    path: str,
    method: str = "GET",
    key: str = "bp/",
    name: str = "bp/app",
    headers: list[tuple[str, str]] | None = None,
    peer: str = "192.0.2.1",
) -> tuple[http.HTTPFlow, FlowState]:
    f = request_flow(path, method, [auth(config, key, name), *(headers or [])])
    f.client_conn.peername = (peer, 40000)
    st = with_state(f)
    limits.requestheaders(f)  # before Router, as in the chain
    Router(config).requestheaders(f)
    assert f.response is None and st.kind == "upstream"
    asyncio.run(limits.request(f))
    return f, st


def refused(f: http.HTTPFlow) -> tuple[int, str, str]:
    assert f.response is not None
    body = json.loads(f.response.content or b"{}")["errors"][0]
    return f.response.status_code, body["code"], f.response.headers.get("retry-after", "")


def test_manifest_gets_per_mapping_then_429_with_retry_after(
    config: Configuration, limits: Limits, metrics: Metrics
) -> None:
    # HEADs do not count by default; the client bucket (3 an hour) does count them.
    f, _ = send(config, limits, "/v2/bp/app/manifests/v1", "HEAD", peer="192.0.2.10")
    assert f.response is None
    for peer in ("192.0.2.1", "192.0.2.2"):
        f, _ = send(config, limits, "/v2/bp/app/manifests/v1", peer=peer)
        assert f.response is None
    f, st = send(config, limits, "/v2/bp/app/manifests/v1", peer="192.0.2.3")
    status, code, retry = refused(f)
    assert (status, code) == (429, "TOOMANYREQUESTS") and 1 <= int(retry) <= 3600
    message = json.loads(f.response.content or b"")["errors"][0]["message"]  # type: ignore[union-attr]
    assert "manifest_gets" in message and "192.0.2" not in message and "2 per 1h" in message
    assert st.kind == "local" and st.upstream_auth is None and "limited: manifest_gets" in st.token
    assert f.marked == MARK_LIMITED
    assert sample(metrics, "registryproxy_limit_refusals_total", limit="manifest_gets", mapping="bp/") == 1
    assert sample(metrics, "registryproxy_limit_usage", limit="manifest_gets", mapping="bp/") == 2
    # Blobs and tags are not manifest requests.
    f, _ = send(config, limits, f"/v2/bp/app/blobs/{DIGEST}", peer="192.0.2.4")
    assert f.response is None


def test_client_requests_bucket_per_client(config: Configuration, limits: Limits) -> None:
    for _ in range(3):
        f, _ = send(config, limits, "/v2/bp/app/tags/list")
        assert f.response is None
    f, _ = send(config, limits, "/v2/bp/app/tags/list")
    assert refused(f)[:2] == (429, "TOOMANYREQUESTS") and int(refused(f)[2]) >= 1
    # Another client has its own bucket.
    f, _ = send(config, limits, "/v2/bp/app/tags/list", peer="192.0.2.99")
    assert f.response is None


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(config: Configuration, limits: Limits) -> None:
    for i in range(3):
        f, _ = send(config, limits, "/v2/bp/app/tags/list", headers=[("X-Forwarded-For", f"198.51.100.{i}")])
        assert f.response is None
    f, _ = send(config, limits, "/v2/bp/app/tags/list", headers=[("X-Forwarded-For", "198.51.100.77")])
    assert refused(f)[0] == 429
    # From the trusted front end (127.0.0.1), the forwarded address is the client.
    for _ in range(3):
        f, _ = send(
            config, limits, "/v2/bp/app/tags/list", headers=[("X-Forwarded-For", "203.0.113.5")], peer="127.0.0.1"
        )
        assert f.response is None
    f, _ = send(config, limits, "/v2/bp/app/tags/list", headers=[("X-Forwarded-For", "203.0.113.6")], peer="127.0.0.1")
    assert f.response is None


def test_a_mapping_overrides_the_defaults(config: Configuration, limits: Limits) -> None:
    path = f"/v2/{CAP}/nginx/manifests/v1"
    name = f"{CAP}/nginx"
    f, _ = send(config, limits, path, "HEAD", key=f"{CAP}/nginx", name=name)
    assert f.response is None
    f, _ = send(config, limits, path, "HEAD", key=f"{CAP}/nginx", name=name)
    # A HEAD answer carries no body: the status and Retry-After say it.
    assert f.response is not None and f.response.status_code == 429 and f.response.content == b""
    assert int(f.response.headers["retry-after"]) >= 1
    f, _ = send(config, limits, path, key=f"{CAP}/nginx", name=name)
    assert refused(f)[:2] == (429, "TOOMANYREQUESTS")
    message = (f.response.content or b"").decode()  # type: ignore[union-attr]
    assert CAP not in message and "1 per 1h" in message
    # client_requests is lifted for this mapping: many tag lists pass.
    for _ in range(5):
        f, _ = send(config, limits, f"/v2/{CAP}/nginx/tags/list", key=f"{CAP}/nginx", name=name)
        assert f.response is None


def test_blob_transfers_hold_a_slot_and_charge_bytes(config: Configuration, limits: Limits) -> None:
    async def go() -> None:
        blob = f"/v2/bp/app/blobs/{DIGEST}"

        def flow() -> tuple[http.HTTPFlow, FlowState]:
            f = request_flow(blob, "GET", [auth(config, "bp/", "bp/app")])
            f.client_conn.peername = ("192.0.2.50", 1)
            st = with_state(f)
            Router(config).requestheaders(f)
            return f, st

        first, _ = flow()
        await limits.request(first)
        assert first.response is None
        second, _ = flow()
        await limits.request(second)
        assert refused(second)[:2] == (429, "TOOMANYREQUESTS")  # one transfer at once
        first.response = http.Response.make(200, b"x" * 150, {"Content-Length": "150"})
        limits.responseheaders(first)
        limits.response(first)
        await asyncio.sleep(0.01)  # charges and releases run beside the flow
        third, _ = flow()
        await limits.request(third)
        status, _, _ = refused(third)  # the slot is free, but 150 of 100 bytes are spent
        assert status == 429 and "client_bytes" in (third.response.content or b"").decode()  # type: ignore[union-attr]

    asyncio.run(go())


def test_without_limits_nothing_is_checked(make_config: MakeConfig) -> None:
    config = make_config(
        CONFIG.split("trusted_proxies")[0] + 'proxies:\n  "bp/":\n    registry: http://127.0.0.1:5001\n'
    )
    addon = Limits(config, new_metrics())
    for _ in range(10):
        f, _ = send(config, addon, "/v2/bp/app/manifests/v1")
        assert f.response is None
    assert addon.keeper.current is None


# --- the store's life (StoreKeeper) -------------------------------------------------------


class Flaky:
    """A memory store that fails while `down` (as a Redis out of reach does)."""

    def __init__(self) -> None:
        self.down = True
        self.memory = MemoryStore()

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        if self.down:
            raise StoreError("redis admit: ConnectionError")
        return await self.memory.admit(checks)

    async def charge(self, charges: Sequence[Charge]) -> list[int]:
        return await self.memory.charge(charges)

    async def release(self, key: str, lease: str) -> None:
        await self.memory.release(key, lease)

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        await self.memory.renew(leases)

    async def aclose(self) -> None:
        pass


def with_flaky_store(limits: Limits, metrics: Metrics) -> Flaky:
    """The limits' store from now on: one that fails until told otherwise."""
    store = Flaky()

    def mode() -> FailMode:
        assert limits.config.state is not None
        return limits.config.state.config.limits.on_store_failure

    limits.keeper = StoreKeeper(metrics, mode, background.spawn, lambda url: store)
    return store


def test_the_store_is_opened_by_the_first_limited_request_and_kept(config: Configuration, limits: Limits) -> None:
    assert limits.keeper.current is None
    send(config, limits, "/v2/bp/app/tags/list")
    store = limits.keeper.current
    assert isinstance(store, MemoryStore)
    send(config, limits, "/v2/bp/app/tags/list")
    assert limits.keeper.current is store


@pytest.fixture
def closed(make_config: MakeConfig, metrics: Metrics) -> Iterator[tuple[Configuration, Limits]]:
    """The configuration with `on_store_failure: closed`, and its `Limits`."""
    closed_limits = {"on_store_failure": "closed", **LIMITS}
    config = make_config(
        config_text(BACKPLANE, LIMITED_NGINX, trusted_proxies=["127.0.0.1"], limits=closed_limits), metrics
    )
    addon = Limits(config, metrics)
    with taddons.context(addon):
        yield config, addon


def test_a_failing_store_closed_answers_503_and_counts(
    closed: tuple[Configuration, Limits], metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    config, limits = closed
    store = with_flaky_store(limits, metrics)
    with caplog.at_level(logging.INFO, "registryproxy"):
        f, st = send(config, limits, "/v2/bp/app/manifests/v1")
        again, _ = send(config, limits, "/v2/bp/app/manifests/v1")
        store.down = False
        back, _ = send(config, limits, "/v2/bp/app/manifests/v1")
    assert refused(f) == (503, "UNAVAILABLE", "5") and refused(again)[0] == 503 and back.response is None
    assert st.kind == "local" and st.upstream_auth is None and st.token == "ok; limited: store_unavailable"
    assert f.marked == MARK_LIMITED
    assert sample(metrics, "registryproxy_limit_store_failures_total") == 2
    assert sample(metrics, "registryproxy_limit_refusals_total", limit="store_unavailable", mapping="bp/") == 2
    assert caplog.text.count("limits store failed (redis admit: ConnectionError); answering 503") == 1
    assert caplog.text.count("limits store answers again; limits apply") == 1


def test_a_failing_store_open_serves_without_limits(config: Configuration, limits: Limits, metrics: Metrics) -> None:
    with_flaky_store(limits, metrics)  # on_store_failure: open, the default
    for _ in range(5):  # more than client_requests allows
        f, st = send(config, limits, "/v2/bp/app/tags/list")
        assert f.response is None and st.kind == "upstream" and st.token == "ok"
    assert sample(metrics, "registryproxy_limit_store_failures_total") == 5
