"""./run.sh's commands (run/cli.py): key and capability generation, and the mitmproxy arguments a proxy is
started with (run/launch.py)."""

from __future__ import annotations

import re

import pytest
from regproxy.config import loads
from regproxy.protocol.names import is_valid_name, looks_like_capability
from regproxy.run import cli, launch


def test_keygen_prints_a_key_the_config_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen"]) == 0
    key = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    config = loads(f"secretkey: '{key}'\nproxies:\n  'a/':\n    registry: example.com\n", environ={})
    assert config.secretkeys == (bytes.fromhex(key),)


def test_capability_is_128_random_bits_and_a_working_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["capability"]) == 0
    out = capsys.readouterr().out
    cap = out.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", cap)
    assert looks_like_capability(cap) and is_valid_name(f"{cap}/app")
    yaml_part = out[out.index("proxies:") :]
    config = loads(yaml_part, environ={"REGISTRYPROXY_GHCR_TOKEN": "x"})
    assert config.mappings[0].capability and config.mappings[0].key == f"{cap}/app"


def test_capabilities_differ() -> None:
    assert len({launch.new_capability() for _ in range(100)}) == 100


def test_mitm_args_listen_where_the_config_says() -> None:
    args = launch.mitm_args("/c.yaml", "0.0.0.0", 5000)
    assert args[args.index("--mode") + 1] == "reverse:http://127.0.0.1:9@0.0.0.0:5000"
    assert "connection_strategy=lazy" in args and "registryproxy_config=/c.yaml" in args
    v6 = launch.mitm_args("/c.yaml", "::", 5000)
    assert v6[v6.index("--mode") + 1] == "reverse:http://127.0.0.1:9@[::]:5000"
