"""Fixtures shared by test_artifacts.py and test_artifacts_oci.py: an upstream of each transport and a proxy over it.

`side` is one of SIDES: the upstream ("http": an anonymous docker-registry over plain HTTP; "https": a
token-auth registry over HTTPS from a test CA, its token service on a server of its own, rig/https_upstream.py)
and whether the proxy has a `cache:` section. The proxy maps `a/` onto the upstream's `platform/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rig import artifacts, https_upstream, proxy, registry, tls

KEY_HEX = "a7" * 16 + "3c" * 16
SIDES = ("http", "https", "http-cache", "https-cache")


@dataclass(frozen=True)
class Side:
    name: str
    up: registry.Upstream
    rp: proxy.ProxyProc
    cached: bool

    def upstream_oras(self, repo: str) -> artifacts.Oras:
        """oras-py on the upstream itself (how the artifacts get there), with a push token for `repo` there."""
        https = self.up.url.startswith("https://")
        o = artifacts.Oras(self.up.host, https=https, ca_file=self.up.ca_cert)
        if self.up.token_issuer is not None:
            o.client.auth.set_token_auth(self.up.token([f"repository:{repo}:pull,push"]))
        return o

    def proxy_oras(self) -> artifacts.Oras:
        """oras-py on the proxy (plain HTTP, anonymous: the proxy's own token endpoint)."""
        return artifacts.Oras(self.rp.host)

    def upstream_prefix(self) -> str:
        return f"{self.up.host}/platform"

    def proxy_prefix(self) -> str:
        return f"{self.rp.host}/a"


def start_side(name: str, base: Path) -> tuple[registry.Upstream, proxy.ProxyProc]:
    transport = name.split("-")[0]
    config: dict[str, Any] = {"secretkey": KEY_HEX}
    if transport == "https":
        ca = tls.make_ca(base / "ca")
        up: registry.Upstream = https_upstream.start_https_upstream("https-token", base / "up", ca=ca)
        config["ca_file"] = str(ca.ca_cert)
    else:
        up = registry.start_upstream("anonymous", base / "up")
    if name.endswith("-cache"):
        config["cache"] = {"store": str(base / "store"), "max_size": "1GB"}
    mapping: dict[str, Any] = {"registry": up.url, "remote": "platform"}
    if up.username:
        mapping.update(username=up.username, password=up.password)
    config["proxies"] = {"a/": mapping}
    try:
        rp = proxy.start_proxy(config, base / "proxy")
    except BaseException:
        up.stop()
        raise
    return up, rp


@pytest.fixture(scope="module", params=SIDES)
def side(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    name = str(request.param)
    up, rp = start_side(name, tmp_path_factory.mktemp(f"artifacts-{name}"))
    try:
        yield Side(name, up, rp, name.endswith("-cache"))
    finally:
        rp.stop()
        up.stop()
    assert "Traceback" not in rp.output()
