"""Mirror mode with the real daemons configured as in production: dockerd's `registry-mirrors` and
containerd's `hosts.toml` pointing at one proxy, over TLS.

The proxy (`mirror_proxy`, presenting the test CA's certificate for 127.0.0.1) has:
- the root key `*` onto the rig's token upstream, standing in for Docker Hub (`mirror_of: [docker.io]`);
- `local/` onto the anonymous upstream, mirroring that registry under the name containerd knows it by,
  its own `127.0.0.1:PORT` (`mirror_of: [127.0.0.1:PORT]`), so that containerd can also reach it
  without the proxy, as it would reach ghcr.io;
- a capability mapping onto the redirect upstream, which keeps winning by its key.

dockerd 20.10 uses `registry-mirrors` for Docker Hub names only and sends them without a prefix
(`docker pull alpine` asks the mirror for `/v2/library/alpine/…`); set here in its daemon.json and
applied with SIGHUP (dockerd reloads `registry-mirrors`). It never verifies a certificate for
127.0.0.0/8, so the TLS is unverified here (see rig/daemons.py). containerd 1.6 reads the mirrors of a
registry from `HOSTS_DIR/REGISTRY/hosts.toml` (the CRI plugin from its `config_path`, `ctr` from
`--hosts-dir`), sends `?ns=REGISTRY` on every request to a mirror (not on token requests) and
verifies the proxy's certificate against the `ca` named there.

This machine has no internet: Docker Hub (registry-1.docker.io) does not resolve, which is what the
fallback tests see when the proxy is down.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rig import daemons, proxy, registry, standard, tls
from rig.keys import CAP
from rig.procs import wait_until
from rig.standard import APP, SOLO

pytestmark = pytest.mark.e2e

KEY = "6d" * 32
HUB = "docker.io"


def _creds(up: registry.Upstream) -> dict[str, Any]:
    return {"username": up.username, "password": up.password} if up.username else {}


def mirror_config(up: dict[str, registry.Upstream]) -> dict[str, Any]:
    return {
        "secretkey": KEY,
        "proxies": {
            "*": {"registry": up["token"].url, **_creds(up["token"]), "mirror_of": [HUB]},
            "local/": {"registry": up["anonymous"].url, "mirror_of": [up["anonymous"].host]},
            f"{CAP}/app": {"registry": up["redirect"].url, "remote": APP, **_creds(up["redirect"])},
        },
    }


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("mirror-containerd"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def dockerd(containerd: daemons.Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Dockerd]:
    d = daemons.start_dockerd(tmp_path_factory.mktemp("mirror-dockerd"), containerd)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def mirror_proxy(
    upstreams: dict[str, registry.Upstream], test_ca: tls.TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[proxy.ProxyProc]:
    p = proxy.start_proxy(
        mirror_config(upstreams), tmp_path_factory.mktemp("mirror-proxy"), extra_args=test_ca.certs_option()
    )
    yield p
    p.stop()


_namespaces = itertools.count(1)


@pytest.fixture
def ctr_ns(containerd: daemons.Containerd) -> Iterator[Callable[[], str]]:
    """New containerd namespaces on demand (a pull in a fresh one fetches everything); all removed after."""
    made: list[str] = []

    def new() -> str:
        made.append(f"mirror-{next(_namespaces):03d}")
        return made[-1]

    yield new
    for ns in made:
        containerd.remove_namespace(ns)


def hosts_dir(directory: Path, p: proxy.ProxyProc, ca: Path, registries: dict[str, str]) -> Path:
    """What a user writes under /etc/containerd/certs.d: for each registry (`docker.io`, `HOST:PORT`), a
    hosts.toml whose `server` is the registry itself and whose one host is the proxy, over https with
    the proxy's CA."""
    for name, server in registries.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "hosts.toml").write_text(
            f'server = "{server}"\n\n[host."https://{p.host}"]\n  capabilities = ["pull", "resolve"]\n  ca = "{ca}"\n'
        )
    return directory


def mirrored(up: dict[str, registry.Upstream]) -> dict[str, str]:
    return {HUB: "https://registry-1.docker.io", up["anonymous"].host: up["anonymous"].url}


def use_mirrors(d: daemons.Dockerd, *urls: str) -> None:
    """daemon.json with `registry-mirrors`, applied as an operator would: SIGHUP, then `docker info`."""
    before = d.proc.output().count("Reloaded configuration")
    config = {"deprecated-key-path": str(d.dir / "key.json"), "registry-mirrors": list(urls)}
    (d.dir / "daemon.json").write_text(json.dumps(config))
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: d.proc.output().count("Reloaded configuration") > before, 10, "dockerd to reload", d.output_tail)
    shown = json.loads(d.docker_checked("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout)
    assert shown == [u.rstrip("/") + "/" for u in urls], shown


def access_lines(p: proxy.ProxyProc, since: int) -> list[str]:
    return [line for line in p.output()[since:].splitlines() if " mapping=" in line]


def served_by(lines: list[str], path_regex: str, mapping: str) -> list[str]:
    """The access log lines of 200 answers for paths matching `path_regex` through `mapping`."""
    pattern = re.compile(rf"\] (?:GET|HEAD) {path_regex} mapping={re.escape(mapping)} status=200 upstream=200 ")
    return [line for line in lines if pattern.search(line)]


# --- containerd ---------------------------------------------------------------------------------


def test_ctr_pulls_two_registries_through_one_mirror_by_ns(
    containerd: daemons.Containerd,
    mirror_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    test_ca: tls.TestCA,
    ctr_ns: Callable[[], str],
    tmp_path: Path,
) -> None:
    """`ctr images pull --hosts-dir D` of docker.io/library/solo and of 127.0.0.1:PORT/platform/app (both
    registries mirrored by the one proxy): digests are the upstreams', and the proxy's access log names
    the registry (`?ns=`) and the mapping that served each request."""
    hosts = hosts_dir(tmp_path / "certs.d", mirror_proxy, test_ca.ca_cert, mirrored(upstreams))
    anon = upstreams["anonymous"]
    since = len(mirror_proxy.output())
    pulls = [
        (f"{HUB}/{SOLO}:latest", image_digests["token"][(SOLO, "latest")], ()),
        (f"{anon.host}/{APP}:multi", image_digests["anonymous"][(APP, "multi")], ("--all-platforms",)),
    ]
    for ref, digest, extra in pulls:
        ns = ctr_ns()
        res = containerd.ctr(
            "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", *extra, ref, namespace=ns
        )
        assert res.returncode == 0, f"{res.describe()}\n--- proxy:\n{mirror_proxy.output()[-3000:]}"
        assert containerd.image_digest(ns, ref) == digest
        status = containerd.image_status(ns, ref)
        assert status is not None and status.startswith("complete"), status

    lines = access_lines(mirror_proxy, since)
    print("\n".join(lines))
    assert served_by(lines, rf"{SOLO}/manifests/latest\?ns=docker\.io", "*"), lines
    assert served_by(lines, rf"{SOLO}/blobs/sha256:[0-9a-f]{{64}}\?ns=docker\.io", "*"), lines
    assert served_by(lines, rf"{APP}/manifests/multi\?ns={re.escape(anon.host)}", "local/"), lines
    assert len(served_by(lines, rf"{APP}/blobs/sha256:[0-9a-f]{{64}}\?ns={re.escape(anon.host)}", "local/")) >= 5
    # containerd's token requests carry no ns: the challenge sent them to the registry's own realm.
    assert any("GET /ns/docker.io/token (*) " in line and "status=200" in line for line in lines), lines
    assert any(f"GET /ns/{anon.host}/token (local/) " in line and "status=200" in line for line in lines), lines
    # Every request through the mirror was routed by its ns (none fell to the root by name).
    routed = [line for line in lines if "/v2/" not in line and "/token" not in line]
    assert all("?ns=" in line for line in routed), routed


def test_ctr_falls_back_to_the_registry_when_the_proxy_is_down(
    containerd: daemons.Containerd,
    make_proxy: Callable[..., proxy.ProxyProc],
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    test_ca: tls.TestCA,
    ctr_ns: Callable[[], str],
    tmp_path: Path,
) -> None:
    """With the proxy stopped, containerd tries the next host, the registry itself: a registry it can
    reach is pulled from directly; Docker Hub cannot be reached here, and the pull fails."""
    p = make_proxy(mirror_config(upstreams), extra_args=test_ca.certs_option())
    hosts = hosts_dir(tmp_path / "certs.d", p, test_ca.ca_cert, mirrored(upstreams))
    anon = upstreams["anonymous"]
    ref = f"{anon.host}/{APP}:v1"
    ns = ctr_ns()
    containerd.ctr_checked("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref, namespace=ns)
    assert served_by(access_lines(p, 0), rf"{APP}/manifests/v1\?ns=\S+", "local/")

    # A 404 from the mirror (here a tag the registry does not have) sends containerd to the next host.
    anon.clear_access_log()
    since = len(p.output())
    ref = f"{anon.host}/{APP}:nosuch"
    res = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), ref, namespace=ctr_ns())
    assert res.returncode != 0 and "trying next host - response was http.StatusNotFound" in res.stderr, res.describe()
    assert len(re.findall(rf"HEAD {APP}/manifests/nosuch\?ns=\S+ mapping=local/ status=404 ", p.output()[since:])) == 1
    heads = [e for e in anon.access_log() if e.method == "HEAD" and e.path == f"/v2/{APP}/manifests/nosuch"]
    assert len(heads) == 2, heads  # one from the proxy, one from containerd itself
    p.stop()

    anon.clear_access_log()
    ref = f"{anon.host}/{APP}:v2s2"
    ns = ctr_ns()
    res = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref, namespace=ns)
    print(res.describe())
    assert res.returncode == 0, res.describe()
    assert containerd.image_digest(ns, ref) == image_digests["anonymous"][(APP, "v2s2")]
    direct = anon.access_log()
    assert any(e.path == f"/v2/{APP}/manifests/v2s2" for e in direct), direct  # no ?ns=: not via a mirror

    # Each host is tried in turn ("trying next host"); the error reported is the first host's, the proxy's.
    assert (
        f'msg="trying next host" error="failed to do request: Head \\"https://{p.host}/v2/{APP}/manifests/v2s2?ns='
        in (res.stderr)
    ), res.describe()
    res = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), f"{HUB}/{SOLO}:latest", namespace=ctr_ns())
    print(res.describe())
    assert res.returncode != 0
    assert "host=registry-1.docker.io" in res.stderr, res.describe()
    last = res.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f'ctr: failed to resolve reference "{HUB}/{SOLO}:latest"') and "connection refused" in last
    ), last


# --- dockerd ------------------------------------------------------------------------------------


def test_dockerd_pulls_docker_hub_names_through_its_registry_mirror(
    dockerd: daemons.Dockerd,
    mirror_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
) -> None:
    """daemon.json `registry-mirrors: ["https://PROXY"]`: `docker pull solo` (a short name: library/solo),
    `docker pull platform/app:v1` (a user's repository) and `docker pull CAP/app` are served through
    the proxy, by the root mapping and by the capability key, with the upstreams' digests."""
    use_mirrors(dockerd, f"https://{mirror_proxy.host}")
    dockerd.clear_images()
    token_up = upstreams["token"]
    token_up.clear_access_log()
    since = len(mirror_proxy.output())
    pulls = [
        ("solo", "solo", image_digests["token"][(SOLO, "latest")]),
        (f"{APP}:v1", APP, image_digests["token"][(APP, "v1")]),
        (f"{CAP}/app:multi", f"{CAP}/app", image_digests["redirect"][(APP, "multi")]),
    ]
    for image, repo, digest in pulls:
        res = dockerd.docker("pull", image)
        assert res.returncode == 0, f"{res.describe()}\n--- dockerd:\n{dockerd.output_tail()}"
        assert f"{repo}@{digest}" in dockerd.repo_digests(image)

    lines = access_lines(mirror_proxy, since)
    print("\n".join(lines))
    assert served_by(lines, rf"{SOLO}/manifests/latest", "*"), lines
    assert served_by(lines, rf"{APP}/manifests/v1", "*"), lines
    label = "cap:" + hashlib.sha256(f"{CAP}/app".encode()).hexdigest()[:10]
    assert served_by(lines, rf"<{label}>/manifests/multi", label), lines
    assert CAP not in mirror_proxy.output()
    # The stand-in for Docker Hub saw the proxy's credentials on every request but the ping.
    seen = token_up.access_log()
    assert any(e.path.startswith(f"/v2/{SOLO}/blobs/") for e in seen) and all(
        e.had_authorization for e in seen if e.path != "/v2/"
    ), seen


def test_dockerd_falls_back_to_docker_hub(
    dockerd: daemons.Dockerd,
    make_proxy: Callable[..., proxy.ProxyProc],
    upstreams: dict[str, registry.Upstream],
    test_ca: tls.TestCA,
) -> None:
    """Any failure of the mirror makes dockerd try Docker Hub itself: a name the proxy answers 404 for,
    and every name once the proxy is stopped. Docker Hub cannot be reached here, so both pulls fail
    with Docker Hub's error, and dockerd's log shows the mirror was tried first."""
    p = make_proxy(mirror_config(upstreams), extra_args=test_ca.certs_option())
    mirror = f"https://{p.host}"
    use_mirrors(dockerd, mirror)
    dockerd.clear_images()
    try:
        dockerd.docker_checked("pull", f"{APP}:v2s2")
        log_since = len(dockerd.proc.output())
        res = dockerd.docker("pull", "nosuch/image:v1")
        print(res.describe())
        assert res.returncode != 0 and "registry-1.docker.io" in res.stderr, res.describe()
        assert "Attempting next endpoint for pull after error: manifest unknown" in dockerd.proc.output()[log_since:]
        assert re.search(r"HEAD nosuch/image/manifests/v1 mapping=\* status=404 ", p.output())

        p.stop()
        log_since = len(dockerd.proc.output())
        res = dockerd.docker("pull", f"{APP}:multi")
        print(res.describe())
        log = dockerd.proc.output()[log_since:]
        print(log)
        assert res.returncode != 0 and "registry-1.docker.io" in res.stderr, res.describe()
        assert f'Attempting next endpoint for pull after error: Get \\"{mirror}/v2/\\"' in log, log
    finally:
        use_mirrors(dockerd)


# --- the mirror behaves as any other mapping ----------------------------------------------------


def test_mirror_requests_are_pull_only_counted_and_redacted(
    mirror_proxy: proxy.ProxyProc,
    upstreams: dict[str, registry.Upstream],
    issued_upstream_tokens: Callable[[], list[str]],
) -> None:
    """Through `?ns=`: the token wraps the upstream's, writes are refused, metrics count the mapping,
    and the proxy prints neither the upstream token nor the operator's password."""
    base = f"https://{mirror_proxy.host}"
    with httpx.Client(base_url=base, verify=False, timeout=15) as c:
        r = c.get(f"/v2/{SOLO}/manifests/latest?ns=docker.io")
        assert r.status_code == 401
        assert f'realm="{base}/ns/docker.io/token"' in r.headers["www-authenticate"]
        r = c.get("/ns/docker.io/token", params={"scope": f"repository:{SOLO}:pull,push", "service": mirror_proxy.host})
        token = r.json()["token"]
        assert token.startswith("v4.local.")
        auth = {"Authorization": f"Bearer {token}"}
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        assert c.get(f"/v2/{SOLO}/manifests/latest?ns=docker.io", headers=auth | accept).status_code == 200
        assert c.put(f"/v2/{SOLO}/manifests/latest?ns=docker.io", headers=auth, content=b"{}").status_code == 405
        assert c.post(f"/v2/{SOLO}/blobs/uploads/?ns=docker.io", headers=auth).status_code == 405
        assert c.get(f"/v2/{SOLO}/manifests/latest", headers=auth | accept).status_code == 401  # not at the base
        metrics = c.get("/metrics").text
    assert re.search(
        r'registryproxy_requests_total\{mapping="\*",method="GET",route="manifest",status="200"\} [1-9]', metrics
    ), metrics
    out = mirror_proxy.output()
    password = upstreams["token"].password
    assert password is not None and password not in out
    assert all(t not in out for t in issued_upstream_tokens())
    assert token not in out
