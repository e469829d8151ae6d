"""Session fixtures for the end-to-end tests: real upstream registries with test images.

`import rig` works in the test files because this conftest puts the `tests` directory on
sys.path. For mypy (run on `tests` with --explicit-package-bases, no MYPYPATH) the same package
is `tests.rig`, so import it like this:

    if TYPE_CHECKING:
        from tests.rig import images, registry
    else:
        from rig import images, registry
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

if TYPE_CHECKING:
    from tests.rig import images, proxy, registry
else:
    from rig import images, proxy, registry

APP = "platform/app"
MANY = "platform/many"
SOLO = "library/solo"
MANY_TAGS = tuple(f"t{i:03d}" for i in range(120))

Digests = dict[tuple[str, str], str]


@dataclass(frozen=True)
class TestImages:
    """The OCI layout every upstream gets its images from, and what was built into it."""

    __test__ = False  # not a test class, despite the name

    layout: Path
    v1: images.ImageInfo
    multi: images.IndexInfo
    v2s2: images.ImageInfo
    solo: images.ImageInfo


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    layout = tmp_path_factory.mktemp("rig-images") / "layout"
    return TestImages(
        layout=layout,
        v1=images.build_image(layout, "v1", layers=(1024, 4096), seed="app-v1"),
        multi=images.build_index(layout, "multi", layers=(2048, 1024), seed="app-multi"),
        v2s2=images.build_image(layout, "v2s2", layers=(3000, 500), seed="app-v2s2"),
        solo=images.build_image(layout, "solo", layers=(1500,), seed="solo"),
    )


def _populate(upstream: registry.Upstream, imgs: TestImages) -> Digests:
    """Push the standard test content into `upstream`; returns (name, tag) -> upstream digest."""
    images.push(imgs.layout, "v1", upstream, APP, "v1")
    images.push(imgs.layout, "multi", upstream, APP, "multi", all=True)
    images.push(imgs.layout, "v2s2", upstream, APP, "v2s2", format="v2s2")
    images.push(imgs.layout, "solo", upstream, SOLO, "latest")
    images.push(imgs.layout, "v1", upstream, MANY, MANY_TAGS[0])
    many = images.add_tags(upstream, MANY, MANY_TAGS[0], MANY_TAGS[1:])
    digests: Digests = {
        (APP, "v1"): images.manifest_digest(upstream, APP, "v1"),
        (APP, "multi"): images.manifest_digest(upstream, APP, "multi"),
        (APP, "v2s2"): images.manifest_digest(upstream, APP, "v2s2"),
        (SOLO, "latest"): images.manifest_digest(upstream, SOLO, "latest"),
    }
    digests.update({(MANY, t): many for t in MANY_TAGS})
    return digests


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
            futures = {k: pool.submit(_populate, u, test_images) for k, u in started.items()}
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
