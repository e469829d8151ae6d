"""The container image, really built and run: addon/deploy/Dockerfile under a real dockerd, pulls through it.

The image is built offline as README "Container image" says (rig/image_build.py): a Debian trixie base made
with mmdebstrap and imported, the wheels pip-downloaded on the host into the build context, `docker build
--network none`. dockerd and containerd are the rig's (vfs storage, no bridge network), so containers share
the host's network (`--network host` where the README publishes ports with `-p`): the image's ports 5000
and 9090 must be free on this machine.

- The image: its user, ports, health check and command are the Dockerfile's; it is small and its final
  stage holds the base, the virtual environment, the addon and the configuration only.
- README's `docker run` with the configuration and the key mounted from files, as typed there (read-only
  root filesystem, every capability dropped, no new privileges): skopeo and docker pull through it with
  the upstream's digests, its tokens open with the mounted key, it runs as 10001 with no capability,
  docker reports it healthy, it logs each request on stdout, and `docker stop` ends it in a few seconds
  while a 64 MiB blob is being pulled, the pull completing or failing visibly, never hanging.
- README's `docker run` with the key through the environment: the same pulls, tokens under that key.
- The Kubernetes Deployment (addon/deploy/k8s/deployment.yaml) run by docker: its user, groups, read-only
  root, dropped capabilities, environment, volumes (the ConfigMap and the Secret as directories, the key
  file 0440 for the fsGroup, /tmp an emptyDir of its sizeLimit) and CPU/memory limits; its readiness and
  liveness probes answer 200 on the ports it names; pulls work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import yaml
from regproxy.tokens.paseto import TokenCodec, TokenError
from rig import clients, daemons, image_build, registry, standard
from rig.procs import LOOPBACK, StopWaiting, run, wait_until
from rig.standard import APP

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "addon" / "deploy" / "Dockerfile"
DEPLOYMENT = REPO / "addon" / "deploy" / "k8s" / "deployment.yaml"
REGISTRY_PORT = 5000
OPS_PORT = 9090
BASE = f"http://{LOOPBACK}:{REGISTRY_PORT}"
OPS = f"http://{LOOPBACK}:{OPS_PORT}"
HOST = f"{LOOPBACK}:{REGISTRY_PORT}"
USER = (10001, 10001)
# Measured 2026-12-03: 221 MB (the trixie base 118 MB). With the cache's S3 client (aiobotocore, botocore,
# aiohttp and their dependencies: 48 MB installed in .venv, botocore's service data 31 MB of it): 260 MB.
MAX_IMAGE_MB = 300
BIG_BLOB = 64 << 20
BIG_REPO = "platform/imagetest"


def _config(upstreams: dict[str, registry.Upstream]) -> dict[str, Any]:
    tok = upstreams["token"]
    proxies = {
        "anon/": {"registry": upstreams["anonymous"].url, "remote": "platform"},
        "tok/": {"registry": tok.url, "remote": "platform", "username": tok.username, "password": tok.password},
    }
    return {"proxies": proxies}


# --- the image, built once for the module --------------------------------------------------------------


@dataclass
class ImageRig:
    dockerd: daemons.Dockerd
    built: image_build.Built

    def inspect_image(self, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.dockerd.docker_checked("image", "inspect", ref).stdout)[0]
        return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageRig]:
    work = tmp_path_factory.mktemp("image")
    containerd = daemons.start_containerd(work / "containerd")
    dockerd: daemons.Dockerd | None = None
    try:
        dockerd = daemons.start_dockerd(work / "dockerd", containerd)
        built = image_build.build_image(dockerd, work)
        sys.stdout.write(
            f"--- image built: base {built.base_seconds:.1f}s (0: cached), import {built.import_seconds:.1f}s, "
            f"build {built.build_seconds:.1f}s\n"
            + "\n".join(line for line in built.log.splitlines() if re.match(r"#\d+ (DONE|\[)", line))
            + "\n"
        )
        yield ImageRig(dockerd, built)
    finally:
        started = time.monotonic()
        if dockerd is not None:
            left = dockerd.docker("ps", "-aq").stdout.split()
            if left:
                dockerd.docker("rm", "-f", *left, timeout=60)
            dockerd.stop()
        containerd.stop()
        image_build.release(work)
        sys.stdout.write(f"--- daemons stopped and their files removed in {time.monotonic() - started:.1f}s\n")


# --- containers ----------------------------------------------------------------------------------------


@dataclass
class Container:
    dockerd: daemons.Dockerd
    name: str

    def inspect(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.dockerd.docker_checked("container", "inspect", self.name).stdout)[0]
        return out

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> tuple[str, str]:
        """(stdout, stderr) of the container, as `docker logs` separates them."""
        res = self.dockerd.docker("logs", self.name)
        return res.stdout, res.stderr

    def describe(self) -> str:
        out, err = self.logs()
        state = json.dumps(self.inspect()["State"], indent=1)[:3000]
        return f"--- {self.name} state:\n{state}\n--- stdout:\n{out[-4000:]}\n--- stderr:\n{err[-4000:]}"

    def process_status(self) -> dict[str, str]:
        """/proc/PID/status of the container's main process."""
        pid = self.inspect()["State"]["Pid"]
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if not self.running():
                raise StopWaiting(f"the container exited\n{self.describe()}")
            try:
                return httpx.get(f"{OPS}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.name} to answer /readyz", self.describe, interval=0.2)

    def exec_python(self, script: str) -> Any:
        """Run `script` with the image's python in the container; its stdout is JSON."""
        res = self.dockerd.docker("exec", self.name, "python", "-c", script, timeout=60)
        assert res.returncode == 0, res.describe()
        return json.loads(res.stdout)

    def remove(self) -> None:
        self.dockerd.docker("rm", "-f", self.name, timeout=60)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _need_ports() -> None:
    busy = [p for p in (REGISTRY_PORT, OPS_PORT) if not _port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use on this machine; the container shares the host's network and needs them")


def _readme_run(command: str, dockerd: daemons.Dockerd, cwd: Path) -> Container:
    """A README `docker run` as typed there, on this host: the rig's dockerd has no bridge network,
    so `--network host` replaces the `-p` flags (the image's ports are then the host's)."""
    assert command.startswith("docker run ") and " -p " in command, command
    local = re.sub(r"\s-p\s+\S+", "", command)[len("docker run") :]
    _need_ports()
    res = run(
        ["bash", "-c", f"{shlex.quote(daemons.docker_cli())} run --network host{local}"],
        timeout=120,
        cwd=cwd,
        env_extra=dockerd.env(),
    )
    assert res.returncode == 0, f"{res.describe()}\n{dockerd.output_tail()}"
    m = re.search(r"--name[ =](\S+)", command)
    return Container(dockerd, m.group(1) if m else res.stdout.strip())


def _readme_command(*needles: str) -> str:
    commands = image_build.shell_commands(image_build.readme_section("Container image"))
    found = [c for c in commands if all(n in c for n in needles)]
    assert len(found) == 1, f"README 'Container image' has {len(found)} commands with {needles}: {found}"
    return found[0]


def _keygen(cwd: Path) -> bytes:
    """README's `./run.sh keygen > secretkey`, run in `cwd`."""
    command = _readme_command("keygen")
    res = run(["bash", "-c", command.replace("./run.sh", shlex.quote(str(REPO / "run.sh")), 1)], timeout=120, cwd=cwd)
    assert res.returncode == 0, res.describe()
    return bytes.fromhex((cwd / "secretkey").read_text().strip())


def _token(name: str) -> str:
    r = httpx.get(f"{BASE}/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def _assert_tokens_under(key: bytes) -> None:
    """A token the container issues opens with `key`, and with no other key."""
    tok = _token("anon/app")
    TokenCodec((key,)).read_access(tok, BASE)
    with pytest.raises(TokenError):
        TokenCodec((bytes(32),)).read_access(tok, BASE)


def _pulls(
    dockerd: daemons.Dockerd, image_digests: dict[str, standard.Digests], tmp: Path, skopeo: str, docker: str
) -> None:
    """skopeo copies `skopeo` (LOCAL/NAME:TAG) and dockerd pulls `docker` through the container; both keep
    the upstream's digest."""
    kinds = {"anon": "anonymous", "tok": "token"}
    for ref, client in ((skopeo, "skopeo"), (docker, "docker")):
        mapping, _, tag = ref.partition("/app:")
        want = image_digests[kinds[mapping]][(APP, tag)]
        if client == "skopeo":
            pulled = clients.skopeo_copy(f"{HOST}/{ref}", tmp / f"pulled-{mapping}-{tag}", tag=tag).check()
            assert pulled.digest == want
        else:
            res = dockerd.docker("pull", f"{HOST}/{ref}")
            assert res.returncode == 0, f"{res.describe()}\n{dockerd.output_tail()}"
            assert f"{HOST}/{mapping}/app@{want}" in dockerd.repo_digests(f"{HOST}/{ref}")


# --- a large blob, to pull while the container stops ---------------------------------------------------


@dataclass(frozen=True)
class BigBlob:
    upstream: registry.Upstream
    digest: str

    @property
    def mapping(self) -> dict[str, Any]:
        return {"big/": {"registry": self.upstream.url, "remote": "platform"}}


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigBlob]:
    """A 64 MiB blob (monolithic upload) in platform/imagetest of an anonymous upstream of its own (the
    session's upstreams keep their exact catalog), served through the mapping `big/`."""
    up = registry.start_upstream("anonymous", tmp_path_factory.mktemp("big-upstream"))
    try:
        data = random.Random("image-big-blob").randbytes(BIG_BLOB)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with httpx.Client(timeout=60, trust_env=False) as c:
            start = c.post(f"{up.url}/v2/{BIG_REPO}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = httpx.URL(urljoin(f"{up.url}/", start.headers["location"])).copy_add_param("digest", digest)
            done = c.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
        yield BigBlob(up, digest)
    finally:
        up.stop()


def _pull_blob_while_stopping(container: Container, digest: str) -> tuple[str, float, float]:
    """GET the big blob through the container, reading slowly (about 20 MB/s); after the first MiB,
    `docker stop` in another thread. Returns (outcome, seconds docker stop took, seconds from the stop
    until the client's transfer ended)."""
    name = f"big/{BIG_REPO.split('/', 1)[1]}"
    headers = {"Authorization": f"Bearer {_token(name)}"}
    stopped: dict[str, float] = {}

    def stop() -> None:
        t0 = time.monotonic()
        res = container.dockerd.docker("stop", container.name, timeout=60)
        stopped["seconds"] = time.monotonic() - t0
        stopped["rc"] = res.returncode

    got = hashlib.sha256()
    size = 0
    with (
        httpx.Client(timeout=httpx.Timeout(30.0)) as c,
        c.stream("GET", f"{BASE}/v2/{name}/blobs/{digest}", headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        chunks = r.iter_raw(1 << 20)
        first = next(chunks)
        got.update(first)
        size += len(first)
        stopper = threading.Thread(target=stop, name="docker-stop")
        t0 = time.monotonic()
        stopper.start()
        try:
            for chunk in chunks:
                got.update(chunk)
                size += len(chunk)
                time.sleep(0.05)
            outcome = "complete"
        except httpx.HTTPError as e:
            outcome = f"failed ({type(e).__name__})"
        ended = time.monotonic() - t0
    stopper.join(timeout=60)
    assert stopped.get("rc") == 0, stopped
    if outcome == "complete":
        assert size == BIG_BLOB and "sha256:" + got.hexdigest() == digest, "a short blob that looks complete"
    return outcome, stopped["seconds"], ended


# --- the image itself ----------------------------------------------------------------------------------


def _dockerfile_cmd() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    m = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert m, "no CMD in the Dockerfile"
    cmd: list[str] = json.loads(m.group(1))
    return cmd


def test_the_image_is_small_and_holds_the_runtime_only(rig: ImageRig) -> None:
    image = rig.inspect_image(rig.built.tag)
    base = rig.inspect_image(rig.built.base_tag)
    config = image["Config"]
    assert config["User"] == f"{USER[0]}:{USER[1]}"
    assert set(config["ExposedPorts"]) == {f"{REGISTRY_PORT}/tcp", f"{OPS_PORT}/tcp"}
    assert config["Cmd"] == _dockerfile_cmd()
    assert not config.get("Entrypoint")
    health = config["Healthcheck"]["Test"]
    assert health[0] == "CMD" and f"127.0.0.1:{OPS_PORT}/healthz" in " ".join(health)
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONPATH"] == "/app/addon" and env["REGISTRYPROXY_CONFIG"] == "/etc/registryproxy/config.yaml"
    assert env["PATH"].startswith("/opt/registryproxy/bin:")
    # The final stage adds two layers (the virtual environment; the addon and the configuration), no RUN.
    assert len(image["RootFS"]["Layers"]) == len(base["RootFS"]["Layers"]) + 2
    history = rig.dockerd.docker_checked("history", "--no-trunc", "--format", "{{.CreatedBy}}", rig.built.tag)
    assert not [line for line in history.stdout.splitlines() if re.match(r"(/bin/sh -c |RUN )", line)]
    size_mb, base_mb = image["Size"] / 1e6, base["Size"] / 1e6
    sys.stdout.write(f"--- image {size_mb:.0f} MB, base {base_mb:.0f} MB, added {size_mb - base_mb:.0f} MB\n")
    assert size_mb < MAX_IMAGE_MB, f"{size_mb:.0f} MB"
    # Built offline: every dependency came from the wheels in the context, none from an index.
    assert "--no-index" in rig.built.log or "/build/wheels" in rig.built.log


CONTENTS = r"""
import importlib.util, json, os, shutil, sys, mitmproxy.version
try:
    open("/app/addon/written", "w")
    writable = True
except OSError:
    writable = False
found = {
    "python": sys.version.split()[0],
    "executable": sys.executable,
    "mitmproxy": mitmproxy.version.VERSION,
    "tools": [t for t in ("gcc", "cc", "g++", "make", "pip", "pip3", "curl") if shutil.which(t)],
    "modules": [m for m in ("pip", "pytest", "hypothesis", "mypy", "ruff", "setuptools") if importlib.util.find_spec(m)],
    "addon": sorted(set(os.listdir("/app/addon")) - {"__pycache__"}),
    "build_left": os.path.exists("/build"),
    "wheels": [os.path.join(d, f) for d, _, fs in os.walk("/") if not d.startswith("/proc")
               for f in fs if f.endswith(".whl") and "/python-wheels" not in d],
    "root_writable": writable,
    "tmp": os.access("/tmp/mitmproxy", os.W_OK),
}
print(json.dumps(found))
"""


def test_readme_docker_run_with_mounted_config_and_key(
    rig: ImageRig,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    big_blob: BigBlob,
    tmp_path: Path,
) -> None:
    config = _config(upstreams)
    config["proxies"].update(big_blob.mapping)
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    key = _keygen(tmp_path)
    container = _readme_run(_readme_command("docker run", "REGISTRYPROXY_SECRETKEY_FILE"), rig.dockerd, tmp_path)
    try:
        started = time.monotonic()
        container.wait_ready()
        ready_after = time.monotonic() - started
        assert httpx.get(f"{BASE}/v2/", timeout=10).status_code == 401
        _pulls(rig.dockerd, image_digests, tmp_path, skopeo="anon/app:v1", docker="tok/app:v1")
        _assert_tokens_under(key)

        # Non-root, no capability, no new privileges, read-only root filesystem.
        status = container.process_status()
        assert status["Uid"].split() == [str(USER[0])] * 4 and status["Gid"].split() == [str(USER[1])] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and status["NoNewPrivs"] == "1"
        host_config = container.inspect()["HostConfig"]
        assert host_config["ReadonlyRootfs"] is True and host_config["CapDrop"] == ["ALL"]
        found = container.exec_python(CONTENTS)
        sys.stdout.write(f"--- in the image: {json.dumps(found)}\n")
        assert found["python"].startswith(image_build.PYTHON_VERSION + ".")
        assert found["executable"] == "/opt/registryproxy/bin/python"
        assert found["tools"] == [] and found["modules"] == [], found
        assert found["addon"] == ["registryproxy.py", "regproxy"]
        assert not found["build_left"] and found["wheels"] == [] and not found["root_writable"] and found["tmp"]

        # Healthy by docker's own check of /healthz (every 10 s).
        wait_until(
            lambda: container.inspect()["State"]["Health"]["Status"] == "healthy",
            45,
            "docker to report the container healthy",
            container.describe,
            interval=0.5,
        )
        # One line per request on stdout; nothing on stderr but warnings, no traceback.
        out, err = container.logs()
        assert re.search(
            r"^\S+ (?:GET|HEAD) tok/app/manifests/v1 mapping=tok/ status=200 .*token=ok$", out, re.MULTILINE
        ), out
        assert "Traceback" not in out + err and "random one" not in out + err

        # docker stop while a 64 MiB blob streams: the container ends within seconds, exit status 0,
        # and the client's transfer ends too (complete with the right digest, or failed), never hangs.
        outcome, stop_seconds, ended = _pull_blob_while_stopping(container, big_blob.digest)
        sys.stdout.write(
            f"--- ready after {ready_after:.1f}s; docker stop took {stop_seconds:.2f}s; "
            f"the in-flight pull {outcome} {ended:.2f}s after the stop began\n"
        )
        assert stop_seconds < 5, stop_seconds
        assert ended < 10, (outcome, ended)
        state = container.inspect()["State"]
        assert not state["Running"] and state["ExitCode"] == 0 and not state["OOMKilled"], state
        out, err = container.logs()
        assert "Traceback" not in out + err, err[-3000:]
    finally:
        container.remove()


def test_readme_docker_run_with_the_key_in_the_environment(
    rig: ImageRig, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests], tmp_path: Path
) -> None:
    (tmp_path / "config.yaml").write_text(json.dumps(_config(upstreams)))
    key = _keygen(tmp_path)
    container = _readme_run(_readme_command("docker run", "REGISTRYPROXY_SECRETKEY="), rig.dockerd, tmp_path)
    try:
        container.wait_ready()
        env = container.inspect()["Config"]["Env"]
        assert f"REGISTRYPROXY_SECRETKEY={key.hex()}" in env
        _pulls(rig.dockerd, image_digests, tmp_path, skopeo="tok/app:v2s2", docker="anon/app:v2s2")
        _assert_tokens_under(key)
        out, err = container.logs()
        assert "mapping=anon/ status=200" in out and "random one" not in out + err
    finally:
        container.remove()


# --- the Kubernetes Deployment, run by docker ------------------------------------------------------------

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, quantity
    return int(m.group(1)) * _UNITS[m.group(2)]


def _cpus(quantity: str | int) -> str:
    text = str(quantity)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


def _pod_run_args(deployment: dict[str, Any], config_text: str, key_hex: str, tmp: Path) -> list[str]:
    """`docker run` flags for the Deployment's pod: what kubelet would give the container."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    args = ["--user", f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}", "--group-add", str(pod_sc["fsGroup"])]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc["capabilities"]["drop"]:
        args += ["--cap-drop", cap]
    for e in container["env"]:
        args += ["-e", f"{e['name']}={e['value']}"]
    limits = container["resources"]["limits"]
    args += ["--cpus", _cpus(limits["cpu"]), "--memory", str(_bytes(limits["memory"]))]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        vol = volumes[mount["name"]]
        path = mount["mountPath"]
        ro = ":ro" if mount.get("readOnly") else ""
        if "emptyDir" in vol:
            size = _bytes(vol["emptyDir"]["sizeLimit"])
            args += ["--tmpfs", f"{path}:rw,size={size},mode=1777"]  # an emptyDir is world-writable
        elif "configMap" in vol:
            d = tmp / mount["name"]
            d.mkdir()
            (d / "config.yaml").write_text(config_text)  # the ConfigMap's key, this test's mappings
            args += ["-v", f"{d}:{path}{ro}"]
        elif "secret" in vol:
            d = tmp / mount["name"]
            d.mkdir()
            f = d / "secretkey"
            f.write_text(key_hex + "\n")
            os.chown(f, 0, pod_sc["fsGroup"])
            f.chmod(vol["secret"]["defaultMode"])
            args += ["-v", f"{d}:{path}{ro}"]
        else:
            raise AssertionError(f"volume {mount['name']}: no docker equivalent written for {vol}")
    return args


def test_the_kubernetes_deployment_runs_the_image(
    rig: ImageRig, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests], tmp_path: Path
) -> None:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    image = rig.inspect_image(rig.built.tag)["Config"]
    # The manifest and the image agree: user, ports, configuration path, the probes' paths and ports.
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    assert f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}" == image["User"]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert {f"{p}/tcp" for p in ports.values()} == set(image["ExposedPorts"])
    image_env = dict(e.split("=", 1) for e in image["Env"])
    assert {e["name"]: e["value"] for e in spec["env"]}["REGISTRYPROXY_CONFIG"] == image_env["REGISTRYPROXY_CONFIG"]
    assert spec["livenessProbe"]["httpGet"]["path"] in " ".join(image["Healthcheck"]["Test"])

    key = bytes.fromhex("7e" * 32)
    config_text = yaml.safe_dump(_config(upstreams))
    args = _pod_run_args(deployment, config_text, key.hex(), tmp_path)
    _need_ports()
    res = rig.dockerd.docker("run", "-d", "--name", "k8s-pod", "--network", "host", *args, rig.built.tag)
    assert res.returncode == 0, f"{res.describe()}\n{rig.dockerd.output_tail()}"
    container = Container(rig.dockerd, "k8s-pod")
    try:
        container.wait_ready()
        for probe in ("readinessProbe", "livenessProbe"):
            get = spec[probe]["httpGet"]
            port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            r = httpx.get(f"http://{LOOPBACK}:{port}{get['path']}", timeout=spec[probe].get("timeoutSeconds", 1))
            assert r.status_code == 200, (probe, r.text)
        host_config = container.inspect()["HostConfig"]
        assert host_config["Memory"] == _bytes(spec["resources"]["limits"]["memory"])
        assert host_config["NanoCpus"] == int(float(_cpus(spec["resources"]["limits"]["cpu"])) * 1e9)
        status = container.process_status()
        assert str(pod_sc["fsGroup"]) in status["Groups"].split() and int(status["CapEff"], 16) == 0
        multi = clients.skopeo_copy(f"{HOST}/anon/app:multi", tmp_path / "multi", all=True, tag="multi").check()
        assert multi.digest == image_digests["anonymous"][(APP, "multi")]
        # multi: layers this dockerd has not pulled yet (it would skip those of v1 and v2s2, pulled above).
        _pulls(rig.dockerd, image_digests, tmp_path, skopeo="anon/app:v1", docker="tok/app:multi")
        _assert_tokens_under(key)  # the key from the Secret's file, readable through the fsGroup only
        out, err = container.logs()
        assert "registryproxy: 2 mappings loaded" in out and "Traceback" not in out + err
    finally:
        container.remove()
