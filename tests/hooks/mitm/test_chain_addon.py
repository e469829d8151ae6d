"""The chain as one addon: each hook runs the steps that implement it, in order, each guarded."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow
from regproxy.mitm.chain_addon import ChainAddon


class Recorder:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name_ = name
        self.seen = seen

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.seen.append(f"{self.name_}.requestheaders")


class AsyncRequest(Recorder):
    async def request(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(0)
        self.seen.append(f"{self.name_}.request")


class Broken(Recorder):
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("boom")


class Refusing:
    def configure(self, updated: set[str]) -> None:
        raise exceptions.OptionsError("bad option")


def test_only_the_hooks_some_step_implements_exist() -> None:
    chain = ChainAddon([Recorder("a", [])])
    assert callable(getattr(chain, "requestheaders", None))
    assert getattr(chain, "response", None) is None  # mitmproxy skips it: no per-event cost
    assert getattr(chain, "update", None) is None


def test_steps_run_in_chain_order() -> None:
    seen: list[str] = []
    chain = ChainAddon([Recorder("a", seen), Recorder("b", seen), AsyncRequest("c", seen), Recorder("d", seen)])
    f = tflow.tflow()
    chain.requestheaders(f)  # type: ignore[attr-defined]
    assert seen == ["a.requestheaders", "b.requestheaders", "c.requestheaders", "d.requestheaders"]


def test_a_hook_with_an_async_step_is_awaited() -> None:
    seen: list[str] = []
    chain = ChainAddon([AsyncRequest("a", seen)])
    asyncio.run(chain.request(tflow.tflow()))  # type: ignore[attr-defined]
    assert seen == ["a.request"]


def test_a_failing_step_is_logged_and_the_next_runs(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    chain = ChainAddon([Broken("a", seen), Recorder("b", seen)])
    with caplog.at_level(logging.ERROR):
        chain.requestheaders(tflow.tflow())  # type: ignore[attr-defined]
    assert seen == ["b.requestheaders"]
    assert "Broken.requestheaders failed (RuntimeError)" in caplog.text
    assert "boom" not in caplog.text  # the message may hold flow data: details only at debug level


def test_an_options_error_still_reaches_mitmproxy() -> None:
    chain = ChainAddon([Refusing()])
    with pytest.raises(exceptions.OptionsError):
        chain.configure(set())


def test_a_script_logs_an_options_error_before_running_and_raises_after(caplog: pytest.LogCaptureFixture) -> None:
    chain = ChainAddon([Refusing(), Recorder("a", [])], log_startup_option_errors=True)
    with caplog.at_level(logging.ERROR):
        chain.configure(set())
    assert caplog.messages == ["registryproxy: bad option"]
    chain.running()  # type: ignore[attr-defined]
    with pytest.raises(exceptions.OptionsError):
        chain.configure(set())


def test_mitmproxy_runs_the_chain_as_one_addon() -> None:
    seen: list[str] = []
    chain = ChainAddon([Recorder("a", seen), Recorder("b", seen)])
    with taddons.context(chain) as tctx:
        asyncio.run(tctx.cycle(chain, tflow.tflow()))
    assert seen == ["a.requestheaders", "b.requestheaders"]
