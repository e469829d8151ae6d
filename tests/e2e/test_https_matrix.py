"""The client matrix against HTTPS upstreams: skopeo, podman, containerd (ctr) and dockerd pull through the
proxy from each kind of the HTTPS rig (`https_rig`, rig/https_upstream.py): TLS from a private CA that the
proxy trusts with `ca_file`, the token service on a server of its own, blobs redirected to an HTTPS blob
store under another name, each server behind a relay.

Nothing of the plain matrix is written again. Each test here runs one cell of the plain matrix's own test
function (test_podman_skopeo.py, test_daemon_clients.py) with this module's fixtures, which override
the shared ones by name:
- `upstreams` / `image_digests`: the HTTPS rig, each upstream under the name of the plain kind it
  mirrors ("https-anon" is "anonymous" here, and so on), so the client-matrix mappings (rig/matrix.py)
  and the plain matrix's checks apply unchanged: the digest the client recorded equals the upstream's,
  the upstream served exactly the image's blobs, saw nothing outside `/v2/platform/` and, with auth,
  always the proxy's credentials; for the redirect kind the blob store got every blob, never with
  `Authorization`;
- `matrix_tls_proxy` (and `matrix_proxy`, the same process: one port answers TLS and plain HTTP): the
  client-matrix mappings over those upstreams, the rig's CA as the top-level `ca_file`;
- `test_ca`: the proxy presents the usual test certificate, but what clients are told to trust
  is a bundle of its CA and the rig's, because blobs of the redirect kind come from the rig's HTTPS blob
  store, which the client fetches itself.
Test ids name the HTTPS kind: `test_ctr_images_pull[https-redirect-capability-multi]`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import e2e.test_daemon_clients as daemon_matrix
import e2e.test_podman_skopeo as podman_matrix
import pytest
from rig import clients, https_upstream, matrix, proxy, registry, standard, tls
from rig.podman import cert_dir

pytestmark = pytest.mark.e2e

HTTPS_NAME = {base: kind for kind, base in https_upstream.BASE_KIND.items()}  # "anonymous" -> "https-anon"
MAPPINGS = ("namespace", "capability")

# The plain matrix's fixtures, as they are (they see this module's overrides below).
expect = podman_matrix.expect
podman = podman_matrix.podman
ca_dir = podman_matrix.ca_dir
containerd = daemon_matrix.containerd
ctr_ns = daemon_matrix.ctr_ns
ctr_tls_hosts = daemon_matrix.ctr_tls_hosts
dockerd = daemon_matrix.dockerd
docker_empty = daemon_matrix.docker_empty
expected_blobs = daemon_matrix.expected_blobs


@pytest.fixture(scope="module")
def upstreams(https_rig: https_upstream.HttpsRig) -> dict[str, registry.Upstream]:
    """The HTTPS rig under the plain kinds' names, `.kind` included (views sharing the running servers)."""
    views: dict[str, registry.Upstream] = {}
    for kind, up in https_rig.upstreams.items():
        assert up.url.startswith("https://") and up.ca_cert == https_rig.ca.ca_cert
        views[https_upstream.BASE_KIND[kind]] = dataclasses.replace(up, kind=https_upstream.BASE_KIND[kind])
    return views


@pytest.fixture(scope="module")
def image_digests(https_rig: https_upstream.HttpsRig) -> dict[str, standard.Digests]:
    return {https_upstream.BASE_KIND[kind]: digests for kind, digests in https_rig.digests.items()}


@pytest.fixture(scope="module")
def test_ca(
    test_ca: tls.TestCA, https_rig: https_upstream.HttpsRig, tmp_path_factory: pytest.TempPathFactory
) -> tls.TestCA:
    """conftest's test CA, but its `ca_cert` (what clients trust) also holds the rig's CA."""
    bundle = tmp_path_factory.mktemp("client-trust") / "proxy-and-upstream-ca.crt"
    bundle.write_bytes(test_ca.ca_cert.read_bytes() + https_rig.ca.ca_cert.read_bytes())
    return dataclasses.replace(test_ca, ca_cert=bundle)


@pytest.fixture(scope="module")
def matrix_tls_proxy(
    upstreams: dict[str, registry.Upstream],
    https_rig: https_upstream.HttpsRig,
    test_ca: tls.TestCA,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[proxy.ProxyProc]:
    yield from _matrix_proxy(upstreams, https_rig, test_ca, tmp_path_factory.mktemp("https-matrix"))


def _matrix_proxy(
    upstreams: dict[str, registry.Upstream],
    https_rig: https_upstream.HttpsRig,
    test_ca: tls.TestCA,
    tmp: Path,
    *extra: str,
) -> Iterator[proxy.ProxyProc]:
    """The client-matrix mappings over the HTTPS rig, the rig's CA as `ca_file`; stopped after use."""
    config = matrix.matrix_config(upstreams, ca_file=str(https_rig.ca.ca_cert))
    p = proxy.start_proxy(config, tmp, extra_args=[*test_ca.certs_option(), *extra])
    yield p
    p.stop()
    assert "Traceback" not in p.output()


@pytest.fixture(scope="module")
def matrix_proxy(matrix_tls_proxy: proxy.ProxyProc) -> proxy.ProxyProc:
    return matrix_tls_proxy


def _cells(refs: Sequence[str]) -> list[Any]:
    return [
        pytest.param(k, m, r, id=f"{HTTPS_NAME[k]}-{m}-{r}") for k in registry.KINDS for m in MAPPINGS for r in refs
    ]


def _run_cell(request: pytest.FixtureRequest, test: Callable[..., None], **cell: str) -> None:
    """Call one of the plain matrix's test functions for `cell`, with this module's fixtures."""
    args: dict[str, Any] = {
        name: request if name == "request" else request.getfixturevalue(name)
        for name in inspect.signature(test).parameters
        if name not in cell
    }
    test(**args, **cell)


@pytest.mark.parametrize(("kind", "mapping", "tag"), _cells(podman_matrix.TAGS))
def test_skopeo_copy_all(request: pytest.FixtureRequest, kind: str, mapping: str, tag: str) -> None:
    """`skopeo copy --all --src-cert-dir D` (verified TLS to the proxy): v1, the multi-arch index and
    its instances, v2s2 (test_podman_skopeo.py::test_skopeo_copy_all_tls)."""
    _run_cell(request, podman_matrix.test_skopeo_copy_all_tls, kind=kind, mapping=mapping, tag=tag)


@pytest.mark.parametrize(("kind", "mapping", "ref"), _cells(podman_matrix.PODMAN_REFS))
def test_podman_pull(request: pytest.FixtureRequest, kind: str, mapping: str, ref: str) -> None:
    """`podman pull --cert-dir D` (verified TLS to the proxy) of v1, the multi-arch index (the host's
    instance is stored), v2s2 and the index by digest (test_podman_skopeo.py::test_podman_pull_tls)."""
    _run_cell(request, podman_matrix.test_podman_pull_tls, kind=kind, mapping=mapping, ref=ref)


@pytest.mark.parametrize(("kind", "mapping", "tag"), _cells(daemon_matrix.CTR_TAGS))
def test_ctr_images_pull(request: pytest.FixtureRequest, kind: str, mapping: str, tag: str) -> None:
    """`ctr images pull --hosts-dir D --tlscacert CA --all-platforms` (test_daemon_clients.py::test_ctr_images_pull)."""
    _run_cell(request, daemon_matrix.test_ctr_images_pull, transport="tls", kind=kind, mapping=mapping, tag=tag)


@pytest.mark.parametrize(("kind", "mapping", "ref"), _cells(daemon_matrix.DOCKER_REFS))
def test_docker_pull(request: pytest.FixtureRequest, kind: str, mapping: str, ref: str) -> None:
    """`docker pull HOST/NAME:TAG` (v1, multi, v2s2) and `HOST/NAME@sha256:…` (v1's digest) on the proxy's
    port (docker speaks TLS to loopback without verifying; test_daemon_clients.py::test_docker_pull)."""
    _run_cell(request, daemon_matrix.test_docker_pull, transport="http", kind=kind, mapping=mapping, ref=ref)


def test_clients_verify_the_redirected_blob_store_themselves(
    matrix_tls_proxy: proxy.ProxyProc, test_ca: tls.TestCA, https_rig: https_upstream.HttpsRig, tmp_path: Path
) -> None:
    """The redirect cells above really send the client to the rig's HTTPS blob store: trusting only the
    proxy's CA (conftest's `ca.crt`, in `test_ca.dir`), skopeo gets the manifest through the proxy and
    then fails on the blob store's certificate."""
    certs = cert_dir(tmp_path / "proxy-ca-only", test_ca.dir / "ca.crt")
    src = f"{matrix_tls_proxy.host}/{matrix.local_name('redirect', 'namespace')}:v1"
    res = clients.skopeo_copy(src, tmp_path / "copy", tls_verify=True, cert_dir=certs, tag="v1")
    assert not res.ok
    blobs_url = https_rig["https-redirect"].blobs_url
    assert blobs_url is not None and blobs_url.rstrip("/") in res.stderr, res.describe()
    assert "x509: certificate signed by unknown authority" in res.stderr, res.describe()


# -- upstream connections reused across client connections --------------------------------------------


@pytest.fixture(scope="module")
def unpooled_proxy(
    upstreams: dict[str, registry.Upstream],
    https_rig: https_upstream.HttpsRig,
    test_ca: tls.TestCA,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[proxy.ProxyProc]:
    """The matrix proxy with `registryproxy_upstream_pool=false`: mitmproxy's own connection per client one."""
    tmp = tmp_path_factory.mktemp("https-unpooled")
    yield from _matrix_proxy(upstreams, https_rig, test_ca, tmp, "--set", "registryproxy_upstream_pool=false")


def _pull_connections(
    p: proxy.ProxyProc, u: https_upstream.HttpsUpstream, certs: Path, dest: Path, kind: str
) -> tuple[dict[str, int], int]:
    """One `skopeo copy --all` of the multi-arch index through `p`: connections each upstream server accepted
    and the requests the registry saw."""
    u.clear_logs()
    u.reset_connections()
    src = f"{p.host}/{matrix.local_name(kind, 'namespace')}:multi"
    clients.skopeo_copy(src, dest, all=True, tls_verify=True, cert_dir=certs, tag="multi").check()
    return u.connections(), len(u.access_log())


@pytest.mark.parametrize("kind", ["token", "redirect"])
def test_warm_pulls_open_at_most_one_connection_per_upstream_host(
    matrix_tls_proxy: proxy.ProxyProc,
    unpooled_proxy: proxy.ProxyProc,
    https_rig: https_upstream.HttpsRig,
    ca_dir: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    """skopeo opens a new connection to the proxy for every request. With the pool (the default) a warm
    pull (the second) costs at most one new connection to the registry and one to the token service,
    however many requests it makes; without it, one registry connection per request, as before."""
    u = https_rig[HTTPS_NAME[kind]]
    _pull_connections(matrix_tls_proxy, u, ca_dir, tmp_path / "cold", kind)
    warm, requests = _pull_connections(matrix_tls_proxy, u, ca_dir, tmp_path / "warm", kind)
    assert requests >= 8, requests  # index, 3 manifests, configs and layers of the instances
    assert warm["registry"] <= 1 and warm.get("token", 0) <= 1, (warm, requests)
    _pull_connections(unpooled_proxy, u, ca_dir, tmp_path / "unpooled-cold", kind)
    unpooled, requests = _pull_connections(unpooled_proxy, u, ca_dir, tmp_path / "unpooled-warm", kind)
    assert unpooled["registry"] >= requests - 1, (unpooled, requests)
