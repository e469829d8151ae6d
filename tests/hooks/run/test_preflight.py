"""regproxy.run.preflight: the addon's packages in the Python that runs mitmproxy, and the one line when some
are missing (the compatibility check's part is tests/hooks/mitm/test_compat.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from mitmproxy import version as mitmproxy_version
from regproxy.run import preflight

REPO = Path(__file__).resolve().parents[3]


def test_nothing_is_missing_in_the_project_venv() -> None:
    assert preflight.problem() is None


def test_the_runtime_requirements_are_read_by_name() -> None:
    assert preflight.REQUIREMENTS == REPO / "requirements.txt"
    names = preflight.requirements()
    assert names[0] == "mitmproxy"
    assert {"PyYAML", "pyseto", "httpx", "Werkzeug", "prometheus-client", "redis"} <= set(names)


def test_requirement_lines_yield_their_names(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# a comment\n\n-r other.txt\n--index-url https://example.invalid/simple\nA.b_c-d==1.0  # pinned\n"
        "e[extra]>=2; python_version >= '3.12'\nf\n"
    )
    assert preflight.requirements(req) == ["A.b_c-d", "e", "f"]


def test_every_requirement_is_imported_by_the_name_preflight_looks_for() -> None:
    """A distribution whose module is named otherwise needs an IMPORT_NAMES entry, or its absence goes unseen
    where it is on sys.path without metadata."""
    for name in preflight.requirements():
        assert importlib.util.find_spec(preflight.import_name(name)) is not None, name
    assert preflight.import_name("PyYAML") == "yaml"
    assert preflight.import_name("prometheus-client") == "prometheus_client"
    assert preflight.import_name("Werkzeug") == "werkzeug"


def test_missing_names_what_this_python_lacks() -> None:
    assert preflight.missing(["httpx", "PyYAML", "no-such-distribution-here", "pyseto"]) == [
        "no-such-distribution-here"
    ]


def test_the_line_names_every_missing_package_and_how_to_add_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("mitmproxy==12.3.1\nPyYAML==6.0.4\nnot-installed-a==1\nhttpx==0.28.1\nNot_Installed.B==2\n")
    monkeypatch.setattr(preflight, "REQUIREMENTS", req)
    line = preflight.problem()
    assert line is not None and "\n" not in line
    assert line == (
        f"registryproxy: mitmproxy {mitmproxy_version.VERSION}'s Python ({sys.prefix}) lacks the addon's "
        f"packages not-installed-a, Not_Installed.B: add them with `pipx inject mitmproxy -r {req}` "
        f"(or that Python's `pip install -r`), or run ./run.sh once and use {REPO / '.venv' / 'bin' / 'mitmdump'}"
    )


def test_missing_packages_and_an_incompatible_mitmproxy_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("not-installed-a==1\n")
    monkeypatch.setattr(preflight, "REQUIREMENTS", req)
    monkeypatch.setattr(mitmproxy_version, "VERSION", "13.0.0")
    line = preflight.problem()
    assert line is not None and "\n" not in line and line.count("registryproxy: ") == 1
    assert line.startswith("registryproxy: cannot run on mitmproxy 13.0.0 (pyOpenSSL ")
    assert "tested with mitmproxy 12.3.x only; mitmproxy 13.0.0's Python (" in line
    assert "lacks the addon's packages not-installed-a: " in line


def test_without_a_requirements_file_there_is_no_package_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(preflight, "REQUIREMENTS", tmp_path / "absent.txt")
    assert preflight.problem() is None


def test_a_module_the_chain_could_not_import_is_one_line() -> None:
    line = preflight.missing_module(ModuleNotFoundError("No module named 'pyseto'", name="pyseto"))
    assert line == (
        f"registryproxy: the Python that runs mitmproxy ({sys.prefix}) cannot import 'pyseto', which the "
        "addon needs: install the addon's requirements.txt there"
    )
