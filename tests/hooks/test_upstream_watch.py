"""steps/upstream_watch.py: the upstream's time to answer, bodies that stop flowing, bytes and latency."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from hooks.conftest import MakeConfig, config_text, request_flow, sample, with_state
from mitmproxy import http
from mitmproxy.test import taddons
from regproxy.flow.state import FlowState
from regproxy.ops.metrics import Metrics
from regproxy.protocol.names import parse_route
from regproxy.steps import upstream_watch
from regproxy.steps.config_loader import Configuration
from regproxy.steps.upstream_watch import UpstreamWatch

CONFIG = config_text()
TIMEOUT = 0.05  # the configuration allows 1 s at least; the watch reads whatever the state says
DIGEST = "sha256:" + "d" * 64


def set_timeout(config: Configuration, seconds: float) -> None:
    assert config.state is not None
    fast = dataclasses.replace(config.state.config, upstream_timeout=seconds)
    config.state = dataclasses.replace(config.state, config=fast)


@pytest.fixture
def config(make_config: MakeConfig, metrics: Metrics) -> Configuration:
    config = make_config(CONFIG, metrics)
    set_timeout(config, TIMEOUT)
    return config


@pytest.fixture
def watch(config: Configuration, metrics: Metrics) -> Iterator[UpstreamWatch]:
    addon = UpstreamWatch(config, metrics)
    with taddons.context(addon):
        yield addon
    addon.done()


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[http.HTTPFlow]:
    """The flows whose upstream connection the watch closed."""
    flows: list[http.HTTPFlow] = []
    monkeypatch.setattr(upstream_watch, "close_upstream", flows.append)
    return flows


def upstream_flow(config: Configuration) -> tuple[http.HTTPFlow, FlowState]:
    """A flow as routing leaves it: sent upstream."""
    assert config.state is not None
    f = request_flow(f"/v2/bp/true/blobs/{DIGEST}")
    st = with_state(f)
    st.kind, st.route = "upstream", parse_route(f"/v2/bp/true/blobs/{DIGEST}")
    st.match = config.state.matcher.match("bp/true", None)
    st.log_path = f"bp/true/blobs/{DIGEST}"
    return f, st


def headers_in(watch: UpstreamWatch, f: http.HTTPFlow, stream: object = True) -> http.Response:
    f.response = http.Response.make(200)
    f.response.stream = stream  # type: ignore[assignment]  # as ResponseRewrite leaves it
    watch.responseheaders(f)
    return f.response


async def wait_for(cond: list[http.HTTPFlow], seconds: float) -> None:
    for _ in range(int(seconds / 0.01)):
        if cond:
            return
        await asyncio.sleep(0.01)


# --- the answer's headers -----------------------------------------------------------------


def test_no_answer_within_the_timeout_closes_the_upstream(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        await wait_for(closed, 1.0)
        assert closed == [f] and st.timed_out

    asyncio.run(go())


def test_an_answer_in_time_stops_the_watch_and_is_timed(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow], metrics: Metrics
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f, stream=False)
        watch.response(f)  # a buffered body: the watch ends with it
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == [] and not st.timed_out

    asyncio.run(go())
    assert sample(metrics, "registryproxy_upstream_latency_seconds_count", mapping="bp/") == 1


def test_an_upstream_failure_stops_the_watch(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, _ = upstream_flow(config)
        watch.request(f)
        watch.error(f)
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == []

    asyncio.run(go())


def test_a_flow_ended_meanwhile_is_not_closed_again(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        f.live = False
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == [] and not st.timed_out

    asyncio.run(go())


@pytest.mark.parametrize("case", ["no state", "local", "answered"])
def test_flows_not_sent_upstream_are_not_watched(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow], case: str
) -> None:
    async def go() -> None:
        if case == "no state":
            f = request_flow(f"/v2/bp/true/blobs/{DIGEST}")
        else:
            f, st = upstream_flow(config)
            if case == "local":
                st.kind = "local"
            else:
                f.response = http.Response.make(401)
        watch.request(f)
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == []
        f.response = http.Response.make(200)
        f.response.stream = True
        watch.responseheaders(f)
        assert f.response.stream is True

    asyncio.run(go())


# --- streaming bodies ---------------------------------------------------------------------


def test_a_streamed_body_is_counted(watch: UpstreamWatch, config: Configuration) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        resp = headers_in(watch, f)
        assert callable(resp.stream)
        assert resp.stream(b"12345") == b"12345" and resp.stream(b"678") == b"678"
        assert st.bytes_streamed == 8
        watch.response(f)

    asyncio.run(go())


@pytest.mark.parametrize("stream", [False, "callable"])
def test_only_a_plain_stream_is_wrapped(watch: UpstreamWatch, config: Configuration, stream: object) -> None:
    def replace(data: bytes) -> bytes:
        return b""

    given = replace if stream == "callable" else stream

    async def go() -> None:
        f, _ = upstream_flow(config)
        watch.request(f)
        assert headers_in(watch, f, stream=given).stream is given

    asyncio.run(go())


def test_a_stalled_body_closes_the_upstream(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        resp = headers_in(watch, f)
        assert callable(resp.stream)
        resp.stream(b"first bytes")
        await wait_for(closed, 2.0)
        assert closed == [f] and st.timed_out and st.bytes_streamed == 11

    asyncio.run(go())


def test_a_flowing_body_is_left_to_flow(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    set_timeout(config, 0.15)  # room for a busy machine: data comes every 10 ms

    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        resp = headers_in(watch, f)
        assert callable(resp.stream)
        for _ in range(30):  # 0.3 s, longer than one check
            resp.stream(b"x")
            await asyncio.sleep(0.01)
        assert closed == [] and not st.timed_out
        watch.response(f)

    asyncio.run(go())


def test_a_finished_body_is_no_longer_watched(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f)
        watch.response(f)
        await asyncio.sleep(0.3)
        assert closed == [] and not st.timed_out

    asyncio.run(go())


def test_done_stops_the_stream_check(watch: UpstreamWatch, config: Configuration) -> None:
    async def go() -> None:
        f, _ = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f)
        check = watch._idle_check
        assert check is not None
        watch.done()
        await asyncio.sleep(0)
        assert check.cancelled()

    asyncio.run(go())


# --- buffered bodies (kept for mitmweb, tags lists) ---------------------------------------------


def test_a_buffered_body_that_never_completes_closes_the_upstream(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f, stream=False)  # e.g. a manifest kept by KeepBodies: no chunk is seen here
        await wait_for(closed, 1.0)
        assert closed == [f] and st.timed_out

    asyncio.run(go())


def test_a_buffered_body_in_time_is_left_alone_and_counted(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        resp = headers_in(watch, f, stream=False)
        resp.data.content = b"m" * 1234  # read whole by mitmproxy
        watch.response(f)
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == [] and not st.timed_out and st.bytes_streamed == 1234

    asyncio.run(go())


def test_a_buffered_body_that_failed_is_not_closed_again(
    watch: UpstreamWatch, config: Configuration, closed: list[http.HTTPFlow]
) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f, stream=False)
        watch.error(f)
        await asyncio.sleep(TIMEOUT * 4)
        assert closed == [] and not st.timed_out and st.bytes_streamed == 0

    asyncio.run(go())


def test_a_streamed_body_is_not_counted_twice_at_its_end(watch: UpstreamWatch, config: Configuration) -> None:
    async def go() -> None:
        f, st = upstream_flow(config)
        watch.request(f)
        resp = headers_in(watch, f)
        assert callable(resp.stream)
        resp.stream(b"12345")
        resp.data.content = b"12345"  # (with store_streamed_bodies)
        watch.response(f)
        assert st.bytes_streamed == 5

    asyncio.run(go())


# --- failing closed -----------------------------------------------------------------------


def test_a_failure_at_the_answer_kills_the_flow(
    watch: UpstreamWatch, config: Configuration, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(mapping: str, seconds: float) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(metrics, "upstream_latency", boom)

    async def go() -> None:
        f, _ = upstream_flow(config)
        watch.request(f)
        headers_in(watch, f)
        assert f.error is not None and not f.live

    asyncio.run(go())


def test_a_failure_before_sending_refuses_the_request(
    watch: UpstreamWatch, config: Configuration, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> asyncio.AbstractEventLoop:
        raise RuntimeError("no loop")

    monkeypatch.setattr(asyncio, "get_running_loop", boom)
    f, _ = upstream_flow(config)
    watch.request(f)
    assert f.response is not None and f.response.status_code == 500
