"""The deployment files (addon/deploy/): the Dockerfile and the Kubernetes manifests agree with each
other, with the code and with the README.

This reads the files: the Dockerfile instruction by instruction, every YAML document of the manifests
(validated against the Kubernetes API schemas of every version kubernetes-validate ships, strictly: an
unknown field fails), and the README's "Container image" commands. Ports, paths, probes, option and
environment names are checked against the code's source text and the config loader.
tests/e2e/test_image.py builds the image and runs it (the README's commands and the Deployment's pod);
tests/e2e/test_replicas.py runs the Dockerfile's CMD on the host.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import itertools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import all_versions  # type: ignore[import-untyped]
from mitmproxy import options as mitm_options
from regproxy.config import ConfigError, loads, parse_secret_key
from regproxy.run import launch
from rig import image_build

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "addon" / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
K8S = DEPLOY / "k8s"
SOURCE = REPO / "addon" / "regproxy"
REGISTRY_PORT = 5000
OPS_PORT = 9090
DUMMY_KEY = "ab" * 32


# --- reading the files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the (joined) line


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, `\\` continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """Every `ENV K=V …` (the key=value form only)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, eq, value = item.partition("=")
                assert eq, f"ENV without '=': {ins.args}"
                env[key] = value
    return env


def dockerfile_cmd(instructions: list[Instruction]) -> list[str]:
    cmds = [i for i in instructions if i.keyword == "CMD"]
    assert len(cmds) == 1, cmds
    argv = json.loads(cmds[0].args)  # exec form only: no shell between the server and its signals
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    """The defaults of every `ARG NAME=DEFAULT`."""
    found: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            found[name] = default
    return found


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each build stage, FROM first; the last stage is the image."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def copy_parts(ins: Instruction) -> tuple[str | None, list[str], str]:
    """(--from stage or None, sources, destination) of a COPY."""
    parts = shlex.split(ins.args)
    stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
    *sources, dest = [p for p in parts if not p.startswith("--")]
    return stage, sources, dest


def image_path(instructions: list[Instruction], source: str) -> PurePosixPath:
    """Where the context file or directory `source` ends up in the image: its COPY in the build stage,
    then the image stage's `COPY --from=build` of a directory holding it."""
    *build_stages, final = stages(instructions)
    for stage in [*build_stages, final]:
        for ins in stage:
            if ins.keyword != "COPY":
                continue
            frm, sources, dest = copy_parts(ins)
            if frm is None and source in sources:
                is_file = (REPO / source).is_file()
                path = PurePosixPath(dest) / PurePosixPath(source).name if is_file and dest.endswith("/") else None
                path = path or PurePosixPath(dest)
                if stage is final:
                    return path
                for fin in final:
                    if fin.keyword == "COPY":
                        frm2, (src2, *_), dest2 = copy_parts(fin)
                        if frm2 is not None and path.is_relative_to(src2):
                            return PurePosixPath(dest2) / path.relative_to(src2)
                raise AssertionError(f"{source} is copied into a build stage and never into the image")
    raise AssertionError(f"{source} is never copied")


def dockerignore_admits(path: str, rules: list[str]) -> bool:
    """Whether Docker sends `path` (relative to the context) with these .dockerignore rules: the last
    rule matching the path or one of its parent directories decides."""
    admitted = True
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        for prefix in prefixes:
            name = prefix.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(name, pattern[3:])
            ):
                admitted = negated
                break
    return admitted


def set_options(argv: list[str]) -> dict[str, str]:
    """`--set NAME=VALUE` pairs of a mitmproxy command line."""
    found: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "--set":
            name, _, v = value.partition("=")
            found[name] = v
    return found


def flag_value(argv: list[str], flag: str) -> str:
    i = argv.index(flag)
    return argv[i + 1]


def listen_port(spec: str) -> int:
    """The port of a HOST:PORT (or the @HOST:PORT end of a --mode value)."""
    return int(spec.rsplit(":", 1)[1])


def manifest_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                yield path.name, doc


def source_text() -> str:
    return "\n".join(p.read_text() for p in sorted(SOURCE.rglob("*.py")))


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def cmd(instructions: list[Instruction]) -> list[str]:
    return dockerfile_cmd(instructions)


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    """kind/name -> document, over every manifest file."""
    found: dict[str, dict[str, Any]] = {}
    for _, doc in manifest_documents():
        key = f"{doc['kind']}/{doc['metadata']['name']}"
        assert key not in found, f"{key} defined twice"
        found[key] = doc
    return found


@pytest.fixture(scope="module")
def deployment(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    deployments = [d for k, d in docs.items() if k.startswith("Deployment/")]
    assert len(deployments) == 1
    return deployments[0]


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    return port if isinstance(port, int) else named_ports(container)[port]


# --- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_parser_joins_continuations_and_drops_comments() -> None:
    text = '# c\nFROM x:1\n\nCMD ["a", \\\n  # inside\n  "b"]\nenv A=1 B="two words"\n'
    ins = dockerfile_instructions(text)
    assert [i.keyword for i in ins] == ["FROM", "CMD", "ENV"]
    assert dockerfile_cmd(ins) == ["a", "b"]
    assert dockerfile_env(ins) == {"A": "1", "B": "two words"}


def test_base_image_is_an_argument_defaulting_to_the_official_python_slim(instructions: list[Instruction]) -> None:
    assert instructions[0].keyword == "ARG", "BASE_IMAGE must be declared before the first FROM"
    default = dockerfile_args(instructions)["BASE_IMAGE"]
    image, _, tag = default.split("@")[0].partition(":")
    assert image == "python"
    assert re.fullmatch(rf"{re.escape(image_build.PYTHON_VERSION)}(\.\d+)?-slim-{image_build.SUITE}", tag), tag
    froms = [i.args.split() for i in instructions if i.keyword == "FROM"]
    assert [f[0] for f in froms] == ["${BASE_IMAGE}"] * len(froms), "every stage starts from BASE_IMAGE"
    assert len(froms[-1]) == 1, "the image is the last stage"


def test_runs_as_a_non_root_numeric_user(instructions: list[Instruction]) -> None:
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing after USER needs root.
    last_user = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert not [i for i in instructions[last_user:] if i.keyword in ("RUN", "COPY", "ADD", "FROM")]


def test_the_image_stage_only_copies_from_the_build_stage(instructions: list[Instruction]) -> None:
    """No RUN in the image's stage: no compiler, pip cache or wheel can be left there."""
    *build_stages, final = stages(instructions)
    build_names = {st[0].args.split()[-1] for st in build_stages}
    assert not [i for i in final if i.keyword in ("RUN", "ADD")]
    for ins in final:
        if ins.keyword == "COPY":
            assert copy_parts(ins)[0] in build_names, ins


def test_every_copy_source_exists_and_is_sent(instructions: list[Instruction]) -> None:
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = [src for i in instructions if i.keyword == "COPY" for src in copy_parts(i)[1] if "--from" not in i.args]
    assert {"requirements.txt", "addon/", "config.yaml", f"{image_build.WHEELS_DIR}/"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the build context (the repository root)"
        assert dockerignore_admits(src.rstrip("/"), rules), f"COPY {src}: Dockerfile.dockerignore leaves it out"
        if (REPO / src).is_dir():
            for f in (REPO / src).rglob("*.py"):
                if "__pycache__" not in f.parts:
                    assert dockerignore_admits(str(f.relative_to(REPO)), rules), f


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    for left_out in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/unit/test_deploy.py",
        "addon/deploy/k8s/secret.yaml",
        "addon/regproxy/run/__pycache__/cli.cpython-313.pyc",
        "README.md",
        "run.sh",
    ):
        assert not dockerignore_admits(left_out, rules), left_out
    for sent in (
        "requirements.txt",
        "config.yaml",
        "addon/regproxy/run/serve.py",
        "addon/registryproxy.py",
        f"{image_build.WHEELS_DIR}/mitmproxy-12.3.1-py3-none-any.whl",
    ):
        assert dockerignore_admits(sent, rules), sent


def test_offline_wheels_directory_is_kept_empty_in_git(instructions: list[Instruction]) -> None:
    """addon/deploy/wheels/ exists (COPY needs it) and git ignores everything in it but its .gitignore;
    the build installs from it with --no-index when it holds a wheel."""
    ignore = (REPO / image_build.WHEELS_DIR / ".gitignore").read_text().splitlines()
    assert [ln for ln in ignore if ln and not ln.startswith("#")] == ["*", "!.gitignore"]
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "ls /build/*.whl" in runs and "--no-index --find-links /build" in runs
    *build_stages, _ = stages(instructions)
    copies = [copy_parts(i) for st in build_stages for i in st if i.keyword == "COPY"]
    assert [dest for _, sources, dest in copies if f"{image_build.WHEELS_DIR}/" in sources] == ["/build/"]


def test_exposes_the_registry_and_ops_ports(instructions: list[Instruction], cmd: list[str]) -> None:
    exposed = {int(p.split("/")[0]) for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {REGISTRY_PORT, OPS_PORT}
    assert flag_value(cmd, "--mode").endswith(f"@0.0.0.0:{REGISTRY_PORT}")
    assert set_options(cmd)["registryproxy_ops_listen"] == f"0.0.0.0:{OPS_PORT}"


def test_healthcheck_gets_healthz_on_the_ops_port(instructions: list[Instruction], cmd: list[str]) -> None:
    (check,) = [i.args for i in instructions if i.keyword == "HEALTHCHECK"]
    flags, _, argv = check.partition(" CMD ")
    exec_form = json.loads(argv)  # exec form: no shell needed
    assert exec_form[0] == cmd[0] == "python"
    ops = listen_port(set_options(cmd)["registryproxy_ops_listen"])
    assert f"'http://127.0.0.1:{ops}/healthz'" in exec_form[-1]
    assert '"/healthz"' in source_text()
    timing = dict(f.lstrip("-").split("=") for f in flags.split())
    assert set(timing) == {"interval", "timeout", "start-period", "retries"}  # dockerd 20.10 knows these


def test_cmd_runs_the_lean_server_with_the_run_sh_arguments(instructions: list[Instruction], cmd: list[str]) -> None:
    assert cmd[:4] == ["python", "-O", "-m", "regproxy.run.serve"]
    env = dockerfile_env(instructions)
    assert PurePosixPath(env["PYTHONPATH"]) == image_path(instructions, "addon/")
    assert env["PATH"].split(":")[0] == "/opt/registryproxy/bin", "python is the virtual environment's"
    assert (REPO / "addon" / "regproxy" / "run" / "serve.py").is_file()
    # What ./run.sh passes the lean server (launch.mitm_args), but the config path comes from the environment.
    expected = launch.mitm_args("UNUSED", "0.0.0.0", REGISTRY_PORT, script=False)
    i = expected.index("registryproxy_config=UNUSED")
    expected = expected[: i - 1] + expected[i + 1 :]
    pairs = list(zip(cmd[4::2], cmd[5::2]))
    assert len(cmd[4:]) % 2 == 0
    for flag, value in zip(expected[::2], expected[1::2]):
        assert (flag, value) in pairs, f"CMD lacks {flag} {value}"
    assert "registryproxy_config" not in set_options(cmd)


def lean_master_options() -> set[str]:
    """Every option the lean server (regproxy.run.serve) knows, its addons' included."""
    from regproxy.run.serve import RegistryProxyMaster

    loop = asyncio.new_event_loop()
    try:
        opts = mitm_options.Options()
        RegistryProxyMaster(opts, loop=loop, with_termlog=False)
        return set(opts.keys())
    finally:
        loop.close()


def test_cmd_options_exist(cmd: list[str]) -> None:
    known = lean_master_options()
    src = source_text()
    for name in set_options(cmd):
        assert name in known, f"--set {name}: the lean server has no such option"
        if name.startswith("registryproxy_"):
            assert re.search(rf"[\"']{name}[\"']", src), f"{name} is not named in the addon's source"


def test_env_names_and_paths_agree_with_the_code(instructions: list[Instruction]) -> None:
    env = dockerfile_env(instructions)
    src = (SOURCE / "config" / "load.py").read_text() + (SOURCE / "steps" / "config_loader.py").read_text()
    for name in ("REGISTRYPROXY_CONFIG", "REGISTRYPROXY_SECRETKEY", "REGISTRYPROXY_SECRETKEY_FILE"):
        assert f'"{name}"' in src, f"{name} is not read by config/load.py or steps/config_loader.py"
    assert PurePosixPath(env["REGISTRYPROXY_CONFIG"]) == image_path(instructions, "config.yaml")
    # mitmproxy writes its CA under confdir: under HOME/tmp, the path the Deployment makes writable.
    assert set_options(dockerfile_cmd(instructions))["confdir"].startswith("/tmp/")


# --- the README's commands -------------------------------------------------------------------------------


def _readme_commands() -> list[list[str]]:
    section = image_build.readme_section("Container image")
    return [shlex.split(c) for c in image_build.shell_commands(section)]


def _without_env_prefix(argv: list[str]) -> list[str]:
    """A command without leading `NAME=VALUE` assignments (`DOCKER_BUILDKIT=1 docker build …`)."""
    i = 0
    while i < len(argv) and re.fullmatch(r"[A-Z_]+=\S*", argv[i]):
        i += 1
    return argv[i:]


def test_readme_shows_the_build_commands_the_image_test_runs() -> None:
    """The README's build commands, online and offline, are the ones tests/e2e/test_image.py runs
    (rig/image_build.py): the same programs with the same arguments."""
    commands = [_without_env_prefix(c) for c in _readme_commands()]
    assert list(image_build.DOCKER_BUILD) in commands
    assert list(image_build.PIP_DOWNLOAD) in commands
    assert image_build.mmdebstrap_argv("-") in commands
    assert ["docker", "import", "-", image_build.BASE_TAG] in commands
    assert list(image_build.DOCKER_BUILD_OFFLINE) in commands
    offline = next(
        c
        for c in _readme_commands()
        if c[-len(image_build.DOCKER_BUILD_OFFLINE) :] == list(image_build.DOCKER_BUILD_OFFLINE)
    )
    assert offline[0] == "DOCKER_BUILDKIT=1", "dockerd 20.10 reads Dockerfile.dockerignore with BuildKit only"


def test_readme_run_commands_match_the_image(instructions: list[Instruction]) -> None:
    runs = [c for c in _readme_commands() if c[:2] == ["docker", "run"]]
    assert len(runs) == 2
    env = dockerfile_env(instructions)
    for argv in runs:
        assert argv[-1] == image_build.IMAGE_TAG
        assert {"--read-only", "--cap-drop"} <= set(argv) and "/tmp" in argv
        published = {a.rsplit(":", 1)[-1] for flag, a in itertools.pairwise(argv) if flag == "-p"}
        assert published == {str(REGISTRY_PORT), str(OPS_PORT)}
        mounts = [a.split(":") for flag, a in itertools.pairwise(argv) if flag == "-v"]
        assert ["$PWD/config.yaml", env["REGISTRYPROXY_CONFIG"], "ro"] in mounts
    key_file = next(a for flag, a in itertools.pairwise(runs[0]) if flag == "-e").split("=", 1)
    assert key_file[0] == "REGISTRYPROXY_SECRETKEY_FILE"
    assert [m for flag, m in itertools.pairwise(runs[0]) if flag == "-v" and m.split(":")[1] == key_file[1]]
    assert ["-e", "REGISTRYPROXY_SECRETKEY=$(cat secretkey)"] == [a for a in runs[1] if "SECRETKEY" in a or a == "-e"]


# --- the Kubernetes manifests --------------------------------------------------------------------


def test_manifests_hold_the_expected_objects(docs: dict[str, dict[str, Any]]) -> None:
    kinds = sorted(k.split("/")[0] for k in docs)
    assert kinds == ["ConfigMap", "Deployment", "Secret", "Service", "Service"]
    for key, doc in docs.items():
        assert doc["apiVersion"] in ("v1", "apps/v1"), key
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "registryproxy", key
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


# Every Kubernetes minor version whose API schemas kubernetes-validate (tests/requirements.txt) ships.
K8S_VERSIONS = tuple(f"1.{minor}" for minor in range(25, 38))


def test_the_validator_ships_the_versions_the_readme_names() -> None:
    shipped = {v.rsplit(".", 1)[0] for v in all_versions()}
    assert set(K8S_VERSIONS) <= shipped, sorted(shipped)
    section = " ".join(image_build.readme_section("Kubernetes").split())
    assert f"Kubernetes {K8S_VERSIONS[0]} to {K8S_VERSIONS[-1]}" in section


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_api_schemas(version: str) -> None:
    """Strict validation (an unknown field fails) of every object, as the API server of `version` would
    accept it (kubernetes-validate's JSON schemas from the Kubernetes OpenAPI definitions, offline)."""
    checked = []
    for name, doc in manifest_documents():
        checked.append(f"{name}:{doc['kind']}")
        kubernetes_validate.validate(doc, version, strict=True)
    assert len(checked) == 5, checked


def test_schema_validation_refuses_a_misspelt_field_and_a_wrong_type(deployment: dict[str, Any]) -> None:
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    mistyped = copy.deepcopy(deployment)
    mistyped["spec"]["replicas"] = "three"
    for bad in (misspelt, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_deployment_runs_three_hardened_non_root_replicas(
    deployment: dict[str, Any], container: dict[str, Any], instructions: list[Instruction]
) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = next(i.args for i in instructions if i.keyword == "USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.partition(":")[0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_ports_and_probes_agree_with_the_dockerfile_and_code(container: dict[str, Any], cmd: list[str]) -> None:
    ports = named_ports(container)
    assert sorted(ports.values()) == [REGISTRY_PORT, OPS_PORT]
    assert ports["registry"] == listen_port(flag_value(cmd, "--mode"))
    ops = listen_port(set_options(cmd)["registryproxy_ops_listen"])
    src = source_text()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert resolve_port(container, get["port"]) == ops, probe
        assert get.get("scheme", "HTTP") == "HTTP"  # the ops listener is plain HTTP
        assert f'"{path}"' in src, f"{path} is not served by the addon"


def test_services_expose_the_registry_and_keep_ops_internal(
    docs: dict[str, dict[str, Any]], deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {k: d for k, d in docs.items() if k.startswith("Service/")}
    by_port: dict[int, dict[str, Any]] = {}
    for key, svc in services.items():
        assert svc["spec"]["selector"].items() <= labels.items(), key
        for p in svc["spec"]["ports"]:
            by_port[resolve_port(container, p["targetPort"])] = svc
    assert set(by_port) == {REGISTRY_PORT, OPS_PORT}
    assert by_port[REGISTRY_PORT] is not by_port[OPS_PORT], "the ops port shares the public Service"
    assert by_port[OPS_PORT]["spec"].get("type", "ClusterIP") == "ClusterIP"


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount holding `path` (the longest mountPath that is a parent of it)."""
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing is mounted at {path}"
    mount: dict[str, Any] = max(mounts, key=lambda m: len(m["mountPath"]))
    return mount


def _volume(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    vols = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    assert len(vols) == 1, name
    vol: dict[str, Any] = vols[0]
    return vol


def test_env_vars_point_at_what_the_deployment_mounts(
    docs: dict[str, dict[str, Any]], deployment: dict[str, Any], container: dict[str, Any], cmd: list[str]
) -> None:
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) >= {"REGISTRYPROXY_CONFIG", "REGISTRYPROXY_SECRETKEY_FILE"}
    for var, kind, ref in (
        ("REGISTRYPROXY_CONFIG", "configMap", "name"),
        ("REGISTRYPROXY_SECRETKEY_FILE", "secret", "secretName"),
    ):
        path = PurePosixPath(env[var])
        mount = _mount_for(container, str(path))
        assert mount.get("readOnly") is True, var
        assert "subPath" not in mount, f"{var}: a subPath mount is never updated"
        vol = _volume(deployment, mount["name"])
        assert kind in vol, f"{var} points into volume {mount['name']}, not a {kind}"
        obj = docs[f"{kind[0].upper() + kind[1:]}/{vol[kind][ref]}"]
        data = {**obj.get("data", {}), **obj.get("stringData", {})}
        key = str(path.relative_to(mount["mountPath"]))
        assert key in data, f"{var}: {kind} {vol[kind][ref]} has no key {key}"
    secret_volume = _volume(deployment, _mount_for(container, env["REGISTRYPROXY_SECRETKEY_FILE"])["name"])
    mode = secret_volume["secret"]["defaultMode"]
    fs_group = deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    assert fs_group and mode & 0o040 and not mode & 0o007, oct(mode)  # group-readable, not world-readable
    # mitmproxy's confdir is on a writable volume (the root filesystem is read-only).
    confdir = _mount_for(container, set_options(cmd)["confdir"])
    assert "emptyDir" in _volume(deployment, confdir["name"]) and not confdir.get("readOnly")


def test_configmap_config_loads(docs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    text = docs["ConfigMap/registryproxy-config"]["data"]["config.yaml"]
    config = loads(text, {"REGISTRYPROXY_SECRETKEY": DUMMY_KEY})
    assert config.port == REGISTRY_PORT and config.listen_addr == "0.0.0.0"
    assert config.secretkeys == (bytes.fromhex(DUMMY_KEY),) and not config.generated_key
    assert config.mappings
    # The key from a mounted file, as the Deployment provides it (a Secret file may end in a newline).
    key_file = tmp_path / "secretkey"
    key_file.write_text(DUMMY_KEY + "\n")
    from_file = loads(text, {"REGISTRYPROXY_SECRETKEY_FILE": str(key_file)})
    assert from_file.secretkeys == (bytes.fromhex(DUMMY_KEY),) and not from_file.generated_key
    assert "secretkey" not in yaml.safe_load(text), "the ConfigMap must not hold the secret key"


def test_secret_placeholder_is_marked_and_refused(docs: dict[str, dict[str, Any]]) -> None:
    placeholder = docs["Secret/registryproxy-secretkey"]["stringData"]["secretkey"]
    assert "REPLACE" in placeholder
    with pytest.raises(ConfigError):
        parse_secret_key(placeholder, "REGISTRYPROXY_SECRETKEY_FILE")
