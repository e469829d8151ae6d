"""The standard test content every e2e upstream gets (see tests/e2e/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import images
from .registry import Upstream

APP = "platform/app"
MANY = "platform/many"
SOLO = "library/solo"
MANY_TAGS = tuple(f"t{i:03d}" for i in range(120))
# Extra repositories so that `_catalog?n=` paginates (distribution 2.8 paginates only _catalog).
EXTRA_REPOS = tuple(f"platform/repos/r{i:02d}" for i in range(25))

Digests = dict[tuple[str, str], str]


@dataclass(frozen=True)
class TestImages:
    """The OCI layout every upstream gets its images from, and what was built into it."""

    __test__ = False  # not a pytest test class, despite the name

    layout: Path
    v1: images.ImageInfo
    multi: images.IndexInfo
    v2s2: images.ImageInfo
    solo: images.ImageInfo


def build_test_images(layout: Path) -> TestImages:
    """Tags v1 (OCI, 2 layers), multi (OCI index: linux/amd64 + linux/arm64), v2s2, solo."""
    return TestImages(
        layout=layout,
        v1=images.build_image(layout, "v1", layers=(1024, 4096), seed="app-v1"),
        multi=images.build_index(layout, "multi", layers=(2048, 1024), seed="app-multi"),
        v2s2=images.build_image(layout, "v2s2", layers=(3000, 500), seed="app-v2s2"),
        solo=images.build_image(layout, "solo", layers=(1500,), seed="solo"),
    )


def populate(upstream: Upstream, imgs: TestImages) -> Digests:
    """Push the standard content into `upstream`; returns (name, tag) -> upstream digest.

    platform/app:v1 (OCI), platform/app:multi (index, pushed with --all), platform/app:v2s2
    (pushed with --format v2s2), library/solo:latest, platform/many:t000…t119 (v1's manifest),
    platform/repos/r00…r24:latest (v1's manifest; 28 repositories in all, for _catalog paging).
    """
    images.push(imgs.layout, "v1", upstream, APP, "v1")
    images.push(imgs.layout, "multi", upstream, APP, "multi", all=True)
    images.push(imgs.layout, "v2s2", upstream, APP, "v2s2", format="v2s2")
    images.push(imgs.layout, "solo", upstream, SOLO, "latest")
    images.push(imgs.layout, "v1", upstream, MANY, MANY_TAGS[0])
    many = images.add_tags(upstream, MANY, MANY_TAGS[0], MANY_TAGS[1:])
    images.add_repos(upstream, APP, "v1", EXTRA_REPOS)
    digests: Digests = {
        (APP, "v1"): images.manifest_digest(upstream, APP, "v1"),
        (APP, "multi"): images.manifest_digest(upstream, APP, "multi"),
        (APP, "v2s2"): images.manifest_digest(upstream, APP, "v2s2"),
        (SOLO, "latest"): images.manifest_digest(upstream, SOLO, "latest"),
    }
    digests.update({(MANY, t): many for t in MANY_TAGS})
    digests.update({(r, "latest"): digests[(APP, "v1")] for r in EXTRA_REPOS})
    return digests
