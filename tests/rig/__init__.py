"""End-to-end test rig: real registries, a token issuer, a blob server, skopeo and mitmdump.

Import the submodules (`from rig import registry, images, clients, proxy`) or the names below.
"""

from . import (
    blobserver,
    clients,
    haproxy,
    https_upstream,
    httpserver,
    images,
    procs,
    proxy,
    registry,
    relay,
    standard,
    swift,
    tap,
    token_issuer,
    wan,
)
from .blobserver import BlobRequest, BlobServer
from .clients import CopyResult, skopeo_copy, skopeo_inspect
from .images import add_tags, build_image, build_index, manifest_digest, push
from .procs import Proc, RigError, free_port
from .proxy import ProxyProc, start_proxy
from .registry import KINDS, Upstream, start_upstream
from .tap import AccessLogEntry, AccessRecord
from .token_issuer import TokenIssuer

__all__ = [
    "KINDS",
    "AccessLogEntry",
    "AccessRecord",
    "BlobRequest",
    "BlobServer",
    "CopyResult",
    "Proc",
    "ProxyProc",
    "RigError",
    "TokenIssuer",
    "Upstream",
    "add_tags",
    "blobserver",
    "build_image",
    "build_index",
    "clients",
    "free_port",
    "haproxy",
    "https_upstream",
    "httpserver",
    "images",
    "manifest_digest",
    "pki",
    "procs",
    "proxy",
    "push",
    "registry",
    "relay",
    "skopeo_copy",
    "skopeo_inspect",
    "standard",
    "start_proxy",
    "start_upstream",
    "swift",
    "tap",
    "token_issuer",
    "wan",
]
