"""Pulls over distance: the standard WAN image and timed client pulls that report connection counts.

- `build_wan_image(layout)`: the standard 8-layer x 4 MiB image (`WAN_NAME:WAN_TAG` once pushed); each
  layer is a gzip'd tar of 4 MiB of pseudo-random bytes (incompressible: about 4 MiB on the wire).
- `WanImage`: that image built once, pushed to an upstream on first use (`ensure(upstream)`).
- `skopeo_pull` / `ctr_pull`: one pull, timed (wall time of the client process), with the connections
  a counter (an HttpsUpstream's relays, or anything with `reset_connections()`/`connections()`) saw
  during it: reset before, read after.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import clients, images
from .daemons import Containerd
from .procs import RigError
from .registry import Upstream

MIB = 1024 * 1024
WAN_NAME = "platform/wan"
WAN_TAG = "8x4m"
WAN_LAYERS = (4 * MIB,) * 8
WAN_SEED = "wan-8x4m"


def build_wan_image(layout: Path, tag: str = WAN_TAG) -> images.ImageInfo:
    """The standard WAN image (8 layers of 4 MiB, deterministic) into the OCI layout at `layout`."""
    return images.build_image(layout, tag, layers=WAN_LAYERS, seed=WAN_SEED)


class WanImage:
    """The WAN image, built once into `layout`, pushed to each upstream on first `ensure` (thread-safe)."""

    def __init__(self, layout: Path, tag: str = WAN_TAG) -> None:
        self.layout = layout
        self.tag = tag
        self.info = build_wan_image(layout, tag)
        self._lock = threading.Lock()
        self._pushed: dict[tuple[str, str, str], str] = {}

    @property
    def digest(self) -> str:
        return self.info.digest

    @property
    def size(self) -> int:
        """Bytes a pull transfers: config and layers."""
        return self.info.config.size + sum(b.size for b in self.info.layers)

    def ensure(self, upstream: Upstream, name: str = WAN_NAME, tag: str | None = None) -> str:
        """Push the image to `upstream` as NAME:TAG unless done already; returns the digest upstream serves."""
        key = (upstream.url, name, tag or self.tag)
        with self._lock:
            if key not in self._pushed:
                images.push(self.layout, self.tag, upstream, name, tag or self.tag, timeout=300)
                self._pushed[key] = images.manifest_digest(upstream, name, tag or self.tag)
            return self._pushed[key]


class ConnectionCounter(Protocol):
    def connections(self) -> Mapping[str, int]: ...

    def reset_connections(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class TimedPull:
    client: str  # "skopeo" or "ctr"
    ref: str
    seconds: float  # wall time of the client process
    returncode: int
    digest: str | None  # what the client recorded for the image
    connections: dict[str, int] = field(default_factory=dict)  # counter name -> connections during the pull
    output: str = ""  # the client's output (argv, stdout, stderr), for failures

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.digest is not None

    def check(self) -> TimedPull:
        if not self.ok:
            raise RigError(f"{self.client} pull of {self.ref} failed\n{self.output}")
        return self

    def describe(self) -> str:
        conns = ", ".join(f"{k} {v}" for k, v in self.connections.items())
        return f"{self.client} {self.ref}: {self.seconds:.3f}s" + (f" ({conns} connections)" if conns else "")


def _reset(counter: ConnectionCounter | None) -> None:
    if counter is not None:
        counter.reset_connections()


def _read(counter: ConnectionCounter | None) -> dict[str, int]:
    return dict(counter.connections()) if counter is not None else {}


def skopeo_pull(
    ref: str,
    dest_dir: Path,
    *,
    creds: str | None = None,
    cert_dir: Path | None = None,
    tls_verify: bool | None = None,
    counter: ConnectionCounter | None = None,
    tag: str = "latest",
    timeout: float = 300.0,
) -> TimedPull:
    """`skopeo copy docker://REF oci:DEST_DIR:TAG`, timed. With `cert_dir` the certificate is verified
    against it (tls_verify defaults to True then, else False: plain HTTP or unverified TLS)."""
    verify = tls_verify if tls_verify is not None else cert_dir is not None
    _reset(counter)
    t0 = time.perf_counter()
    res = clients.skopeo_copy(
        ref, dest_dir, creds=creds, tls_verify=verify, cert_dir=cert_dir, tag=tag, timeout=timeout
    )
    seconds = time.perf_counter() - t0
    return TimedPull("skopeo", ref, seconds, res.returncode, res.digest, _read(counter), res.describe())


_namespaces = itertools.count(1)


def ctr_pull(
    containerd: Containerd,
    ref: str,
    *,
    hosts_dir: Path | None = None,
    plain_http: bool = False,
    creds: str | None = None,
    namespace: str | None = None,
    unpack: bool = False,
    counter: ConnectionCounter | None = None,
    timeout: float = 300.0,
) -> TimedPull:
    """`ctr content fetch REF` (or `ctr images pull --snapshotter native REF` with `unpack`), timed.

    `hosts_dir`: a `--hosts-dir` (e.g. HttpsUpstream.ctr_hosts_dir); `plain_http`: `--plain-http`;
    `creds`: "user:pass" (`--user`). Without `namespace` the pull runs in a fresh namespace that is
    emptied and removed afterwards (outside the timing); with one, the caller cleans it up. containerd
    deduplicates content per namespace: a namespace that has the blobs does not fetch them again.
    """
    ns = namespace or f"wan-{os.getpid()}-{next(_namespaces)}"
    args = ["images", "pull", "--snapshotter", "native"] if unpack else ["content", "fetch"]
    if hosts_dir is not None:
        args += ["--hosts-dir", str(hosts_dir)]
    if plain_http:
        args.append("--plain-http")
    if creds is not None:
        args += ["--user", creds]
    try:
        _reset(counter)
        t0 = time.perf_counter()
        res = containerd.ctr(*args, ref, namespace=ns, timeout=timeout)
        seconds = time.perf_counter() - t0
        conns = _read(counter)
        digest = containerd.image_digest(ns, ref) if res.returncode == 0 else None
    finally:
        if namespace is None and ns in containerd.ctr_checked("namespaces", "ls", "-q").stdout.split():
            containerd.remove_namespace(ns)
    return TimedPull("ctr", ref, seconds, res.returncode, digest, conns, res.describe())


__all__ = [
    "MIB",
    "WAN_LAYERS",
    "WAN_NAME",
    "WAN_TAG",
    "ConnectionCounter",
    "TimedPull",
    "WanImage",
    "build_wan_image",
    "ctr_pull",
    "skopeo_pull",
]
