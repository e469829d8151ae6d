"""Debian trixie's skopeo 1.18 and podman 5.4 (built with sigstore), run beside bookworm's own.

Bookworm's skopeo 1.9.3 and podman 4.3.1 are built with sigstore disabled ("Debian-local change: sigstore
disabled"): they can neither sign with `--sign-by-sigstore-private-key` nor verify a `sigstoreSigned`
requirement. `tests/rig/trixie-tools.sh` (run by `./run.sh test`, and by `ensure()` when its cache is missing)
downloads trixie's pinned packages with apt, verified against the Debian archive keyring, and unpacks them
into `CACHE/root` without installing anything. Trixie's binaries need glibc 2.38 (bookworm has 2.36): the
script sets their ELF interpreter to trixie's loader and their RPATH to trixie's libraries, then bookworm's
(libsubid's own dependencies, libaudit, libsemanage, ..., are bookworm's), so they run as they are, and
podman's re-executions of itself (containers/storage untars a layer in a re-executed, chrooted podman) work.
podman 5 insists on finding netavark (not run for a pull), so trixie's is unpacked too and named in the
containers.conf `podman_containers_conf` gives. Everything else in the suite keeps bookworm's skopeo and podman.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .procs import RigError, run

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "trixie-tools.sh"
CACHE = Path(os.environ.get("TRIXIE_CACHE", "/var/cache/registryproxy-tests/trixie"))
INSTALL_TIMEOUT = 600.0
SKOPEO_VERSION = "1.18.0"
PODMAN_VERSION = "5.4.2"


@dataclass(frozen=True)
class Tools:
    root: Path

    def skopeo(self) -> list[str]:
        return [str(self.root / "usr/bin/skopeo")]

    def podman(self) -> list[str]:
        return [str(self.root / "usr/bin/podman")]

    def podman_containers_conf(self) -> str:
        """A containers.conf that has podman look for its helpers (netavark) in trixie's directories."""
        dirs = ", ".join(f'"{self.root / d}"' for d in ("usr/lib/podman", "usr/libexec/podman"))
        return f"[engine]\nhelper_binaries_dir = [{dirs}]\n"


def _complete(root: Path) -> bool:
    return any(root.glob(".complete-*")) and all((root / "usr/bin" / b).is_file() for b in ("skopeo", "podman"))


def ensure() -> Tools:
    """The unpacked trixie tools, installing them first (bounded by INSTALL_TIMEOUT) when the cache has none."""
    root = CACHE / "root"
    res = run(["bash", str(INSTALL_SCRIPT)], timeout=INSTALL_TIMEOUT, env_extra={"TRIXIE_CACHE": str(CACHE)})
    if res.returncode != 0 or not _complete(root):
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise RigError(f"trixie's skopeo/podman are not available: {last}")
    return Tools(root)
