"""The layers of addon/regproxy, read from its imports: the tree shows the architecture, and these keep it so.

- The pure packages import no mitmproxy and nothing of the layers above them (steps, flow, mitm, run,
  debug, demo, the chain).
- mitmproxy's internals (`mitmproxy.proxy`, `mitmproxy.net`, any `_private` name or module) are reached
  from `mitm/` only: the one seam, checked against the tested mitmproxy range at start-up.
- The packages import each other without a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "addon" / "regproxy"

PURE = {"protocol", "config", "mapping", "transport", "upstream", "tokens", "limits", "cache", "links", "ops", "policy"}
ABOVE_PURE = {"steps", "flow", "mitm", "run", "debug", "demo", "chain"}
# mitmproxy's addon API, open to every layer that may import mitmproxy at all.
PUBLIC = {
    "mitmproxy",
    "mitmproxy.http",
    "mitmproxy.ctx",
    "mitmproxy.exceptions",
    "mitmproxy.connection",
    "mitmproxy.tls",
    "mitmproxy.hooks",
    "mitmproxy.contentviews",
    "mitmproxy.addonmanager",
    "mitmproxy.test",
}
# Building a master of one's own (the lean server) is mitmproxy's tools API: for run/ only.
MASTER = {"mitmproxy.master", "mitmproxy.options", "mitmproxy.addons", "mitmproxy.tools", "mitmproxy.tools.main"}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield ".".join(rel.with_suffix("").parts), path


def package_of(module: str) -> str:
    """`steps.routing` -> `steps`; top-level modules (`chain`, `__init__`) are their own package."""
    return module.split(".")[0]


def imports(module: str, path: Path) -> Iterator[tuple[str, str]]:
    """(imported module, imported name or '') for every import, relative ones resolved inside regproxy."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module.split(".")
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(["regproxy", *base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                yield target, alias.name


def regproxy_target(target: str, name: str) -> str | None:
    """The regproxy package an import reaches (`from regproxy.flow import state` -> `flow`)."""
    if target == "regproxy":
        return name
    if target.startswith("regproxy."):
        return target.split(".")[1]
    return None


def test_pure_packages_import_no_mitmproxy_and_nothing_above_them() -> None:
    wrong = []
    for module, path in modules():
        if package_of(module) not in PURE:
            continue
        for target, name in imports(module, path):
            reached = regproxy_target(target, name)
            if target.split(".")[0] == "mitmproxy" or reached in ABOVE_PURE:
                wrong.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert wrong == []


def test_mitmproxy_internals_are_reached_from_the_seam_only() -> None:
    wrong = []
    for module, path in modules():
        if package_of(module) == "mitm":
            continue
        allowed = PUBLIC | (MASTER if package_of(module) == "run" else set())
        for target, name in imports(module, path):
            if target.split(".")[0] != "mitmproxy":
                continue
            private = any(part.startswith("_") for part in target.split(".")) or name.startswith("_")
            submodule = f"{target}.{name}" if target == "mitmproxy" else target
            if private or (submodule not in allowed and target not in allowed):
                wrong.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert wrong == []


def test_the_packages_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in modules():
        pkg = package_of(module)
        for target, name in imports(module, path):
            reached = regproxy_target(target, name)
            if reached is not None and reached != pkg and reached != "__init__":
                graph.setdefault(pkg, set()).add(reached)
    done: set[str] = set()

    def visit(pkg: str, trail: list[str]) -> None:
        if pkg in trail:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(pkg) :], pkg]))
        if pkg in done:
            return
        for nxt in sorted(graph.get(pkg, ())):
            visit(nxt, [*trail, pkg])
        done.add(pkg)

    for pkg in sorted(graph):
        visit(pkg, [])
    assert "steps" not in {p for pkg in PURE for p in graph.get(pkg, ())}
