"""The project's addon under a real `mitmdump`, on a free port picked by the kernel.

mitmdump 12.3.1 prints, once listening (reverse mode, default target 127.0.0.1:9):
    [08:17:44.078] reverse proxy to http://127.0.0.1:9 listening at 127.0.0.1:60107.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .procs import ADDRESS_IN_USE, LOOPBACK, Proc, RigError, clean_env

REPO_ROOT = Path(__file__).resolve().parents[2]
ADDON_SCRIPT = REPO_ROOT / "addon" / "registryproxy.py"
DEAD_TARGET = "http://127.0.0.1:9"
LISTENING = re.compile(r"listening at (?P<host>127\.0\.0\.1|\[?[0-9a-f:.]+\]?):(?P<port>\d+)")


def wait_listening(proc: Proc, port: int, timeout: float = 30.0) -> None:
    """Until mitmdump, or the addon's ops listener, says it listens at 127.0.0.1:PORT: its own line, so
    never another program that took the port. A port taken first ends the wait with a RigError saying
    "address already in use" (mitmdump exits; the ops listener logs it and stays down), on which
    `procs.with_free_port` tries another port."""
    pattern = re.compile(rf"listening at {re.escape(LOOPBACK)}:{port}\b|{ADDRESS_IN_USE}", re.IGNORECASE)
    m = proc.wait_for_output(pattern, timeout)
    if m.group(0).lower() == ADDRESS_IN_USE:
        raise RigError(f"{proc.name}: 127.0.0.1:{port}: {ADDRESS_IN_USE}\n{proc.describe()}")


def mitmdump_binary() -> Path:
    """`mitmdump` next to the running interpreter (the project's venv)."""
    return Path(sys.executable).parent / "mitmdump"


@dataclass
class ProxyProc:
    proc: Proc
    port: int
    config_path: Path
    env: dict[str, str] = field(default_factory=dict)  # what start_proxy added to the environment

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def output(self) -> str:
        return self.proc.output()

    def wait_for_output(self, regex: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        return self.proc.wait_for_output(regex, timeout)

    def wait_quiet(self, quiet: float = 0.2, timeout: float = 10.0) -> bool:
        """Until mitmdump's output has not grown for `quiet` s: its lines about a request just answered."""
        return self.proc.wait_quiet(quiet, timeout)

    def running(self) -> bool:
        return self.proc.running()

    def stop(self) -> int | None:
        return self.proc.stop()


def start_proxy(
    config: Mapping[str, Any],
    tmp_dir: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    script: Path = ADDON_SCRIPT,
    confdir: Path | None = None,
    timeout: float = 30.0,
) -> ProxyProc:
    """Write `config` as YAML under `tmp_dir` and run mitmdump with the addon `script` on it.

    `env` adds to (and overrides) the environment, which otherwise is this process's without
    *_proxy variables. mitmproxy's confdir (its CA) goes under `tmp_dir` unless `confdir` is given.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "registryproxy.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    conf = confdir if confdir is not None else tmp_dir / "mitmproxy-conf"
    conf.mkdir(parents=True, exist_ok=True)
    defaults = {
        "connection_strategy": "lazy",
        "registryproxy_config": str(config_path),
        "flow_detail": "0",
        "termlog_verbosity": "info",
        "confdir": str(conf),
    }
    overridden = {a.split("=", 1)[0] for a in extra_args if "=" in a}
    argv = [str(mitmdump_binary()), "-s", str(script), "--mode", f"reverse:{DEAD_TARGET}@{LOOPBACK}:0"]
    for key, value in defaults.items():
        if key not in overridden:  # mitmdump refuses an option set twice
            argv += ["--set", f"{key}={value}"]
    argv += extra_args
    proc = Proc("mitmdump").start(argv, env=clean_env(env), cwd=tmp_dir)
    try:
        m = proc.wait_for_output(LISTENING, timeout)
    except BaseException:
        proc.stop()
        raise
    return ProxyProc(proc, int(m.group("port")), config_path, dict(env or {}))
