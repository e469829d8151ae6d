"""The container image (addon/deploy/Dockerfile), built here offline the way README "Container image" says.

A machine with no network but the package registries builds it in three steps, each the README's command:

1. a base image made from Debian packages: `mmdebstrap` of Debian trixie (its `python3` is 3.13, as in the
   Dockerfile's default `python:3.13-slim-trixie`) with python3, python3-venv and ca-certificates, docs,
   man pages and locales left out, imported with `docker import`;
2. the Python dependencies as wheels, `pip download`ed on the host into `addon/deploy/wheels/` of the build
   context (manylinux wheels for CPython 3.13, whatever Python runs the download);
3. `docker build --network none --build-arg BASE_IMAGE=…`: the Dockerfile installs from those wheels with
   `--no-index` when the directory holds any, so nothing is fetched during the build.

The mirror is the one the host's apt uses (`debian_mirrors`), deb.debian.org elsewhere. The base tarball
and the wheels are cached between runs on one machine (`cache_dir`, keyed by everything that makes them);
a clean machine makes them in about a minute. dockerd is the rig's (rig.daemons: vfs storage, no
bridge), BuildKit on (dockerd 20.10 needs DOCKER_BUILDKIT=1 for it; it reads the Dockerfile's own
`Dockerfile.dockerignore`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .daemons import Dockerd, docker_cli
from .procs import RigError, run

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = "addon/deploy/Dockerfile"  # relative to the build context (the repository root)
WHEELS_DIR = "addon/deploy/wheels"

# --- the README's commands (tests/unit/test_deploy.py checks that the README shows exactly these) -------

SUITE = "trixie"
PYTHON_VERSION = "3.13"  # trixie's python3; the wheels are downloaded for it
BASE_TAG = f"registryproxy-base:{SUITE}"
IMAGE_TAG = "registryproxy"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"

MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
PIP_DOWNLOAD = (
    "pip",
    "download",
    "--only-binary=:all:",
    "--python-version",
    PYTHON_VERSION,
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--dest",
    WHEELS_DIR,
    "--requirement",
    "requirements.txt",
)
DOCKER_BUILD = ("docker", "build", "-f", DOCKERFILE, "-t", IMAGE_TAG, ".")
DOCKER_BUILD_OFFLINE = (
    "docker",
    "build",
    "--network",
    "none",
    "--build-arg",
    f"BASE_IMAGE={BASE_TAG}",
    "-f",
    DOCKERFILE,
    "-t",
    IMAGE_TAG,
    ".",
)


def sources(mirror: str = MIRROR, security: str = SECURITY_MIRROR) -> tuple[str, ...]:
    """mmdebstrap's MIRROR arguments: the release, its updates and its security updates."""
    return (
        f"deb {mirror} {SUITE} main",
        f"deb {mirror} {SUITE}-updates main",
        f"deb {security} {SUITE}-security main",
    )


def mmdebstrap_argv(target: str, mirror: str = MIRROR, security: str = SECURITY_MIRROR) -> list[str]:
    return ["mmdebstrap", *MMDEBSTRAP_OPTIONS, SUITE, target, *sources(mirror, security)]


# --- where the host's apt gets Debian from ---------------------------------------------------------------

APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def debian_mirrors(paths: Sequence[Path] = APT_SOURCES) -> tuple[str, str]:
    """(debian, debian-security) base URLs from the host's apt sources (one-line and deb822 files);
    deb.debian.org for whichever is not found."""
    uris: list[str] = []
    for path in paths:
        files = sorted(path.glob("*.list")) + sorted(path.glob("*.sources")) if path.is_dir() else [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError:
                continue
            uris += re.findall(r"^\s*URIs:\s*(.+)$", text, re.MULTILINE)
            uris += re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE)
    found = [u for line in uris for u in line.split()]
    main = next((u.rstrip("/") for u in found if u.rstrip("/").endswith("/debian")), MIRROR)
    security = next((u.rstrip("/") for u in found if u.rstrip("/").endswith("/debian-security")), SECURITY_MIRROR)
    return main, security


# --- caching between runs ---------------------------------------------------------------------------------

BASE_MAX_AGE = 14 * 86400  # a cached base older than this is made again (it picks up security updates)


def cache_dir() -> Path:
    """$REGISTRYPROXY_TEST_CACHE, else $XDG_CACHE_HOME/registryproxy-tests (~/.cache/…)."""
    explicit = os.environ.get("REGISTRYPROXY_TEST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "registryproxy-tests"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _fresh(path: Path, max_age: float | None) -> bool:
    return path.exists() and (max_age is None or time.time() - path.stat().st_mtime < max_age)


# --- step 1: the base ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    tarball: Path  # the root filesystem, as mmdebstrap wrote it
    python: str  # "3.13": what /usr/bin/python3 points at
    made_seconds: float  # 0 when it came from the cache


def base_python(tarball: Path) -> str:
    """The Python version of a Debian root filesystem tarball (from the /usr/bin/python3 symlink)."""
    with tarfile.open(tarball) as tar:
        for name in ("./usr/bin/python3", "usr/bin/python3"):
            try:
                member = tar.getmember(name)
            except KeyError:
                continue
            m = re.fullmatch(r"python(\d+\.\d+)", Path(member.linkname).name)
            if member.issym() and m:
                return m.group(1)
    raise RigError(f"{tarball}: no /usr/bin/python3 -> python3.N symlink")


def make_base(cache: Path, timeout: float = 480.0) -> Base:
    """The mmdebstrap tarball of the base, from the cache when one no older than BASE_MAX_AGE is there."""
    if shutil.which("mmdebstrap") is None:
        raise RigError("mmdebstrap not found (Debian package mmdebstrap; ./run.sh test installs it)")
    mirror, security = debian_mirrors()
    tarball = cache / f"base-{SUITE}-{_key(*mmdebstrap_argv('TARGET', mirror, security))}.tar"
    started = time.monotonic()
    if not _fresh(tarball, BASE_MAX_AGE):
        cache.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_name(f"partial-{os.getpid()}-{tarball.name}")  # mmdebstrap wants the .tar
        try:
            res = run(mmdebstrap_argv(str(partial), mirror, security), timeout=timeout)
            if res.returncode != 0:
                raise RigError(f"mmdebstrap failed\n{res.describe()[-6000:]}")
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
        for old in cache.glob(f"base-{SUITE}-*.tar"):
            if old != tarball:
                old.unlink(missing_ok=True)
        made = time.monotonic() - started
    else:
        made = 0.0
    return Base(tarball, base_python(tarball), made)


# --- step 2: the wheels ----------------------------------------------------------------------------------


def download_wheels(cache: Path, timeout: float = 300.0) -> Path:
    """A directory holding the wheels of requirements.txt for the image, from PIP_DOWNLOAD run on this
    host (by this Python's pip, from the repository root; only the destination differs)."""
    requirements = (REPO / "requirements.txt").read_bytes()
    wheels = cache / f"wheels-{_key(requirements.decode(), *PIP_DOWNLOAD)}"
    if (wheels / ".complete").exists():
        return wheels
    cache.mkdir(parents=True, exist_ok=True)
    partial = wheels.with_name(f"{wheels.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = [sys.executable, "-m", *PIP_DOWNLOAD]
    argv[argv.index("--dest") + 1] = str(partial)
    res = run(argv, timeout=timeout, cwd=REPO, env_extra={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if res.returncode != 0 or not list(partial.glob("*.whl")):
        shutil.rmtree(partial, ignore_errors=True)
        raise RigError(f"pip download failed\n{res.describe()[-6000:]}")
    (partial / ".complete").write_text("")
    shutil.rmtree(wheels, ignore_errors=True)
    os.replace(partial, wheels)
    for old in cache.glob("wheels-*"):
        if old != wheels and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    return wheels


# --- step 3: the build -----------------------------------------------------------------------------------

# Not part of a checkout a user builds from (or large and never sent: the .dockerignore drops them too).
_NOT_COPIED = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "__pycache__"}


def build_context(dest: Path, wheels: Path) -> Path:
    """A copy of the working tree (as a checkout has it) with the wheels in addon/deploy/wheels/."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in _NOT_COPIED or n.endswith(".pyc")}
        if Path(directory) == REPO / WHEELS_DIR:
            skip |= {n for n in names if n.endswith(".whl")}  # a developer's own offline wheels
        return skip

    shutil.copytree(REPO, dest, ignore=ignore)
    target = dest / WHEELS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for whl in wheels.glob("*.whl"):
        shutil.copy2(whl, target / whl.name)
    return dest


@dataclass(frozen=True)
class Built:
    tag: str
    base_tag: str
    base_seconds: float  # making the base with mmdebstrap; 0 when it came from the cache
    import_seconds: float
    build_seconds: float
    log: str  # BuildKit's plain progress output


def import_base(dockerd: Dockerd, base: Base, timeout: float = 180.0) -> float:
    """`docker import TARBALL BASE_TAG` (the README pipes mmdebstrap into `docker import -`)."""
    started = time.monotonic()
    res = run([docker_cli(), "import", str(base.tarball), BASE_TAG], timeout=timeout, env_extra=dockerd.env())
    if res.returncode != 0:
        raise RigError(f"docker import failed\n{res.describe()}\n{dockerd.output_tail()}")
    return time.monotonic() - started


def build(dockerd: Dockerd, context: Path, timeout: float = 480.0) -> tuple[float, str]:
    """DOCKER_BUILD_OFFLINE in `context`, BuildKit on; (seconds, progress log)."""
    started = time.monotonic()
    argv = [docker_cli(), *DOCKER_BUILD_OFFLINE[1:2], "--progress", "plain", *DOCKER_BUILD_OFFLINE[2:]]
    res = run(argv, timeout=timeout, cwd=context, env_extra={**dockerd.env(), "DOCKER_BUILDKIT": "1"})
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RigError(f"docker build failed\n{res.describe()[-8000:]}\n{dockerd.output_tail()}")
    return time.monotonic() - started, log


def build_image(dockerd: Dockerd, workdir: Path, cache: Path | None = None) -> Built:
    """Steps 1–3 into `dockerd`; the context is made under `workdir`."""
    cache = cache or cache_dir()
    base = make_base(cache)
    if base.python != PYTHON_VERSION:
        raise RigError(f"the {SUITE} base has Python {base.python}, the wheels are for {PYTHON_VERSION}")
    wheels = download_wheels(cache)
    context = build_context(workdir / "context", wheels)
    imported = import_base(dockerd, base)
    seconds, log = build(dockerd, context)
    return Built(IMAGE_TAG, BASE_TAG, base.made_seconds, imported, seconds, log)


# --- the README's commands, read back ---------------------------------------------------------------------

README = REPO / "README.md"


def readme_section(title: str, text: str | None = None) -> str:
    """The body of the README section headed `title` (any level), up to the next heading of the same
    or a higher level (lines in fenced code blocks are never headings)."""
    lines = (README.read_text() if text is None else text).splitlines(keepends=True)
    body: list[str] = []
    level = 0
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) (.*)", line)
        if level and heading and len(heading.group(1)) <= level:
            break
        if level:
            body.append(line)
        elif heading and heading.group(2).strip() == title:
            level = len(heading.group(1))
    if not level:
        raise RigError(f"README has no section {title!r}")
    return "".join(body)


def shell_commands(section: str) -> list[str]:
    """The commands of the ```sh blocks in `section`: continuation lines joined, comment lines dropped,
    a pipeline split into its commands; each as one line of shell text."""
    commands: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            commands += [part.strip() for part in re.split(r"\s\|\s", line)]
    return commands


# --- after dockerd --------------------------------------------------------------------------------------


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    root = path.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].replace("\\040", " "))
        if point == root or point.is_relative_to(root):
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def release(workdir: Path) -> None:
    """Unmount what a stopped dockerd left under its `workdir` (it keeps exec-root/netns/default, a bind
    mount of the host's network namespace, once a container ran) and remove the directory (the vfs
    layers: about 2 GB)."""
    for point in mounts_under(workdir):
        res = run(["umount", str(point)], timeout=30)
        if res.returncode != 0:
            raise RigError(f"could not unmount {point}\n{res.describe()}")
    shutil.rmtree(workdir, ignore_errors=True)
