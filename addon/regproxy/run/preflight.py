"""Before the chain is imported: can this Python and this mitmproxy run it? One line saying why not.

Both entry points ask (`addon/registryproxy.py` for `mitmdump -s`, and the lean master, regproxy.run.serve)
and, when the answer is a line, log it as an error and do not load the chain: mitmproxy then ends its
start-up on that error ("Error logged during startup, exiting...") instead of running a proxy that does
nothing, and nobody sees a traceback. Two checks, one line for all they find:
- the addon's runtime packages (the top-level requirements.txt, mitmproxy aside) can be imported by the
  Python that runs mitmproxy: a mitmproxy of one's own (pipx, a system package) usually lacks them;
- the mitmproxy is one the seam into its internals was tested with, and has all the seam relies on
  (regproxy.mitm.compat).

The requirement lines are read for their names only (`name[extras] op version`, PEP 508): `packaging`,
which would parse them fully, is not a dependency of mitmproxy, so it may not be there. Without a
requirements.txt beside the addon (the container image, which installs it and ships only addon/), there is
no package check; an import error of the chain is then still one line (`missing_module`).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
REQUIREMENTS = REPO / "requirements.txt"
# Distributions whose import name is not their name in lower case with `_` for `-` (PEP 503 names as keys).
IMPORT_NAMES = {"pyyaml": "yaml", "pyopenssl": "OpenSSL"}
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def problem() -> str | None:
    """One line naming everything that keeps the chain from loading here; None when nothing does."""
    from ..mitm import compat  # only mitmproxy.version and the standard library at import

    found = [p for p in (compat.problem(), _packages_problem(compat.mitmproxy_version())) if p is not None]
    if not found:
        return None
    return "registryproxy: " + "; ".join(p.removeprefix("registryproxy: ") for p in found)


def requirements(path: Path | None = None) -> list[str]:
    """The distribution names a requirements file (default: the addon's) asks for (comments, options and blank
    lines skipped)."""
    names: list[str] = []
    for line in (path or REQUIREMENTS).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _NAME.match(line)
        if m:
            names.append(m.group(0))
    return names


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Prometheus_Client` -> `prometheus-client`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def import_name(distribution: str) -> str:
    """The top-level module a distribution installs: `PyYAML` -> `yaml`, `prometheus-client` -> `prometheus_client`."""
    key = normalized(distribution)
    return IMPORT_NAMES.get(key, key.replace("-", "_"))


def missing(distributions: list[str]) -> list[str]:
    """The distributions this Python has neither installed (metadata) nor can import (on sys.path)."""
    return [d for d in distributions if not _installed(d)]


def missing_module(e: ModuleNotFoundError) -> str:
    """The line for an import of the chain that failed on a module outside the addon (no requirements.txt
    told what to check beforehand)."""
    return (
        f"registryproxy: the Python that runs mitmproxy ({sys.prefix}) cannot import {e.name!r}, which the addon "
        "needs: install the addon's requirements.txt there"
    )


def _packages_problem(mitmproxy_version: str) -> str | None:
    if not REQUIREMENTS.is_file():
        return None
    wanted = [d for d in requirements() if normalized(d) != "mitmproxy"]
    lacking = missing(wanted)
    if not lacking:
        return None
    return (
        f"mitmproxy {mitmproxy_version}'s Python ({sys.prefix}) lacks the addon's packages {', '.join(lacking)}: "
        f"add them with `pipx inject mitmproxy -r {REQUIREMENTS}` (or that Python's `pip install -r`), "
        f"or run ./run.sh once and use {REPO / '.venv' / 'bin' / 'mitmdump'}"
    )


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
        return True
    except metadata.PackageNotFoundError:
        pass
    try:
        return importlib.util.find_spec(import_name(distribution)) is not None
    except (ImportError, ValueError):
        return False
