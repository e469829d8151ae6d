"""Session fixtures for the end-to-end tests: real upstream registries with test images.

`import rig` works in the test files because this conftest puts the `tests` directory on
sys.path (pytest) and run.sh gives mypy MYPYPATH=addon:tests.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from rig import attack_proxy, hostile_upstreams, https_upstream, matrix, proxy, registry, standard, swift, tls, wan

Digests = standard.Digests
TestImages = standard.TestImages


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    return standard.build_test_images(tmp_path_factory.mktemp("rig-images") / "layout")


@dataclass
class _Rig:
    upstreams: dict[str, registry.Upstream]
    digests: dict[str, Digests]


@pytest.fixture(scope="session")
def _rig(tmp_path_factory: pytest.TempPathFactory, test_images: TestImages) -> Iterator[_Rig]:
    base = tmp_path_factory.mktemp("rig-upstreams")
    started: dict[str, registry.Upstream] = {}
    try:
        for kind in registry.KINDS:
            started[kind] = registry.start_upstream(kind, base / kind)
        with ThreadPoolExecutor(max_workers=len(started)) as pool:
            futures = {k: pool.submit(standard.populate, u, test_images) for k, u in started.items()}
            digests = {k: f.result(timeout=120) for k, f in futures.items()}
        for u in started.values():
            u.clear_access_log()
            if u.token_issuer is not None:
                u.token_issuer.clear()
            if u.blob_server is not None:
                u.blob_server.clear()
        yield _Rig(started, digests)
    finally:
        for u in started.values():
            u.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def upstreams(_rig: _Rig) -> dict[str, registry.Upstream]:
    """kind ("anonymous", "basic", "token", "redirect") -> running upstream with the test images:
    platform/app:{v1 (OCI), multi (OCI index, 2 platforms), v2s2 (Docker v2 schema 2)},
    library/solo:latest and platform/many:t000…t119 (all the v1 manifest)."""
    return _rig.upstreams


@pytest.fixture(scope="session")
def image_digests(_rig: _Rig) -> dict[str, Digests]:
    """kind -> {(name, tag): the Docker-Content-Digest that upstream serves}."""
    return _rig.digests


@pytest.fixture(scope="session")
def https_rig(tmp_path_factory: pytest.TempPathFactory, test_images: TestImages) -> Iterator[https_upstream.HttpsRig]:
    """kind ("https-anon", "https-basic", "https-token", "https-redirect") -> a running HTTPS upstream
    with the same content as `upstreams`: `.url` (`https://localhost:P`, the proxy's `registry:`),
    `.push_creds`, `.ca_cert`, `.cert_dir`, access/token/blob logs, and a delay relay in front of each
    server (delay 0: `set_delay`/`delayed(D)` add distance, `connections()` counts, `clear_logs()`).
    A test that changes the delay puts it back (`with up.delayed(D):`). Started on first use."""
    base = tmp_path_factory.mktemp("rig-https")
    ca = tls.make_ca(base / "ca")
    started: dict[str, https_upstream.HttpsUpstream] = {}
    try:
        for kind in https_upstream.HTTPS_KINDS:
            started[kind] = https_upstream.start_https_upstream(kind, base / kind, delay=0.0, ca=ca)
        with ThreadPoolExecutor(max_workers=len(started)) as pool:
            futures = {k: pool.submit(standard.populate, u, test_images) for k, u in started.items()}
            digests = {k: f.result(timeout=300) for k, f in futures.items()}
        for u in started.values():
            u.clear_logs()
        yield https_upstream.HttpsRig(started, digests, ca)
    finally:
        for u in started.values():
            u.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def wan_image(tmp_path_factory: pytest.TempPathFactory) -> wan.WanImage:
    """The standard WAN image (8 layers x 4 MiB, rig/wan.py), built on first use; `ensure(upstream)`
    pushes it as platform/wan:8x4m and returns the digest."""
    return wan.WanImage(tmp_path_factory.mktemp("rig-wan") / "layout")


@pytest.fixture(scope="session")
def swift_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swift.Swift]:
    """A one-node OpenStack Swift with s3api on 127.0.0.1 (rig/swift.py), started on first use: an S3 endpoint
    (`.endpoint_url`, `.region`, `.access_key_id`, `.secret_access_key`), `.client()` (aiobotocore),
    `.create_bucket(name)`, `.requests()` (its access log). Each test uses buckets of its own."""
    base = tmp_path_factory.mktemp("rig-swift")
    with swift.Swift(base) as s3:
        yield s3
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_layout(tmp_path: Path) -> Path:
    """A fresh (not yet existing) directory for a client to copy an image into as an OCI layout."""
    return tmp_path / "copy-layout"


ProxyFactory = Callable[..., "proxy.ProxyProc"]


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    """start_proxy(config, extra_args=(), env=None, **kw) in this test's tmp dir; all are stopped
    at the end of the test (their output is printed when the test failed, via the captured log)."""
    started: list[proxy.ProxyProc] = []

    def factory(
        config: Mapping[str, Any],
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> proxy.ProxyProc:
        p = proxy.start_proxy(config, tmp_path / f"proxy{len(started)}", extra_args, env, **kw)
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()
        sys.stdout.write(f"--- mitmdump output ({p.host}):\n{p.output()}\n")


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tls.TestCA:
    """A CA and a server certificate for 127.0.0.1 / ::1 / localhost (see rig/tls.py)."""
    return tls.make_ca(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="session")
def matrix_proxy(
    upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    """One mitmdump with the client-matrix mappings (rig/matrix.py), plain HTTP (TLS auto-detected)."""
    p = proxy.start_proxy(matrix.matrix_config(upstreams), tmp_path_factory.mktemp("matrix-http"))
    yield p
    p.stop()


@pytest.fixture(scope="session")
def matrix_tls_proxy(
    upstreams: dict[str, registry.Upstream], test_ca: tls.TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    """The same mappings, the proxy presenting `test_ca`'s server certificate to TLS clients."""
    p = proxy.start_proxy(
        matrix.matrix_config(upstreams), tmp_path_factory.mktemp("matrix-tls"), extra_args=test_ca.certs_option()
    )
    yield p
    p.stop()


@pytest.fixture
def issued_upstream_tokens(upstreams: dict[str, registry.Upstream]) -> Callable[[], list[str]]:
    """The upstream tokens and refresh tokens the rig's issuers hand out from now on: secrets to look for."""
    issuers = [u.token_issuer for u in upstreams.values() if u.token_issuer is not None]
    marks = [len(i.issued()) for i in issuers]
    return lambda: [t for i, m in zip(issuers, marks, strict=True) for t in i.issued()[m:]]


# --- the attack suite (test_attacks.py; rig/attack_proxy.py, rig/hostile_upstreams.py) ------------


@pytest.fixture(scope="module")
def hostiles() -> Iterator[hostile_upstreams.Hostiles]:
    """Every hostile upstream and the trap, started for the module."""
    h = hostile_upstreams.start_hostiles()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def ap(
    upstreams: dict[str, registry.Upstream],
    hostiles: hostile_upstreams.Hostiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[proxy.ProxyProc]:
    """The attacked proxy: mappings onto the rig's upstreams and onto the hostile ones (attack_config)."""
    p = proxy.start_proxy(attack_proxy.attack_config(upstreams, hostiles), tmp_path_factory.mktemp("attacks"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def ap_root(
    upstreams: dict[str, registry.Upstream],
    hostiles: hostile_upstreams.Hostiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[proxy.ProxyProc]:
    """The same mappings plus a root mapping, `*`, mirroring docker.io (root_config)."""
    p = proxy.start_proxy(attack_proxy.root_config(upstreams, hostiles), tmp_path_factory.mktemp("attacks-root"))
    yield p
    p.stop()


@pytest.fixture
def public_proxy(make_proxy: ProxyFactory, upstreams: dict[str, registry.Upstream]) -> proxy.ProxyProc:
    """A proxy with `public_url` set (public_config), for this test."""
    return make_proxy(attack_proxy.public_config(upstreams))


@pytest.fixture
def taps(upstreams: dict[str, registry.Upstream]) -> dict[str, registry.Upstream]:
    """The rig's upstreams with their access logs (and token issuers' logs) cleared for this test."""
    for u in upstreams.values():
        u.clear_access_log()
        if u.token_issuer is not None:
            u.token_issuer.clear()
    return upstreams
