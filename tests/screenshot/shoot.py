"""Screenshots of mitmweb debugging pulls through registryproxy.

    PYTHONPATH=addon:tests .venv/bin/python tests/screenshot/shoot.py [--out PATH]

Starts, all on loopback and under a temporary directory: a token-auth docker-registry with the test
images, an upstream that serves one image but cuts one of its layers mid-body, and mitmweb with the
addon over them (a namespace mapping, a capability mapping, a mapping to the cutting upstream and one
to a dead upstream). skopeo pulls a multi-arch index (every platform), an image, the same image by
its capability name and the image whose layer is cut; a request with a forged token is refused. Then
headless Chromium shoots mitmweb twice (the README shows both):
- PATH (default tests/screenshot/mitmweb.png): one repository's flows (`~comment "demo/app/"`), the
  index selected, its Response tab read by the OCI view: which platforms it lists;
- PATH with `-manifest` before the suffix: the failed pull's flows (`~comment "via flaky/"`), the
  failed layer marked, the manifest selected: its config and layers, to tell which layer failed.
Everything it started is stopped (by process group) and the temporary directory removed, also on
failure.

`start_mitmweb` is also the launcher of tests/e2e/test_mitmweb.py.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from rig import clients, faults, images, registry, standard
from rig.procs import LOOPBACK, Proc, RigError, clean_env, free_port, with_free_port

ADDON_SCRIPT = REPO_ROOT / "addon" / "registryproxy.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "mitmweb.png"
DEAD_TARGET = "http://127.0.0.1:9"
PROXY_LISTENING = re.compile(r"listening at 127\.0\.0\.1:(?P<port>\d+)")
WEB_LISTENING = re.compile(r"Web server listening at http://127\.0\.0\.1:(?P<port>\d+)/")
# The flow list: the addon's comment next to the usual columns.
WEB_COLUMNS = ("icon", "method", "status", "path", "comment", "size", "time")
WINDOW = (1400, 900)
# A fixed capability key for the picture (the screenshot must show its label, never the key).
DEMO_CAP = "3b9e6c1d-2f47-4a85-9c0e-7d1a5b8f2e64"
# What each picture lists: one repository's flows; one mapping's flows (the pull whose layer fails).
INDEX_FILTER = '~comment "demo/app/"'
FAILED_PULL_FILTER = '~comment "via flaky/"'
CUT = "cl-rst"  # the cutting upstream's mode (see rig.faults.ImageServer): half the layer, then a reset


def mitmweb_binary() -> Path:
    """`mitmweb` next to the running interpreter (the project's venv)."""
    return Path(sys.executable).parent / "mitmweb"


@dataclass
class MitmWeb:
    """A running mitmweb with the addon: the proxy port, the web UI port and its password."""

    proc: Proc
    proxy_port: int
    web_port: int
    password: str = field(repr=False)
    config_path: Path

    @property
    def host(self) -> str:
        """The proxy's address, as clients name it ("127.0.0.1:PORT")."""
        return f"{LOOPBACK}:{self.proxy_port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def web_url(self) -> str:
        return f"http://{LOOPBACK}:{self.web_port}"

    def ui_url(self, fragment: str = "/flows") -> str:
        """The UI with the password as `token` (mitmweb then sets its auth cookie) and a route fragment."""
        return f"{self.web_url}/?token={self.password}#{fragment}"

    def api(self, path: str, timeout: float = 30.0) -> httpx.Response:
        """GET one of mitmweb's REST endpoints (e.g. /flows), authenticated with the password."""
        r = httpx.get(
            f"{self.web_url}{path}",
            headers={"Authorization": f"Bearer {self.password}"},
            timeout=timeout,
            trust_env=False,
        )
        r.raise_for_status()
        return r

    def flows(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.api("/flows").json()
        return data

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> int | None:
        return self.proc.stop()


def start_mitmweb(
    config: Mapping[str, Any],
    tmp_dir: Path,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> MitmWeb:
    """Write `config` under `tmp_dir` and run mitmweb with the addon on it, on loopback ports.

    The proxy port is chosen by the kernel (read back from the output); mitmweb needs its web port
    up front, so a free one is picked and the start retried if another process took it meanwhile.
    The UI and its REST API are protected by a random `web_password`.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "registryproxy.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    confdir = tmp_dir / "mitmproxy-conf"
    confdir.mkdir(exist_ok=True)
    password = secrets.token_hex(16)

    def start(web_port: int) -> MitmWeb:
        argv = [
            str(mitmweb_binary()),
            "-s",
            str(ADDON_SCRIPT),
            "--mode",
            f"reverse:{DEAD_TARGET}@{LOOPBACK}:0",
            "--web-host",
            LOOPBACK,
            "--web-port",
            str(web_port),
            "--set",
            "web_open_browser=false",
            "--set",
            f"web_password={password}",
            *[a for c in WEB_COLUMNS for a in ("--set", f"web_columns={c}")],  # a list option: one --set each
            "--set",
            "web_theme=light",
            "--set",
            f"registryproxy_config={config_path}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"confdir={confdir}",
            *extra_args,
        ]
        proc = Proc("mitmweb").start(argv, env=clean_env(env), cwd=tmp_dir)
        try:
            # mitmweb exits saying "address already in use" when the web port was taken: with_free_port
            # then tries another.
            m = proc.wait_for_output(PROXY_LISTENING, timeout)
            proc.wait_for_output(WEB_LISTENING, timeout)
            proc.wait_for_port(LOOPBACK, web_port, timeout)
        except BaseException:
            proc.stop()
            raise
        return MitmWeb(proc, int(m.group("port")), web_port, password, config_path)

    return with_free_port(start)


# --- headless Chromium ------------------------------------------------------------------------


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RigError("chromium not found (Debian package chromium)")
    return found


def screenshot(url: str, out: Path, work: Path, *, budget_ms: int = 8000, timeout: float = 90.0) -> None:
    """Headless Chromium loads `url` and writes a PNG of the window to `out`.

    Chromium runs in its own process group; once its main process exits, the whole group
    (renderers, zygotes) is killed before the main process is reaped, so its pid cannot
    have been reused by then.
    """
    profile = work / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    log_path = work / "chromium.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    argv = [
        chromium_binary(),
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={out}",
    ]
    if os.geteuid() == 0:
        argv.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    argv.append(url)
    with log_path.open("wb") as log:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
    exited = _wait_exit_noreap(p.pid, timeout)
    _kill_group(p.pid)
    rc = p.wait(timeout=10)
    if not exited:
        raise RigError(f"chromium did not finish within {timeout:.0f}s\n{_tail(log_path)}")
    if rc != 0 or not out.exists() or out.stat().st_size == 0:
        raise RigError(f"chromium exited with {rc} and no screenshot at {out}\n{_tail(log_path)}")


def _wait_exit_noreap(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (a zombie, not reaped yet), False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- the scene ----------------------------------------------------------------------------------


def demo_config(up: registry.Upstream, flaky_url: str, dead_port: int) -> dict[str, Any]:
    creds = {"username": up.username, "password": up.password}
    return {
        "secretkey": secrets.token_hex(32),
        "upstream_timeout": 10,
        "proxies": {
            "demo/": {"registry": up.url, "remote": "platform", **creds},
            f"{DEMO_CAP}/app": {"registry": up.url, "remote": standard.APP, **creds},
            "flaky/": {"registry": flaky_url, "remote": "platform"},
            "gone/": {"registry": f"http://{LOOPBACK}:{dead_port}", "remote": "platform"},
        },
    }


def pick_flow(flows: Sequence[Mapping[str, Any]], mapping: str, route: str) -> Mapping[str, Any]:
    """The GET through `mapping` (e.g. `demo/`) whose local path ends with `route`, answered 200."""
    for f in flows:
        comment = str(f.get("comment", ""))
        local = comment.removeprefix("registryproxy: ").split(" ", 1)[0]
        answered = f.get("response", {}).get("status_code") == 200 and f["request"]["method"] == "GET"
        if f" via {mapping} " in comment and local.endswith(route) and answered:
            return f
    summary = "\n".join(f"{f['request']['method']} {f['request']['path']}: {f.get('comment')!r}" for f in flows)
    raise RigError(f"no annotated GET {route} through {mapping} among {len(flows)} flows:\n{summary}")


def manifest_path(out: Path) -> Path:
    """Where the second picture (the manifest of the failed pull) goes, beside `out`."""
    return out.with_name(f"{out.stem}-manifest{out.suffix}")


def flaky_upstream(imgs: standard.TestImages) -> faults.ImageServer:
    """An upstream serving the v1 image whose last layer it cuts mid-body (the others whole)."""
    server = faults.ImageServer.from_layout(imgs.layout, imgs.v1.manifest, images.OCI_MANIFEST, 0)
    whole = {imgs.v1.config.digest, *(layer.digest for layer in imgs.v1.layers[:-1])}
    server.keep_whole = frozenset(whole)
    return server


def shoot(out: Path, *, keep_work: bool = False) -> Path:
    """Build the scene, take both screenshots (`out` and `manifest_path(out)`), clean up; returns `out`."""
    work = Path(tempfile.mkdtemp(prefix="rp-shoot-"))
    up: registry.Upstream | None = None
    flaky: faults.ImageServer | None = None
    web: MitmWeb | None = None
    try:
        imgs = standard.build_test_images(work / "layout")
        up = registry.start_upstream("token", work / "upstream")
        images.push(imgs.layout, "multi", up, standard.APP, "multi", all=True)
        images.push(imgs.layout, "v1", up, standard.APP, "v1")
        flaky = flaky_upstream(imgs)
        web = start_mitmweb(demo_config(up, flaky.url, free_port()), work / "mitmweb")

        clients.skopeo_copy(f"{web.host}/demo/app:multi", work / "pull-multi", all=True, tag="multi").check()
        clients.skopeo_copy(f"{web.host}/demo/app:v1", work / "pull-demo", tag="v1").check()
        clients.skopeo_copy(f"{web.host}/{DEMO_CAP}/app:v1", work / "pull-cap", tag="v1").check()
        failed = clients.skopeo_copy(f"{web.host}/flaky/{CUT}:v1", work / "pull-flaky", tag="v1")
        if failed.returncode == 0:
            raise RigError("a pull whose layer is cut succeeded")
        rc, _, _ = clients.skopeo_inspect(f"{web.host}/gone/app:v1", timeout=60)  # a dead upstream
        if rc == 0:
            raise RigError("a pull from the dead upstream succeeded")
        forged = httpx.get(
            f"{web.url}/v2/demo/app/manifests/v1",
            headers={"Authorization": "Bearer v4.local.forged-token"},
            timeout=30,
            trust_env=False,
        )
        if forged.status_code != 401:
            raise RigError(f"a forged token got {forged.status_code}")

        flows = web.flows()
        index = pick_flow(flows, "demo/", "/manifests/multi")
        screenshot(web.ui_url(_fragment(index, INDEX_FILTER)), out, work)
        manifest = pick_flow(flows, "flaky/", "/manifests/v1")
        screenshot(web.ui_url(_fragment(manifest, FAILED_PULL_FILTER)), manifest_path(out), work)
        return out
    finally:
        if web is not None:
            web.stop()
        if flaky is not None:
            flaky.stop()
        if up is not None:
            up.stop()
        if keep_work:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _fragment(flow: Mapping[str, Any], search: str) -> str:
    """mitmweb's route to a flow's Response tab, with the flow list filtered by `search`."""
    return f"/flows/{flow['id']}/response?s={urllib.parse.quote(search)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (for debugging)")
    args = parser.parse_args(argv)
    try:
        out = shoot(args.out.resolve(), keep_work=args.keep)
    except RigError as e:
        print(f"shoot.py: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {manifest_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
