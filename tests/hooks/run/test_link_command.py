"""`./run.sh link` (run/link_command.py): a share link from the configuration's secret key, or one line and 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from regproxy.config import load_file
from regproxy.links import LinkBook
from regproxy.run import cli
from rig.keys import CAP

KEY = "ab" * 32
PROXIES = f"""proxies:
  "bp/":
    registry: http://127.0.0.1:5001
    remote: backplane
  "{CAP}/nginx":
    registry: http://127.0.0.1:5003
    remote: private/nginx
  "{CAP}":
    registry: http://127.0.0.1:5003
    remote: private/whole
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("REGISTRYPROXY_SECRETKEY", "REGISTRYPROXY_SECRETKEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(f"secretkey: '{KEY}'\npublic_url: https://reg.example.com\nlink_max_age: 30d\n{PROXIES}")
    monkeypatch.setenv("REGISTRYPROXY_CONFIG", str(path))
    return path


def printed(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines() if ":" in line)}


def resolve(path: Path, link: str) -> tuple[str, str]:
    config = load_file(path)
    use = LinkBook(config.secretkeys, (m.key for m in config.mappings)).resolve(link)
    assert use is not None
    return use.mapping_key, use.id


def test_a_namespace_link(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    assert cli.main(["link", "bp/", "--expires", "14d", "--note", "acme, until the audit"]) == 0
    out = capsys.readouterr().out
    shown = printed(out)
    link = shown["link"]
    assert resolve(config_file, link) == ("bp/", shown["id"])
    assert shown["pull"] == f"docker pull reg.example.com/{link}/<repository>:<tag>"
    assert shown["note"] == "acme, until the audit"
    expires = time.mktime(time.strptime(shown["expires"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before + 14 * 86400 - 2 <= expires <= time.time() + 14 * 86400 + 1
    assert f"add {shown['id']} to revoked_links" in out


def test_a_repository_link_is_pulled_by_the_keys_last_segment(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["link", f"{CAP}/nginx", "--expires", "2h"]) == 0
    shown = printed(capsys.readouterr().out)
    assert shown["pull"] == f"docker pull reg.example.com/{shown['link']}/nginx:<tag>"
    assert CAP not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["link", "nope/", "--expires", "1d"], "link: nope/ is not a mapping key of the configuration"),
        (["link", "bp/", "--expires", "31d"], "link: --expires 31d is over link_max_age (30d)"),
        (["link", "bp/", "--expires", "soon"], "link: --expires: must be a duration"),
        (["link", CAP, "--expires", "1d"], "link: <capability>: its last segment is secret"),
    ],
)
def test_refusals_are_one_line_and_exit_code_2(
    config_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1
    assert CAP not in captured.err


def test_without_a_secret_key(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file.write_text(PROXIES)
    assert cli.main(["link", "bp/", "--expires", "1d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("link: no secret key configured") and err.count("\n") == 1


def test_the_secret_key_from_the_environment_or_a_key_file(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text(PROXIES)
    monkeypatch.setenv("REGISTRYPROXY_SECRETKEY", KEY)
    assert cli.main(["link", "bp/", "--expires", "1d"]) == 0
    link = printed(capsys.readouterr().out)["link"]
    monkeypatch.delenv("REGISTRYPROXY_SECRETKEY")
    keyfile = tmp_path / "key"
    keyfile.write_text(f"# the key\n{KEY}\n")
    monkeypatch.setenv("REGISTRYPROXY_SECRETKEY_FILE", str(keyfile))
    assert resolve(config_file, link)[0] == "bp/"
    assert cli.main(["link", "bp/", "--expires", "1d"]) == 0
    assert resolve(config_file, printed(capsys.readouterr().out)["link"])[0] == "bp/"


def test_a_bad_configuration_is_one_line(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file.write_text(f"secretkey: 'abc'\n{PROXIES}")
    assert cli.main(["link", "bp/", "--expires", "1d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("link: secretkey: is not hex") and err.count("\n") == 1 and "abc" not in err


def test_only_the_secret_key_and_the_keys_are_read(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping whose password comes from a variable this shell lacks, a CA file elsewhere: still minted."""
    monkeypatch.delenv("RP_LINK_TEST_PASSWORD", raising=False)
    config_file.write_text(
        f"secretkey: '{KEY}'\nproxies:\n  'bp/':\n    registry: https://registry.example.com\n"
        "    username: robot\n    password_env: RP_LINK_TEST_PASSWORD\n    ca_file: /nonexistent/ca.pem\n"
    )
    assert cli.main(["link", "bp/", "--expires", "1d"]) == 0
    assert resolve_key(printed(capsys.readouterr().out)["link"]) == "bp/"


def resolve_key(link: str) -> str:
    use = LinkBook((bytes.fromhex(KEY),), ("bp/",)).resolve(link)
    assert use is not None
    return use.mapping_key
