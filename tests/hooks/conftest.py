"""The addon chain in-process, through mitmproxy's own test helpers (no network).

`Chain` dispatches a hook to every addon in chain order, as mitmproxy's master does, followed
by the `update` in which `veil.Courier` puts back what is about to be sent.

The configuration the hook tests load: `CONFIG` (secret key `KEY`, one mapping `bp/` -> backplane on
127.0.0.1:5001), or `config_text(...)` for one that differs, saying how: other mappings (`BACKPLANE`,
`nginx(...)` for the capability mapping `CAP/nginx`, or a test file's own), other settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import yaml
from mitmproxy import hooks, http
from mitmproxy.proxy.layers.http import _hooks as http_layers
from mitmproxy.test import taddons, tflow
from prometheus_client import CollectorRegistry
from regproxy import chain
from regproxy.flow import state as flowstate
from regproxy.flow.state import FlowState, FlowStates
from regproxy.ops.metrics import Metrics
from regproxy.steps.config_loader import Configuration, State
from regproxy.steps.veil import Courier, FlowSecrets, Veil
from rig.keys import CAP

T = TypeVar("T")

# --- the configuration ----------------------------------------------------------------------------

KEY = "ab" * 32  # the secret key of the hook tests' configuration
BACKPLANE: dict[str, dict[str, Any]] = {"bp/": {"registry": "http://127.0.0.1:5001", "remote": "backplane"}}
ROBOT = {"username": "robot", "password": "s3cret-password"}  # a mapping's upstream credentials


def nginx(registry: str = "http://127.0.0.1:5003", **settings: Any) -> dict[str, dict[str, Any]]:
    """The capability mapping `CAP/nginx` -> private/nginx on `registry`, with `settings` (e.g. **ROBOT)."""
    return {f"{CAP}/nginx": {"registry": registry, "remote": "private/nginx", **settings}}


def config_text(*mappings: Mapping[str, Mapping[str, Any]], **settings: Any) -> str:
    """A configuration file's text: `secretkey: KEY`, then `settings` (a `secretkey` among them replaces
    it), then `proxies:`, the `mappings` merged in order (BACKPLANE alone when none is given)."""
    proxies: dict[str, Any] = {}
    for m in mappings or (BACKPLANE,):
        proxies.update({k: dict(v) for k, v in m.items()})
    return yaml.safe_dump({"secretkey": KEY, **settings, "proxies": proxies}, sort_keys=False)


CONFIG = config_text()  # the common one

HOOKS: dict[str, type[hooks.Hook]] = {
    "requestheaders": http_layers.HttpRequestHeadersHook,
    "request": http_layers.HttpRequestHook,
    "responseheaders": http_layers.HttpResponseHeadersHook,
    "response": http_layers.HttpResponseHook,
    "error": http_layers.HttpErrorHook,
}


@dataclass
class Chain:
    addons: list[object]
    tctx: taddons.context

    def find(self, cls: type[T]) -> T:
        return next(a for a in self.addons if isinstance(a, cls))

    @property
    def config(self) -> Configuration:
        return self.find(Configuration)

    @property
    def state(self) -> State:
        state = self.config.state
        assert state is not None
        return state

    async def hook(self, name: str, f: http.HTTPFlow, *, update: bool = True) -> None:
        """One flow hook on every addon in order, then (as mitmproxy does) the update."""
        event: Any = HOOKS[name](f)
        await self.tctx.master.addons.trigger_event(event)
        if update:
            await self.update(f)

    async def update(self, f: http.HTTPFlow) -> None:
        await self.tctx.master.addons.trigger_event(hooks.UpdateHook([f]))

    def run(self, name: str, f: http.HTTPFlow, *, update: bool = True) -> None:
        asyncio.run(self.hook(name, f, update=update))


@pytest.fixture
def make_chain(tmp_path: Path) -> Iterator[Any]:
    """`make_chain(config_text)`: the chain loaded with that configuration."""
    contexts: list[taddons.context] = []

    def make(config_text: str) -> Chain:
        cfg = tmp_path / f"config{len(contexts)}.yaml"
        cfg.write_text(config_text)
        proxy = chain.proxy()  # the chain as mitmproxy runs it: one addon dispatching to its steps
        addons = proxy.steps
        ctx = taddons.context(proxy)
        tctx = ctx.__enter__()
        contexts.append(ctx)
        secrets = next(a for a in addons if isinstance(a, Veil)).secrets
        assert isinstance(secrets, FlowSecrets)
        tctx.master.addons.add(Courier(secrets))  # what `Veil.running` does in a real master
        tctx.options.update(registryproxy_config=str(cfg))
        return Chain(addons, tctx)

    yield make
    for ctx in reversed(contexts):
        ctx.__exit__(None, None, None)


def request_flow(
    path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None, host: str = "reg.test"
) -> http.HTTPFlow:
    """A client's plain-HTTP request as mitmproxy's reverse mode hands it to the chain."""
    fields = [(b"Host", host.encode())] + [(k.encode(), v.encode()) for k, v in headers or []]
    req = http.Request(
        "127.0.0.1", 9, method.encode(), b"http", b"", path.encode(), b"HTTP/1.1", http.Headers(fields), b"", None, 0, 0
    )
    f = tflow.tflow(req=req)
    f.client_conn.timestamp_tls_setup = None  # a plain-HTTP client
    return f


# --- for the tests of one addon alone -------------------------------------------------


class MakeConfig(Protocol):
    def __call__(self, config_text: str, metrics: Metrics | None = None) -> Configuration: ...


@pytest.fixture
def metrics() -> Metrics:
    """Fresh metrics, shared by the test's configuration and the step under test."""
    return new_metrics()


@pytest.fixture
def config(request: pytest.FixtureRequest, make_config: MakeConfig, metrics: Metrics) -> Configuration:
    """The configuration of the test's module (its `CONFIG`, else the common one), loaded with `metrics`."""
    return make_config(getattr(request.module, "CONFIG", CONFIG), metrics)


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """`make_config(config_text, metrics)`: a `Configuration` loaded from that text in a context of
    its own, to hand to the addon under test."""

    def make(config_text: str, metrics: Metrics | None = None) -> Configuration:
        cfg = tmp_path / f"alone{len(list(tmp_path.glob('alone*.yaml')))}.yaml"
        cfg.write_text(config_text)
        config = Configuration(metrics or new_metrics())
        with taddons.context(config) as tctx:
            tctx.options.update(registryproxy_config=str(cfg))
        assert config.state is not None
        return config

    return make


def new_metrics() -> Metrics:
    """Metrics of their own (no process collector, nothing shared with another test)."""
    return Metrics(CollectorRegistry(auto_describe=True))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's current value; 0 for one never counted."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def with_state(f: http.HTTPFlow) -> FlowState:
    """The flow's state, as `FlowStates` (first in the chain) gives it."""
    FlowStates().requestheaders(f)
    st = flowstate.of(f)
    assert st is not None
    return st
