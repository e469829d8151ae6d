"""The README and docs/ against the repository: links and anchors resolve, the README stays a front door
with a table of contents, and the listings that mirror the code (the chain in order, every module, every
option, every configuration key and environment variable, the paths and test names the text cites) match
it. Pure: files and imports only, no network."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mitmproxy.test import taddons
from regproxy import chain
from regproxy.cache.settings import CACHE_KEYS, S3_KEYS
from regproxy.config import MAPPING_KEYS, SECRET_KEY_ENV, SECRET_KEY_FILE_ENV, loads
from regproxy.config.load import TOP_KEYS
from regproxy.limits.settings import RULE_KEYS, TOP_ONLY_KEYS
from regproxy.ops.metrics import MULTIPROC_ENV
from regproxy.steps.config_loader import CONFIG_ENV
from regproxy.steps.veil import Courier
from regproxy.transport.egress import NO_PROXY_VARIABLES, PROXY_VARIABLES
from rig import image_build

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "addon" / "regproxy"
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 260

# Modules the architecture document names ahead of their arrival from other branches (issue 19). Drop each
# once it exists; until then a path of this set need not exist.

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading, simply: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets `-1`, `-2`, … as on GitHub)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The link and image targets in a file's prose (inline code is not a link)."""
    found: list[str] = []
    for line in prose(path.read_text(encoding="utf-8")):
        found += LINK.findall(CODE_SPAN.sub("", line))
    return found


def section(text: str, heading: str) -> str:
    """The body of the `## ` section titled `heading`, up to the next `## ` heading."""
    lines = text.splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def first_cells(text: str) -> set[str]:
    """The names in backticks in the first cell of every table row."""
    names: set[str] = set()
    for line in text.splitlines():
        cells = line.strip().split("|")
        if line.strip().startswith("|") and len(cells) > 2:
            names |= set(CODE_SPAN.findall(cells[1]))
    return names


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# --- links and the front door ----------------------------------------------------------------------------


def test_every_relative_link_and_anchor_resolves() -> None:
    broken: list[str] = []
    for path in documents():
        for target in links(path):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(REPO)}: {target}"
            if not dest.exists() or not dest.is_relative_to(REPO):
                broken.append(f"{where} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{where} (no such heading)")
    assert broken == []


def test_every_document_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []


def test_the_readme_is_a_front_door_with_a_table_of_contents() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    sections = [line[3:] for line in prose(text) if line.startswith("## ")]
    assert sections[0] == "Contents"
    contents = section(text, "Contents")
    assert [s for s in sections[1:] if f"(#{slug(s)})" not in contents] == []


def test_the_readme_keeps_the_two_commands() -> None:
    block = section(README.read_text(encoding="utf-8"), "The two commands")
    assert "./run.sh         # run the proxy with ./config.yaml" in block
    assert "./run.sh test    # install what the tests need and run the whole suite" in block


def test_the_readmes_minimal_configuration_is_valid() -> None:
    body = section(README.read_text(encoding="utf-8"), "A minimal configuration")
    yaml_text = re.search(r"```yaml\n(.*?)```", body, re.DOTALL)
    assert yaml_text is not None
    environ = {m: "x" for m in re.findall(r"password_env: (\w+)", yaml_text.group(1))}
    config = loads(yaml_text.group(1), environ)
    assert [m.key for m in config.mappings] == ["bp/", "0ebb01be-0a22-4639-898c-bc8c2d20942d/nginx"]


def test_the_readmes_container_commands_are_the_deployment_documents() -> None:
    """tests/rig/image_build.py reads the image commands from the README's "Container image"; the
    deployment document shows the same ones, in the same order."""
    ours = image_build.shell_commands(image_build.readme_section("Container image"))
    theirs = image_build.shell_commands(image_build.readme_section("Container image", doc("deployment.md")))
    assert len(ours) >= 7
    assert ours == theirs[: len(ours)]


# --- the listings that mirror the code ---------------------------------------------------------------------


def test_the_architecture_lists_the_chain_in_order() -> None:
    """docs/architecture.md "The chain": one row per addon of `chain.addons()`, in the chain's order, each
    naming the module that defines it; the `Courier` row (which `Veil` adds) is extra."""
    rows = []
    for line in section(doc("architecture.md"), "The chain").splitlines():
        cells = line.split("|")
        m = re.fullmatch(r"`(\w+)` \(`([\w/]+\.py)`\)", cells[2].strip()) if len(cells) > 3 else None
        if m:
            rows.append((m.group(1), m.group(2)))

    def module(cls: type) -> str:
        return cls.__module__.removeprefix("regproxy.").replace(".", "/") + ".py"

    expected = [(type(a).__name__, module(type(a))) for a in chain.addons()]
    assert [r for r in rows if r[0] != "Courier"] == expected
    assert ("Courier", module(Courier)) in rows


def test_the_architecture_names_every_module() -> None:
    text = doc("architecture.md")
    modules = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py")
    assert len(modules) > 50
    assert [m for m in modules if f"`{m}`" not in text] == []


def test_the_architecture_says_what_every_package_is_for() -> None:
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    described = first_cells(section(doc("architecture.md"), "The packages"))
    assert [p for p in packages if p not in described] == []


def test_the_configuration_lists_every_option() -> None:
    """docs/configuration.md "Options": a row for each option the chain declares."""
    with taddons.context(*chain.addons()) as tctx:
        declared = sorted(o for o in set(tctx.options.keys()) if o.startswith("registryproxy_"))
    assert len(declared) >= 8
    rows = section(doc("configuration.md"), "Options")
    assert [o for o in declared if f"| `{o}` |" not in rows] == []


def test_the_configuration_documents_every_key_the_loader_accepts() -> None:
    text = doc("configuration.md")
    missing = {
        "Top-level keys": sorted(TOP_KEYS - first_cells(section(text, "Top-level keys"))),
        "Mapping keys": sorted(MAPPING_KEYS - first_cells(section(text, "Mapping keys"))),
        "Limits keys": sorted(set(RULE_KEYS + TOP_ONLY_KEYS) - first_cells(section(text, "Limits keys"))),
        "Cache keys": sorted(set(CACHE_KEYS + S3_KEYS) - first_cells(section(text, "Cache keys"))),
    }
    assert missing == {"Top-level keys": [], "Mapping keys": [], "Limits keys": [], "Cache keys": []}


def test_the_configuration_documents_every_environment_variable() -> None:
    names = [CONFIG_ENV, SECRET_KEY_ENV, SECRET_KEY_FILE_ENV, MULTIPROC_ENV, *NO_PROXY_VARIABLES]
    names += [n for spellings in PROXY_VARIABLES.values() for n in spellings]
    documented = set(CODE_SPAN.findall(section(doc("configuration.md"), "Environment variables")))
    assert [n for n in names if n not in documented] == []


# --- paths, modules and tests the text cites ----------------------------------------------------------------


def _cited(token: str) -> str | None:
    """Why a path, module or test a document names in inline code does not exist (None: it does)."""
    path, _, test = token.partition("::")
    path = path.rstrip(",;:.")
    if re.fullmatch(r"regproxy(\.\w+)+", path):
        return None if importlib.util.find_spec(path) is not None else "no such module"
    first = path.split("/")[0]
    if first in ("addon", "tests", "docs"):
        target = REPO / path
    elif first == "regproxy":
        target = REPO / "addon" / path
    elif ("/" in path and first.isidentifier() and (PKG / first).is_dir()) or path == "chain.py":
        target = PKG / path
    elif re.fullmatch(r"\w+\.py", path):
        # A bare file name is one of the tests' (`test_pull.py`); modules are named by their package path.
        found = sorted((REPO / "tests").rglob(path))
        if len(found) != 1:
            return f"{len(found)} files under tests/ of that name (modules are named as package/module.py)"
        target = found[0]
    else:
        return None
    if not target.exists():
        return "no such file"
    if test and not re.search(rf"^\s*(async )?def {re.escape(test)}\(", target.read_text(), re.MULTILINE):
        return "no such test"
    return None


def test_every_path_module_and_test_the_documents_name_exists() -> None:
    wrong: list[str] = []
    for path in documents():
        for line in prose(path.read_text(encoding="utf-8")):
            for span in CODE_SPAN.findall(line):
                for token in re.split(r"[\s,()]+", span):
                    token = token.split("[")[0]  # a parametrized test's id, or an optional part
                    if not token or "<" in token or token.startswith(("::", "/", "$")) or "…" in token:
                        continue
                    why = _cited(token)
                    if why:
                        wrong.append(f"{path.relative_to(REPO)}: `{token}`: {why}")
    assert wrong == []


def test_the_count_of_property_tests_is_the_suites() -> None:
    decorator = re.compile(r"^\s*@given\(", re.MULTILINE)
    given = sum(len(decorator.findall(p.read_text(encoding="utf-8"))) for p in (REPO / "tests").rglob("test_*.py"))
    assert f"| {given} hypothesis property tests in `tests/unit/` |" in doc("security.md")
