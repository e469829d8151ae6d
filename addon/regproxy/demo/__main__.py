"""`./run.sh demo`: the proxy working end to end on this machine, offline.

The demo builds a small image with the standard library alone (an OCI image layout holding
/hello.txt), starts a password-protected upstream `docker-registry` on a free loopback port,
pushes the image there as `library/hello:v1` and `private/hello:v1`, and starts the proxy
(`mitmdump`, or `mitmweb` with `--web`) with two mappings: the namespace `demo/` and a
capability URL `<128 random bits>/hello`, both holding the registry's credentials. It then pulls
through both with skopeo (and docker, when a daemon answers), without credentials, and shows which
mapping served each pull, that the digest is the upstream's, and that an almost-right capability
key gets `NAME_UNKNOWN`.

This module is the story: its steps, the pulls and what it reports. Everything it starts runs in
its own process group and is stopped by process group id; all its files live in one temporary
directory, removed at the end; SIGINT, SIGTERM and SIGHUP at any point stop everything it started and
remove that directory (demo/session.py). The image and the upstream registry are demo/registry.py's,
starting the proxy is demo/proxy.py's.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..run.launch import new_capability
from .proxy import Proxy, served_by, start_proxy
from .registry import MANIFEST_TYPES, TAG, USER, Registry, build_image, http, push, read_hello, start_registry
from .session import PACKAGES, DemoError, Guard, Interrupted, Session, ensure_packages, say

NAMESPACE_KEY = "demo/"
UPSTREAM_PUBLIC = "library/hello"
UPSTREAM_PRIVATE = "private/hello"


# -- the proxy's configuration ------------------------------------------------------------------


def write_config(session: Session, registry: Registry, capability: str) -> Path:
    """The demo's registryproxy config (JSON, which is YAML): the two mappings, a random key."""
    creds = {"registry": f"http://{registry.host}", "username": USER, "password": registry.password}
    config = {
        "secretkey": secrets.token_hex(32),
        "proxies": {
            NAMESPACE_KEY: {**creds, "remote": UPSTREAM_PUBLIC.split("/")[0]},
            f"{capability}/hello": {**creds, "remote": UPSTREAM_PRIVATE},
        },
    }
    path = session.dir / "registryproxy.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


# -- the pulls ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A name to pull through the proxy and what should serve it."""

    local: str  # the name a client asks for
    log_name: str  # how the proxy logs it
    key: str  # the mapping that serves it
    upstream: str  # the upstream repository
    expected: str  # the upstream's digest


def pull_skopeo(session: Session, proxy: Proxy, target: Target, index: int) -> None:
    ref = f"docker://{proxy.host}/{target.local}:{TAG}"
    say(f"  $ skopeo copy --src-tls-verify=false {ref} oci:pull{index}:{TAG}")
    dest = session.dir / f"pull{index}"
    digestfile = session.dir / f"pull{index}.digest"
    start = len(proxy.child.output())
    argv = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--digestfile", str(digestfile)]
    session.check([*argv, ref, f"oci:{dest}:{TAG}"], 120)
    line = served_by(proxy, target.log_name, start)
    _report(target, line, digestfile.read_text().strip())
    say(f"    /hello.txt in the pulled image: {read_hello(dest)!r}")


def _mapping_of(line: str) -> str:
    m = re.search(r"mapping=(\S+)", line)
    return m.group(1) if m else "?"


def _report(target: Target, line: str, digest: str) -> None:
    say(f"    served by mapping {_mapping_of(line)} ({target.key} -> upstream {target.upstream})")
    say(f"    proxy log: {line}")
    if digest != target.expected:
        raise DemoError(f"digest {digest} differs from the upstream's {target.expected}")
    say(f"    digest {digest}: same digest as upstream {target.upstream}:{TAG}")


def almost(capability: str) -> str:
    """The capability key with its last hex digit changed."""
    last = capability[-1]
    return capability[:-1] + ("0" if last != "0" else "1")


def show_refusal(session: Session, proxy: Proxy, capability: str) -> None:
    wrong = f"{almost(capability)}/hello"
    ref = f"docker://{proxy.host}/{wrong}:{TAG}"
    say(f"  $ skopeo copy --src-tls-verify=false {ref} oci:refused:{TAG}   (last digit of the key changed)")
    start = len(proxy.child.output())
    res = session.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{session.dir}/refused"], 60)
    if res.returncode == 0:
        raise DemoError("the proxy served an almost-right capability key")
    say(f"    skopeo failed as it should: {_skopeo_error(res.stderr)}")
    line = served_by(proxy, "<capability?>/hello", start)
    say(f"    proxy log: {line}")
    say(f"    the proxy's answer: {refusal_code(proxy, wrong)} (the same answer as for any name it does not serve)")


def _skopeo_error(stderr: str) -> str:
    """The message of skopeo's last log line (`time=… level=fatal msg="…"`)."""
    lines = stderr.strip().splitlines() or ["(no message)"]
    m = re.search(r'msg="(.*)"\s*$', lines[-1])
    return m.group(1).replace('\\"', '"') if m else lines[-1]


def refusal_code(proxy: Proxy, name: str) -> str:
    """The registry error code the proxy answers for NAME:TAG, asked with a token of its own."""
    query = urllib.parse.urlencode({"service": proxy.host, "scope": f"repository:{name}:pull"})
    status, _, body = http(f"http://{proxy.host}/token?{query}", {})
    token = json.loads(body).get("token", "") if status == 200 else ""
    headers = {"Accept": ", ".join(MANIFEST_TYPES), "Authorization": f"Bearer {token}"}
    status, _, body = http(f"http://{proxy.host}/v2/{name}/manifests/{TAG}", headers)
    try:
        code = json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        code = "?"
    return f"{status} {code}"


def docker_reachable(session: Session) -> str | None:
    """None when a docker daemon answers within a few seconds, else why docker is skipped."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        res = session.run(["docker", "info", "--format", "{{.ServerVersion}}"], 8)
    except DemoError:
        return "`docker info` got no answer within 8s"
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()
        return f"no docker daemon reachable ({why[-1] if why else f'docker info exited {res.returncode}'})"
    return None


def pull_docker(session: Session, proxy: Proxy, target: Target) -> None:
    ref = f"{proxy.host}/{target.local}:{TAG}"
    say(f"  $ docker pull {ref}")
    start = len(proxy.child.output())
    session.check(["docker", "pull", "--quiet", ref], 180)
    try:
        line = served_by(proxy, target.log_name, start)
        fmt = "{{range .RepoDigests}}{{println .}}{{end}}"
        repo_digests = session.check(["docker", "image", "inspect", "--format", fmt, ref], 30).split()
        digest = next((d.split("@", 1)[1] for d in repo_digests if "@" in d), "?")
        _report(target, line, digest)
    finally:
        session.run(["docker", "image", "rm", "--force", ref], 60)  # leave nothing behind in docker either


# -- the demo -----------------------------------------------------------------------------------


def run_demo(session: Session, web: bool) -> Proxy:
    """Every step up to and including the pulls; returns the running proxy."""
    tmp = session.open()
    say(f"[1/5] prerequisites: {', '.join(PACKAGES.values())} found; working in {tmp}")
    digest = build_image(tmp / "image")
    say(f"[2/5] built a sample image (one layer holding /hello.txt) as an OCI layout: {digest}")

    registry = start_registry(session)
    for name in (UPSTREAM_PUBLIC, UPSTREAM_PRIVATE):
        push(session, tmp / "image", registry, name)
    expected = {name: registry.manifest_digest(name) for name in (UPSTREAM_PUBLIC, UPSTREAM_PRIVATE)}
    say(f"[3/5] upstream: docker-registry (pid {registry.child.pid}) at http://{registry.host}, password-protected")
    say(f"      (user {USER}, a random password); pushed {UPSTREAM_PUBLIC}:{TAG} and {UPSTREAM_PRIVATE}:{TAG}")

    capability = new_capability()
    proxy = start_proxy(session, write_config(session, registry, capability), web)
    cap_key = f"{capability}/hello"
    say(f"[4/5] proxy: {proxy.tool} (pid {proxy.child.pid}) listening at {proxy.host}, two mappings:")
    say(f"      {NAMESPACE_KEY:<44} -> {registry.host}/{UPSTREAM_PUBLIC.split('/')[0]}/…  (with the credentials)")
    say(f"      {cap_key:<44} -> {registry.host}/{UPSTREAM_PRIVATE}  (capability URL)")

    namespace_name = f"{NAMESPACE_KEY}hello"
    targets = [
        Target(namespace_name, namespace_name, NAMESPACE_KEY, UPSTREAM_PUBLIC, expected[UPSTREAM_PUBLIC]),
        Target(cap_key, f"<{proxy.labels[cap_key]}>", cap_key, UPSTREAM_PRIVATE, expected[UPSTREAM_PRIVATE]),
    ]
    say("[5/5] pulls through the proxy; the clients have no credentials, the proxy has them:")
    for i, target in enumerate(targets):
        pull_skopeo(session, proxy, target, i)
    show_refusal(session, proxy, capability)
    why_not = docker_reachable(session)
    if why_not is not None:
        say(f"  docker: skipped: {why_not}")
    else:
        for target in targets:
            pull_docker(session, proxy, target)
    return proxy


def wait_web(proxy: Proxy) -> None:
    """Print the mitmweb URL and a pull to try, then wait for a signal (Interrupted)."""
    say()
    say(f"mitmweb: {proxy.web_url}")
    say("  every request of the pulls above is there, with the mapping that served it in its comment")
    say("try a pull, then watch it appear in mitmweb:")
    say(f"  skopeo inspect --tls-verify=false docker://{proxy.host}/{NAMESPACE_KEY}hello:{TAG}")
    say("Press Ctrl-C to stop the proxy and the registry.")
    while proxy.child.alive():
        time.sleep(0.5)
    raise DemoError(f"{proxy.tool} exited; its output:\n{proxy.child.tail()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh demo", description="Show the proxy working end to end, offline.")
    parser.add_argument("--web", action="store_true", help="run the proxy under mitmweb and wait for Ctrl-C")
    args = parser.parse_args(argv)

    guard = Guard()
    guard.install()
    session = Session(guard)
    status = 0
    waiting = False
    try:
        say("registryproxy demo: a local registry, the proxy in front of it, pulls through it (offline)")
        ensure_packages(guard)
        proxy = run_demo(session, args.web)
        if args.web:
            waiting = True
            wait_web(proxy)
    except Interrupted as e:
        say(f"\n{e.args[0]}: stopping")
        status = 0 if waiting else 130
    except DemoError as e:
        say(f"demo failed: {e}")
        status = 1
    finally:
        stopped = session.close()
    if stopped:
        say(f"stopped {', '.join(stopped)}")
    if session.tmp is not None:
        say(f"removed {session.tmp}")
    if status == 0 and not waiting:
        say("demo done: both mappings served the upstream's image, and the wrong key was refused")
    return status


if __name__ == "__main__":
    sys.exit(main())
