"""Share links end to end: `./run.sh link` mints them, real clients pull through them, and everything the
issue promises holds against real registries, a real mitmdump and three replicas behind a real HAProxy.

- skopeo, containerd (`ctr`) and dockerd pull through a fresh link for a namespace mapping (`tok/` over
  the token upstream) and a capability mapping (`CAP/app` over the Basic upstream): the digests are the
  upstream's, and the proxy's log names the link by its id only.
- A link of a few seconds works, then is refused with `403 DENIED` "this link expired at …" (skopeo says so).
- `revoked_links` and a reload stop a pull through the link and the token already issued for it, at once.
- A key rotation: a link minted under the old key works while that key is listed in `secretkeys`, and is an
  unknown name once it is removed.
- Three replicas sharing the key accept one link: requests through HAProxy land on all three.
- A link with one character changed, one minted under another key and random segments of a link's shape
  answer exactly what an unknown name answers (status, body, headers but the challenge's scope), in the
  same time (medians of interleaved samples, as test_attacks.py times the capability lookup), and no
  upstream sees any request for them.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from regproxy.links import MARKER, mint
from rig import clients, daemons, proxy, registry, standard
from rig.haproxy import start_haproxy
from rig.keys import CAP
from rig.procs import RunResult, clean_env, run, wait_until
from rig.standard import APP

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
KEY_HEX = "5a" * 16 + "e7" * 16
OLD_KEY_HEX = "0f" * 32
TIMEOUT = 30.0
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]
LINK_LINE = re.compile(r"^link:\s+(\S+)$", re.MULTILINE)
ID_LINE = re.compile(r"^id:\s+(\S+)$", re.MULTILINE)
B32 = "abcdefghijklmnopqrstuvwxyz234567"
TIMING_SAMPLES = 200


def link_config(upstreams: dict[str, registry.Upstream], **extra: Any) -> dict[str, Any]:
    tok, basic = upstreams["token"], upstreams["basic"]
    proxies = {
        "tok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
        f"{CAP}/app": {"registry": basic.url, "remote": APP, "username": basic.username, "password": basic.password},
    }
    return {"secretkey": KEY_HEX, **extra, "proxies": proxies}


def run_link(p: proxy.ProxyProc, key: str, expires: str, env: dict[str, str] | None = None) -> RunResult:
    """`./run.sh link KEY --expires D` against the proxy's own configuration file."""
    extra = {"REGISTRYPROXY_CONFIG": str(p.config_path), **(env or {})}
    return run([str(REPO / "run.sh"), "link", key, "--expires", expires], timeout=60, env_extra=extra)


def new_link(p: proxy.ProxyProc, key: str, expires: str = "1h") -> tuple[str, str]:
    res = run_link(p, key, expires)
    assert res.returncode == 0, res.describe()
    link, link_id = LINK_LINE.search(res.stdout), ID_LINE.search(res.stdout)
    assert link is not None and link_id is not None, res.stdout
    return link.group(1), link_id.group(1)


def name_for(key: str, link: str) -> str:
    """What a client pulls: LINK/app for the namespace tok/ (platform/app), LINK/app for CAP/app."""
    return f"{link}/app"


def token(base: str, name: str) -> str:
    r = httpx.get(f"{base}/token", params={"scope": f"repository:{name}:pull"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def manifest(base: str, name: str, tok: str | None, client: httpx.Client | None = None) -> httpx.Response:
    headers = [*MANIFEST_ACCEPT, *([("Authorization", f"Bearer {tok}")] if tok else [])]
    if client is not None:
        return client.get(f"{base}/v2/{name}/manifests/v1", headers=headers)
    return httpx.get(f"{base}/v2/{name}/manifests/v1", headers=headers, timeout=TIMEOUT)


def rewrite_config(p: proxy.ProxyProc, config: dict[str, Any]) -> None:
    """Write a new configuration and SIGHUP the proxy; back once it logged the reload."""
    before = p.output().count("configuration reloaded")
    p.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_until(lambda: p.output().count("configuration reloaded") > before, 15, "the reload", p.output)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lp(upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[proxy.ProxyProc]:
    """The module's proxy: tok/ and CAP/app, the secret key in the file."""
    p = proxy.start_proxy(link_config(upstreams), tmp_path_factory.mktemp("links-proxy"))
    yield p
    p.stop()
    sys.stdout.write(f"--- mitmdump output ({p.host}):\n{p.output()}\n")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("containerd"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def dockerd(containerd: daemons.Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Dockerd]:
    d = daemons.start_dockerd(tmp_path_factory.mktemp("dockerd"), containerd)
    yield d
    d.stop()


_namespaces = itertools.count(1)


@pytest.fixture
def ctr_ns(containerd: daemons.Containerd) -> Iterator[str]:
    ns = f"links-{next(_namespaces):03d}"
    yield ns
    containerd.remove_namespace(ns)


# --- pulls ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "kind"), [("tok/", "token"), (f"{CAP}/app", "basic")], ids=["namespace", "capability"])
def test_skopeo_ctr_and_docker_pull_through_a_fresh_link(
    lp: proxy.ProxyProc,
    containerd: daemons.Containerd,
    ctr_ns: str,
    dockerd: daemons.Dockerd,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_path: Path,
    key: str,
    kind: str,
) -> None:
    link, link_id = new_link(lp, key, "2h")
    assert len(link) <= 80 and link.startswith(MARKER)
    ref = f"{lp.host}/{name_for(key, link)}:v1"
    want = image_digests[kind][(APP, "v1")]
    upstreams[kind].clear_access_log()

    res = clients.skopeo_copy(ref, tmp_path / "skopeo", tag="v1").check()
    assert res.digest == want
    pulled = containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref, namespace=ctr_ns)
    assert pulled.returncode == 0, f"{pulled.describe()}\n{lp.output()[-3000:]}"
    assert containerd.image_digest(ctr_ns, ref) == want
    dockerd.clear_images()
    dockerd.docker_checked("pull", ref)
    assert any(d.endswith(f"@{want}") for d in dockerd.repo_digests(ref))
    dockerd.clear_images()

    # The upstream saw only its own repository, and never the link.
    log = upstreams[kind].access_log()
    assert log and all(e.path == "/v2/" or e.path.startswith(f"/v2/{APP}/") for e in log), log
    lp.wait_quiet()
    out = lp.output()
    assert f"link={link_id}" in out and f"<link:{link_id}>" in out
    assert link not in out


def test_a_link_of_a_few_seconds_is_refused_once_it_expired(lp: proxy.ProxyProc) -> None:
    link, _ = new_link(lp, "tok/", "4s")
    minted = time.time()
    name = name_for("tok/", link)
    rc, _, err = clients.skopeo_inspect(f"{lp.host}/{name}:v1")
    assert rc == 0, err
    time.sleep(max(0.0, minted + 5.5 - time.time()))
    rc, _, err = clients.skopeo_inspect(f"{lp.host}/{name}:v1")
    assert rc != 0 and "this link expired at" in err, err
    r = manifest(lp.url, name, token(lp.url, name))
    assert r.status_code == 403
    [e] = r.json()["errors"]
    assert e["code"] == "DENIED" and re.fullmatch(r"this link expired at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["message"])
    assert link not in r.text


def test_revocation_and_a_reload_stop_a_pull_and_its_issued_token(
    make_proxy: Any, upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    p: proxy.ProxyProc = make_proxy(link_config(upstreams))
    link, link_id = new_link(p, f"{CAP}/app")
    name = name_for(f"{CAP}/app", link)
    issued = token(p.url, name)
    assert manifest(p.url, name, issued).status_code == 200
    clients.skopeo_copy(f"{p.host}/{name}:v1", tmp_path / "before", tag="v1").check()

    rewrite_config(p, link_config(upstreams, revoked_links=[link_id]))
    upstreams["basic"].clear_access_log()
    r = manifest(p.url, name, issued)  # the token issued before the reload
    assert r.status_code == 403 and r.json()["errors"][0] == {"code": "DENIED", "message": "this link was revoked"}
    res = clients.skopeo_copy(f"{p.host}/{name}:v1", tmp_path / "after", tag="v1")
    assert res.returncode != 0 and "this link was revoked" in res.stderr, res.stderr
    assert [e for e in upstreams["basic"].access_log() if e.path != "/v2/"] == []
    # Another link of the same mapping is untouched.
    other, _ = new_link(p, f"{CAP}/app")
    assert (
        manifest(p.url, name_for(f"{CAP}/app", other), token(p.url, name_for(f"{CAP}/app", other))).status_code == 200
    )


def test_a_link_survives_a_rotation_while_its_key_is_listed(
    make_proxy: Any, upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    old = link_config(upstreams)
    old["secretkey"] = OLD_KEY_HEX
    p: proxy.ProxyProc = make_proxy(old)
    link, _ = new_link(p, "tok/")
    name = name_for("tok/", link)
    assert manifest(p.url, name, token(p.url, name)).status_code == 200

    rotated = link_config(upstreams)
    del rotated["secretkey"]
    rewrite_config(p, {"secretkeys": [KEY_HEX, OLD_KEY_HEX], **rotated})
    clients.skopeo_copy(f"{p.host}/{name}:v1", tmp_path / "rotated", tag="v1").check()

    rewrite_config(p, link_config(upstreams))  # the old key removed
    r = manifest(p.url, name, token(p.url, name))
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert clients.skopeo_inspect(f"{p.host}/{name}:v1")[0] != 0


def test_three_replicas_accept_one_link(
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    tmp_path: Path,
) -> None:
    config = link_config(upstreams)
    replicas: list[proxy.ProxyProc] = []
    hp = None
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(proxy.start_proxy, config, tmp_path / f"r{i}") for i in range(3)]
        replicas += [f.result() for f in futures if f.exception() is None]
        for f in futures:
            if (e := f.exception()) is not None:
                raise e
        hp = start_haproxy(tmp_path / "haproxy", [r.port for r in replicas])
        link, link_id = new_link(replicas[0], "tok/")
        name = name_for("tok/", link)
        res = clients.skopeo_copy(f"{hp.host}/{name}:v1", tmp_path / "pulled", tag="v1").check()
        assert res.digest == image_digests["token"][(APP, "v1")]
        tok = token(hp.url, name)
        with httpx.Client(timeout=TIMEOUT) as c:
            for _ in range(6):  # round robin: every replica gets two
                assert manifest(hp.url, name, tok, c).status_code == 200
        for r in replicas:
            r.wait_quiet()
            served = re.findall(rf"GET <link:{link_id}>/app/manifests/v1 .*status=200 .*token=ok link={link_id}$",
                                r.output(), re.MULTILINE)  # fmt: skip
            assert served, f"replica {r.host} served nothing through the link"
            assert link not in r.output()
    finally:
        if hp is not None:
            hp.proc.stop()
        for r in replicas:
            r.stop()


# --- probing ----------------------------------------------------------------------------------------------------


def fakes(link: str) -> dict[str, str]:
    """Segments that are not a genuine link: one character changed, another key's link, random ones."""
    rng = random.Random(5)
    i = len(link) - 7
    foreign, _ = mint(bytes.fromhex("99" * 32), "tok/", int(time.time()) + 3600)
    return {
        "tampered": link[:i] + ("a" if link[i] != "a" else "b") + link[i + 1 :],
        "foreign": foreign,
        "random": MARKER + "".join(rng.choice(B32) for _ in range(len(link) - len(MARKER))),
        "unknown": "nothing-here",
    }


def test_non_genuine_links_answer_as_an_unknown_name_in_the_same_time(
    lp: proxy.ProxyProc, upstreams: dict[str, registry.Upstream]
) -> None:
    link, _ = new_link(lp, "tok/")
    names = {kind: f"{segment}/app" for kind, segment in fakes(link).items()}
    for u in upstreams.values():
        u.clear_access_log()
    tokens = {kind: token(lp.url, name) for kind, name in names.items()}
    answers = {}
    for kind, name in names.items():
        challenge = manifest(lp.url, name, None)
        refused = manifest(lp.url, name, tokens[kind])
        scope = challenge.headers["www-authenticate"].replace(name, "NAME")
        answers[kind] = (
            challenge.status_code,
            challenge.content,
            scope,
            refused.status_code,
            refused.content,
            sorted((k, v) for k, v in refused.headers.items() if k not in ("date", "content-length")),
            refused.headers["content-length"],
        )
    unknown = answers.pop("unknown")
    assert unknown[3] == 404 and b"NAME_UNKNOWN" in unknown[4]
    for kind, got in answers.items():
        assert got == unknown, kind

    samples: dict[str, list[float]] = {kind: [] for kind in names}
    order = random.Random(13)
    with httpx.Client(base_url=lp.url, timeout=TIMEOUT) as c:
        for kind, name in names.items():  # warm up the connection and the token cache
            for _ in range(10):
                manifest("", name, tokens[kind], c)
        for _ in range(TIMING_SAMPLES):
            kinds = list(names)
            order.shuffle(kinds)
            for kind in kinds:
                started = time.perf_counter()
                r = manifest("", names[kind], tokens[kind], c)
                samples[kind].append(time.perf_counter() - started)
                assert r.status_code == 404
    medians = {kind: statistics.median(s) for kind, s in samples.items()}
    print("medians (ms):", {k: round(v * 1000, 3) for k, v in medians.items()})
    for kind in ("tampered", "foreign", "random"):
        assert medians[kind] <= medians["unknown"] * 1.2 + 0.001, medians
        assert medians["unknown"] <= medians[kind] * 1.2 + 0.001, medians
    # No upstream saw any of them (nor the token requests for them).
    for kind, u in upstreams.items():
        assert [e for e in u.access_log() if e.path != "/v2/"] == [], kind


def test_the_command_refuses_in_one_line(lp: proxy.ProxyProc, tmp_path: Path) -> None:
    for key, expires, message in (
        ("nope/", "1d", "is not a mapping key"),
        ("tok/", "91d", "is over link_max_age (90d)"),
    ):
        res = run_link(lp, key, expires)
        assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1, res.describe()
    keyless = tmp_path / "keyless.yaml"
    config = yaml.safe_load(lp.config_path.read_text())
    del config["secretkey"]
    keyless.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in clean_env().items() if not k.startswith("REGISTRYPROXY_SECRETKEY")}
    res = run([str(REPO / "run.sh"), "link", "tok/", "--expires", "1d"], timeout=60,
              env_extra={**env, "REGISTRYPROXY_CONFIG": str(keyless)})  # fmt: skip
    assert res.returncode == 2 and "no secret key configured" in res.stderr, res.describe()
