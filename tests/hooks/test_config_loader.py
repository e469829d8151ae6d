"""steps/config_loader.py: options, loading, reload (file change, SIGHUP) and the 503 without a configuration."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hooks.conftest import BACKPLANE, config_text, new_metrics, request_flow, sample
from mitmproxy import exceptions, http, options
from mitmproxy.test import taddons
from regproxy.flow import answers
from regproxy.ops.metrics import Metrics
from regproxy.steps import config_loader as configuration
from regproxy.steps.config_loader import Configuration

CONFIG = config_text()
TWO_MAPPINGS = config_text(BACKPLANE, {"other/": {"registry": "http://127.0.0.1:5002"}})


@pytest.fixture
def config(metrics: Metrics) -> Configuration:
    return Configuration(metrics)


@pytest.fixture
def tctx(config: Configuration) -> Iterator[Any]:
    with taddons.context(config) as tctx:
        yield tctx


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def proxy_options() -> options.Options:
    """mitmproxy's options with those of the proxy server that `running` adjusts."""
    opts = options.Options()
    opts.add_option("connection_strategy", str, "eager", "", choices=("eager", "lazy"))
    opts.add_option("keep_host_header", bool, False, "")
    return opts


def loaded(tctx: Any, config: Configuration, path: Path) -> Configuration:
    tctx.configure(config, registryproxy_config=str(path))
    assert config.state is not None
    return config


def errors(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None
    return [e["code"] for e in json.loads(f.response.content or b"{}")["errors"]]


# --- options and loading ------------------------------------------------------------------


def test_options_are_registered_with_their_defaults(tctx: Any) -> None:
    assert tctx.options.registryproxy_config == ""
    assert tctx.options.registryproxy_watch_config is True


def test_a_valid_file_is_loaded(tctx: Any, config: Configuration, cfg: Path) -> None:
    loaded(tctx, config, cfg)
    assert config.state is not None
    assert config.state.path == str(cfg)
    assert [m.key for m in config.state.config.mappings] == ["bp/"]
    assert config.client is config.state.tokens.client


def test_loading_sets_the_configuration_gauges(tctx: Any, config: Configuration, cfg: Path, metrics: Metrics) -> None:
    cfg.write_text(TWO_MAPPINGS)
    loaded(tctx, config, cfg)
    assert sample(metrics, "registryproxy_mappings") == 2
    assert sample(metrics, "registryproxy_secret_keys") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxies: {}", "proxies"),
        (CONFIG + "bogus: 1\n", "bogus: unknown key"),
        ("proxies: [", "not valid YAML"),
    ],
)
def test_an_invalid_file_is_an_options_error(
    tctx: Any, config: Configuration, cfg: Path, text: str, message: str
) -> None:
    cfg.write_text(text)
    with pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(config, registryproxy_config=str(cfg))


def test_a_missing_file_is_an_options_error(tctx: Any, config: Configuration, tmp_path: Path) -> None:
    with pytest.raises(exceptions.OptionsError, match="cannot read"):
        tctx.configure(config, registryproxy_config=str(tmp_path / "missing.yaml"))


def test_an_invalid_new_file_keeps_the_loaded_one(tctx: Any, config: Configuration, cfg: Path, tmp_path: Path) -> None:
    loaded(tctx, config, cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxies: {}")
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(config, registryproxy_config=str(bad))
    # mitmproxy rolls the option back and configures again: the previous file is served.
    assert tctx.options.registryproxy_config == str(cfg)
    assert config.state is not None and config.state.path == str(cfg)


def test_other_options_do_not_reload(tctx: Any, config: Configuration, cfg: Path) -> None:
    state = loaded(tctx, config, cfg).state
    tctx.configure(config, registryproxy_watch_config=False)
    assert config.state is state


def test_the_environment_names_the_file_when_the_option_does_not(
    tctx: Any, config: Configuration, cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(configuration.CONFIG_ENV, str(cfg))
    config.configure({"registryproxy_config"})
    assert config.state is not None and config.state.path == str(cfg)


def test_ready_says_whether_a_configuration_is_loaded(tctx: Any, config: Configuration, cfg: Path) -> None:
    assert config.ready() == (False, "no valid configuration loaded")
    loaded(tctx, config, cfg)
    assert config.ready() == (True, "1 mappings loaded")


# --- the 503 guard ------------------------------------------------------------------------


def test_without_a_configuration_every_request_is_503(tctx: Any, config: Configuration) -> None:
    f = request_flow("/v2/bp/true/manifests/v1")
    config.requestheaders(f)
    assert f.response is not None and f.response.status_code == 503
    assert errors(f) == ["UNAVAILABLE"]


def test_with_a_configuration_requests_go_on(tctx: Any, config: Configuration, cfg: Path) -> None:
    loaded(tctx, config, cfg)
    f = request_flow("/v2/bp/true/manifests/v1")
    config.requestheaders(f)
    assert f.response is None


def test_a_flow_already_answered_keeps_its_answer(tctx: Any, config: Configuration) -> None:
    f = request_flow("/healthz")
    f.response = http.Response.make(200, b"alive")
    config.requestheaders(f)
    assert f.response.status_code == 200


def test_a_failing_503_still_fails_closed(tctx: Any, config: Configuration, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(answers, "answer_error", boom)
    f = request_flow("/v2/bp/true/manifests/v1")
    config.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500


# --- reload -------------------------------------------------------------------------------


def test_reload_installs_a_changed_file_and_counts_it(
    tctx: Any, config: Configuration, cfg: Path, metrics: Metrics
) -> None:
    loaded(tctx, config, cfg)
    cfg.write_text(TWO_MAPPINGS)
    assert config.reload("test") is True
    assert config.state is not None and len(config.state.config.mappings) == 2
    assert sample(metrics, "registryproxy_config_reloads_total", outcome="ok") == 1
    assert sample(metrics, "registryproxy_mappings") == 2


def test_reload_of_an_invalid_file_keeps_the_old_state_and_counts_it(
    tctx: Any, config: Configuration, cfg: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    state = loaded(tctx, config, cfg).state
    cfg.write_text("proxies: {}")
    assert config.reload("test") is False
    assert config.state is state
    assert sample(metrics, "registryproxy_config_reloads_total", outcome="failed") == 1
    assert sample(metrics, "registryproxy_config_reloads_total", outcome="ok") == 0
    assert "reload (test) refused, still serving the previous configuration" in caplog.text


def test_reload_keeps_the_upstream_client_when_its_timeout_is_unchanged(
    tctx: Any, config: Configuration, cfg: Path
) -> None:
    client = loaded(tctx, config, cfg).client
    cfg.write_text(TWO_MAPPINGS)
    config.reload("test")
    assert config.client is client


def test_reload_replaces_the_upstream_client_for_a_new_timeout(tctx: Any, config: Configuration, cfg: Path) -> None:
    client = loaded(tctx, config, cfg).client
    cfg.write_text(CONFIG + "upstream_timeout: 5\n")
    config.reload("test")
    assert config.client is not client and config.client is not None and config.client.timeout == 5.0


def test_a_failing_sighup_reload_is_logged_not_raised(
    tctx: Any, config: Configuration, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(why: str) -> bool:
        raise RuntimeError("broken")

    monkeypatch.setattr(config, "reload", boom)
    config._on_sighup()
    assert "reload on SIGHUP failed (RuntimeError)" in caplog.text


# --- running ------------------------------------------------------------------------------


def test_running_asks_for_lazy_connections_and_the_clients_host(cfg: Path) -> None:
    async def go() -> None:
        config = Configuration(new_metrics())
        with taddons.context(config, options=proxy_options()) as tctx:
            loaded(tctx, config, cfg)
            config.running()
            try:
                assert tctx.options.connection_strategy == "lazy"
                assert tctx.options.keep_host_header is True
            finally:
                await config.done()

    asyncio.run(go())


def test_running_without_a_valid_configuration_logs_and_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """mitmproxy's error check ends the start-up on the logged error; an exception escaping `running`
    would instead escape mitmproxy's `Master.run` (its safecall re-raises OptionsError)."""
    monkeypatch.setattr(configuration, "DEFAULT_CONFIG", tmp_path / "missing.yaml")
    monkeypatch.delenv(configuration.CONFIG_ENV, raising=False)

    async def go() -> None:
        config = Configuration(new_metrics())
        with taddons.context(config, options=proxy_options()):
            try:
                config.running()
            finally:
                await config.done()
            assert config.state is None

    asyncio.run(go())
    assert "registryproxy: config file" in caplog.text and "cannot read" in caplog.text


def test_sighup_reloads(cfg: Path, metrics: Metrics) -> None:
    async def go() -> None:
        config = Configuration(metrics)
        with taddons.context(config, options=proxy_options()) as tctx:
            loaded(tctx, config, cfg)
            config.running()
            try:
                assert config._sighup  # the handler is installed: the signal cannot end the test run
                cfg.write_text(TWO_MAPPINGS)
                os.kill(os.getpid(), signal.SIGHUP)
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if config.state is not None and len(config.state.config.mappings) == 2:
                        break
                assert config.state is not None and len(config.state.config.mappings) == 2
            finally:
                await config.done()

    asyncio.run(go())
    assert sample(metrics, "registryproxy_config_reloads_total", outcome="ok") == 1


def test_a_changed_file_is_reloaded(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configuration, "CONFIG_POLL_SECONDS", 0.01)

    async def go() -> None:
        config = Configuration(new_metrics())
        with taddons.context(config, options=proxy_options()) as tctx:
            loaded(tctx, config, cfg)
            config.running()
            try:
                cfg.write_text(TWO_MAPPINGS)
                for _ in range(200):
                    await asyncio.sleep(0.01)
                    if config.state is not None and len(config.state.config.mappings) == 2:
                        break
                assert config.state is not None and len(config.state.config.mappings) == 2
            finally:
                await config.done()

    asyncio.run(go())


def test_a_changed_file_is_left_alone_when_watching_is_off(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configuration, "CONFIG_POLL_SECONDS", 0.01)

    async def go() -> None:
        config = Configuration(new_metrics())
        with taddons.context(config, options=proxy_options()) as tctx:
            state = loaded(tctx, config, cfg).state
            tctx.configure(config, registryproxy_watch_config=False)
            config.running()
            try:
                cfg.write_text(TWO_MAPPINGS)
                await asyncio.sleep(0.1)
                assert config.state is state
            finally:
                await config.done()

    asyncio.run(go())


def test_done_stops_the_watch(cfg: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        config = Configuration(new_metrics())
        with taddons.context(config, options=proxy_options()) as tctx:
            loaded(tctx, config, cfg)
            config.running()
            await config.done()
            await asyncio.sleep(0)
            assert config._watch is not None and config._watch.cancelled()

    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
    assert "config watch failed" not in caplog.text
