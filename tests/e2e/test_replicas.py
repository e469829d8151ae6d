"""Scale out: three proxy replicas behind a real HAProxy, and the container image's command run locally.

Three mitmdumps with the addon (rig.proxy.start_proxy) share one configuration, secret key included,
behind HAProxy 2.6 (Debian) in HTTP mode: round-robin per request, `option httpchk GET /readyz` with
`http-check expect status 200`, a one-second check interval, `retries` and `option redispatch 1`
(a request whose server refuses the connection is retried on another at once). HAProxy's admin
socket (`show stat`) says which servers it counts up or down and how often it retried.

- A token issued through HAProxy by one replica is accepted by every replica: requests with it land
  on all three (each replica's own log lines show it served them with `token=ok`), and none of them
  went back to the upstream's token issuer (the upstream token travels inside the proxy's token).
- skopeo and containerd (`ctr`) pull through HAProxy, then one replica is SIGKILLed between pulls:
  the requests and pulls that follow all succeed (the one that reached the dead replica was
  redispatched), HAProxy marks it DOWN, and the survivors serve the rest.
- The Dockerfile's CMD (addon/deploy/Dockerfile) runs here as written, with the image's ENV, the
  configuration from a file, the key from a file (REGISTRYPROXY_SECRETKEY_FILE), and its addresses
  swapped for free loopback ports: /readyz answers on the ops port, /v2/ challenges on the main one,
  and a pull through it keeps the digest.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from regproxy.tokens.paseto import TokenCodec, TokenError
from rig import clients, daemons, proxy, registry, standard
from rig.haproxy import BACKEND, HAProxy, start_haproxy
from rig.procs import LOOPBACK, Proc, clean_env, wait_until, with_free_port
from rig.standard import APP

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "addon" / "deploy" / "Dockerfile"
KEY_HEX = "3c" * 16 + "d1" * 16
REPLICAS = 3
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]


def _config(upstreams: dict[str, registry.Upstream], secretkey: str | None = KEY_HEX) -> dict[str, Any]:
    tok = upstreams["token"]
    proxies: dict[str, Any] = {
        "anon/": {"registry": upstreams["anonymous"].url, "remote": "platform"},
        "tok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
    }
    return {"secretkey": secretkey, "proxies": proxies} if secretkey else {"proxies": proxies}


def _served_ok(output: str, path: str) -> list[str]:
    """The replica's log lines for `path` answered 200 with a valid client token."""
    line = re.compile(rf"^.*\b(?:GET|HEAD) {re.escape(path)} mapping=\S+ status=200 .*token=ok$", re.MULTILINE)
    return line.findall(output)


@dataclass
class Group:
    replicas: list[proxy.ProxyProc]
    haproxy: HAProxy


@pytest.fixture(scope="module")
def group(upstreams: dict[str, registry.Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    tmp = tmp_path_factory.mktemp("replicas")
    config = _config(upstreams)
    replicas: list[proxy.ProxyProc] = []
    hp: HAProxy | None = None
    try:
        with ThreadPoolExecutor(max_workers=REPLICAS) as pool:
            futures = [pool.submit(proxy.start_proxy, config, tmp / f"r{i}") for i in range(REPLICAS)]
        # Every start returned or raised (start_proxy is bounded); keep the started ones to stop them.
        replicas += [f.result() for f in futures if f.exception() is None]
        for f in futures:
            if (e := f.exception()) is not None:
                raise e
        hp = start_haproxy(tmp / "haproxy", [r.port for r in replicas])
        yield Group(replicas, hp)
    finally:
        if hp is not None:
            hp.proc.stop()
            sys.stdout.write(f"--- haproxy output:\n{hp.proc.output()}\n")
        for r in replicas:
            r.stop()
            sys.stdout.write(f"--- replica {r.host} output (tail):\n{r.output()[-3000:]}\n")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("containerd"))
    yield d
    d.stop()


_namespaces = itertools.count(1)


@pytest.fixture
def ctr_ns(containerd: daemons.Containerd) -> Iterator[str]:
    ns = f"replicas-{next(_namespaces):03d}"
    yield ns
    containerd.remove_namespace(ns)


def _token(base: str, name: str) -> str:
    r = httpx.get(f"{base}/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def _manifest(client: httpx.Client, base: str, name: str, ref: str, tok: str) -> httpx.Response:
    # HAProxy in HTTP mode balances every request, also on a kept-alive client connection.
    headers = [*MANIFEST_ACCEPT, ("Authorization", f"Bearer {tok}")]
    return client.get(f"{base}/v2/{name}/manifests/{ref}", headers=headers)


def _ctr_pull(containerd: daemons.Containerd, ns: str, ref: str) -> str | None:
    res = containerd.ctr(
        "images", "pull", "--plain-http", "--snapshotter", "native", "--all-platforms", ref, namespace=ns
    )
    assert res.returncode == 0, res.describe()
    return containerd.image_digest(ns, ref)


# --- tests ----------------------------------------------------------------------------------------


def test_a_token_from_one_replica_is_accepted_by_every_replica(
    group: Group, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    hp, replicas = group.haproxy, group.replicas
    issuer = upstreams["token"].token_issuer
    assert issuer is not None
    marks = [len(r.output()) for r in replicas]
    tok = _token(hp.url, "tok/app")
    wait_until(
        lambda: any("GET /token" in r.output()[m:] for r, m in zip(replicas, marks)),
        10,
        "a replica to log the token request",
    )
    issued_by = [i for i, (r, m) in enumerate(zip(replicas, marks)) if "GET /token" in r.output()[m:]]
    assert len(issued_by) == 1, issued_by
    issuer.clear()
    path = "tok/app/manifests/v1"
    with httpx.Client(timeout=30) as client:
        for _ in range(2 * REPLICAS):
            r = _manifest(client, hp.url, "tok/app", "v1", tok)
            assert r.status_code == 200, r.text
            assert r.headers["docker-content-digest"] == image_digests["token"][(APP, "v1")]

    def served() -> list[int]:
        return [len(_served_ok(r.output()[m:], path)) for r, m in zip(replicas, marks)]

    # Log lines are written once a response is complete: wait for all of them.
    wait_until(lambda: sum(served()) == 2 * REPLICAS, 10, "a log line per request", lambda: str(served()))
    assert all(n > 0 for n in served()), f"a replica served none of the requests: {served()}"
    # The upstream token was inside the proxy's token: no replica had to ask the upstream's issuer.
    assert issuer.requests() == []


def test_pulls_through_haproxy_survive_a_killed_replica(
    group: Group,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    containerd: daemons.Containerd,
    ctr_ns: str,
    tmp_path: Path,
) -> None:
    hp, replicas = group.haproxy, group.replicas
    want = image_digests
    # Before: every replica up; skopeo and ctr pull through HAProxy.
    assert hp.status() == {f"r{i}": "UP" for i in range(REPLICAS)}
    pulled = clients.skopeo_copy(f"{hp.host}/tok/app:multi", tmp_path / "before", all=True, tag="multi").check()
    assert pulled.digest == want["token"][(APP, "multi")]
    assert _ctr_pull(containerd, ctr_ns, f"{hp.host}/anon/app:v1") == want["anonymous"][(APP, "v1")]

    # Kill one replica outright. Its health check is held first (HAProxy keeps counting it up), so
    # that what follows certainly meets the dead replica however slowly this machine runs: round
    # robin sends every third request there, and HAProxy redispatches it to a live one.
    victim = replicas[1]
    tok = _token(hp.url, "tok/app")
    hp.command(f"disable health {BACKEND}/r1")
    os.kill(victim.proc.pid, signal.SIGKILL)
    wait_until(lambda: not victim.running(), 5, "the killed replica to exit")
    before = hp.redispatches("r1")
    with httpx.Client(timeout=30) as client:
        for _ in range(2 * REPLICAS):
            r = _manifest(client, hp.url, "tok/app", "v1", tok)
            assert r.status_code == 200, r.text
    # HAProxy counts a redispatch on the server it gave up on (round robin keeps choosing it).
    assert hp.redispatches("r1") > before, hp.stats()["r1"]

    # The pulls that follow succeed, with skopeo and with containerd, their requests to the dead
    # replica redispatched.
    marks = [len(r.output()) for r in replicas]
    before = hp.redispatches("r1")
    pulled = clients.skopeo_copy(f"{hp.host}/anon/app:v2s2", tmp_path / "after", tag="v2s2").check()
    assert pulled.digest == want["anonymous"][(APP, "v2s2")]
    assert _ctr_pull(containerd, ctr_ns, f"{hp.host}/tok/app:v2s2") == want["token"][(APP, "v2s2")]
    assert hp.redispatches("r1") > before

    # Once its health check runs again, HAProxy marks the dead replica down (and only it).
    hp.command(f"enable health {BACKEND}/r1")
    # HAProxy marked the dead replica down (and only it), and says so in its log.
    hp.wait_status({"r0": "UP", "r1": "DOWN", "r2": "UP"})
    hp.proc.wait_for_output(r"Server replicas/r1 is DOWN", timeout=5)
    pulled = clients.skopeo_copy(f"{hp.host}/tok/app:v1", tmp_path / "down", tag="v1").check()
    assert pulled.digest == want["token"][(APP, "v1")]
    assert _ctr_pull(containerd, ctr_ns, f"{hp.host}/anon/app:multi") == want["anonymous"][(APP, "multi")]
    # The survivors served those pulls with the group's tokens; the dead one logged nothing more.
    for i in (0, 2):
        out = replicas[i].output()[marks[i] :]
        assert re.search(r"/manifests/\S+ mapping=\S+ status=200 .*token=ok$", out, re.MULTILINE), i
    assert victim.output()[marks[1] :] == ""


# --- the container image's command, run here ------------------------------------------------------


def dockerfile_cmd_and_env(text: str) -> tuple[list[str], dict[str, str]]:
    """The exec-form CMD and the ENV of a Dockerfile (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    cmd: list[str] | None = None
    env: dict[str, str] = {}
    for line in joined.splitlines():
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "CMD":
            cmd = json.loads(args)
        elif keyword.upper() == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    assert cmd is not None, "the Dockerfile has no CMD"
    return cmd, env


def _swap(argv: list[str], old: str, new: str) -> list[str]:
    """Replace `old` in the arguments; it must occur in exactly one (the Dockerfile's shape changed else)."""
    hits = [a for a in argv if old in a]
    assert len(hits) == 1, f"{old!r} in {hits}"
    return [a.replace(old, new) for a in argv]


def test_the_dockerfile_cmd_runs_the_server(
    upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests], tmp_path: Path
) -> None:
    cmd, image_env = dockerfile_cmd_and_env(DOCKERFILE.read_text())
    assert cmd[0] == "python"
    # The image's environment, its paths mapped onto the repository and this test's directory.
    config_file = tmp_path / "etc" / "config.yaml"
    config_file.parent.mkdir()
    config_file.write_text(json.dumps(_config(upstreams, secretkey=None)))  # JSON is YAML
    key_file = tmp_path / "secrets" / "secretkey"
    key_file.parent.mkdir()
    key = bytes.fromhex("5b" * 32)
    key_file.write_text(key.hex() + "\n")
    assert image_env["PYTHONPATH"] == "/app/addon" and image_env["HOME"] == "/tmp"
    env = {
        **image_env,
        "PYTHONPATH": str(REPO / "addon"),
        "HOME": str(tmp_path / "tmp"),
        "REGISTRYPROXY_CONFIG": str(config_file),
        "REGISTRYPROXY_SECRETKEY_FILE": str(key_file),
    }
    (tmp_path / "tmp").mkdir()
    base_env = {k: v for k, v in clean_env().items() if not k.startswith(("REGISTRYPROXY_", "PROMETHEUS_"))}

    def start(port: int, ops: int) -> tuple[Proc, int, int]:
        argv = [sys.executable, *cmd[1:]]
        argv = _swap(argv, "0.0.0.0:5000", f"{LOOPBACK}:{port}")
        argv = _swap(argv, "0.0.0.0:9090", f"{LOOPBACK}:{ops}")
        argv = _swap(argv, "=/tmp/", f"={tmp_path}/tmp/")
        server = Proc("dockerfile-cmd").start(argv, env={**base_env, **env}, cwd=tmp_path)
        try:
            # Its own "listening at" lines, not just open ports: both ports were free when picked only.
            proxy.wait_listening(server, port, timeout=30)
            proxy.wait_listening(server, ops, timeout=10)
        except BaseException:
            server.stop()
            sys.stdout.write(f"--- Dockerfile CMD output:\n{server.output()[-3000:]}\n")
            raise
        return server, port, ops

    server, port, ops = with_free_port(lambda port: with_free_port(lambda ops: start(port, ops)))
    try:
        ready = httpx.get(f"http://{LOOPBACK}:{ops}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        alive = httpx.get(f"http://{LOOPBACK}:{ops}/healthz", timeout=10)
        assert alive.status_code == 200 and alive.json()["status"] == "alive"
        base = f"http://{LOOPBACK}:{port}"
        ping = httpx.get(f"{base}/v2/", timeout=10)
        assert ping.status_code == 401
        assert ping.headers["www-authenticate"].startswith(f'Bearer realm="{base}/token"')
        # The ops paths live on the ops port only.
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 404
        # The key came from the file: its tokens open with it and with no other key.
        tok = _token(base, "anon/app")
        TokenCodec((key,)).read_access(tok, base)
        with pytest.raises(TokenError):
            TokenCodec((bytes(32),)).read_access(tok, base)
        pulled = clients.skopeo_copy(f"{LOOPBACK}:{port}/anon/app:v1", tmp_path / "pulled", tag="v1").check()
        assert pulled.digest == image_digests["anonymous"][(APP, "v1")]
        metrics = httpx.get(f"http://{LOOPBACK}:{ops}/metrics", timeout=10)
        assert metrics.status_code == 200 and "registryproxy" in metrics.text
        assert (tmp_path / "tmp" / "mitmproxy").is_dir()  # confdir went where the CMD says
        assert "random one" not in server.output()
    finally:
        server.stop()
        sys.stdout.write(f"--- Dockerfile CMD output:\n{server.output()[-3000:]}\n")


# --- ./run.sh --workers: health checks and metrics shared across the workers ---------------------

PING_COUNT = re.compile(
    r'^registryproxy_requests_total\{(?=[^}]*route="ping")(?=[^}]*status="401")[^}]*\} (\S+)$', re.MULTILINE
)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def test_workers_share_their_metrics_and_are_checked_on_readyz(
    upstreams: dict[str, registry.Upstream], tmp_path: Path
) -> None:
    """`run.sh --workers 2` (regproxy.cli, as run.sh runs it): HAProxy checks GET /readyz, and
    /metrics through either worker counts the requests of both (one PROMETHEUS_MULTIPROC_DIR),
    a directory the supervisor made and removes at exit."""
    config_file = tmp_path / "config.yaml"
    env = {k: v for k, v in clean_env().items() if not k.startswith(("REGISTRYPROXY_", "PROMETHEUS_"))}
    env.update(PYTHONPATH=str(REPO / "addon"), REGISTRYPROXY_CONFIG=str(config_file))
    argv = [sys.executable, "-m", "regproxy.run.cli", "run", "--workers", "2", "--", "--set", "termlog_verbosity=info"]

    def start(port: int) -> tuple[Proc, int]:
        config_file.write_text(json.dumps({"listen_addr": LOOPBACK, "port": port, **_config(upstreams)}))
        group = Proc("workers").start(argv, env=env, cwd=tmp_path)
        try:
            group.wait_for_output(r"2 workers on 127\.0\.0\.1:\d+,\d+ behind HAProxy", timeout=60)
            # HAProxy binds the port; the supervisor exits, with HAProxy's "Address already in use", when
            # something took it first (with_free_port then tries another).
            group.wait_for_port(LOOPBACK, port, timeout=15)
        except BaseException:
            group.stop(timeout=15)
            raise
        return group, port

    group, port = with_free_port(start)
    base = f"http://{LOOPBACK}:{port}"
    try:
        workers = [c for c in _children(group.pid) if "regproxy.run.serve" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        dirs = {_environ(w).get("PROMETHEUS_MULTIPROC_DIR") for w in workers}
        assert len(dirs) == 1 and None not in dirs, dirs
        metrics_dir = Path(str(dirs.pop()))
        assert metrics_dir.is_dir()
        # HAProxy health-checks every worker with GET /readyz, which each answers 200.
        wait_until(lambda: group.output().count("GET /readyz mapping=- status=200") >= 2, 15, "a check per worker")
        # Pings on new connections: HAProxy (TCP mode) spreads them over both workers.
        pings = 8
        for _ in range(pings):
            assert httpx.get(f"{base}/v2/", timeout=10).status_code == 401
        wait_until(lambda: group.output().count("GET /v2/ mapping=- status=401") >= pings, 10, "a log line per ping")
        # Each scrape, whichever worker answers it, counts every ping of the group.
        for _ in range(4):
            scrape = httpx.get(f"{base}/metrics", timeout=10)
            assert scrape.status_code == 200
            counts = [float(v) for v in PING_COUNT.findall(scrape.text)]
            assert sum(counts) == pings, scrape.text[:3000]
        assert list(metrics_dir.glob("*.db")), "the workers wrote no multiprocess files"
    finally:
        group.stop(timeout=15)
        sys.stdout.write(f"--- workers output (tail):\n{group.output()[-3000:]}\n")
    assert not metrics_dir.exists(), "the metrics directory outlived the group"
