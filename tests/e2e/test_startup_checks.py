"""The start-up checks under real mitmproxy processes: a mitmproxy the seam does not fit, and a mitmproxy of
one's own whose Python lacks the addon's packages, each end the start-up on one line of ours.

The faults are injected by a wrapper script that changes mitmproxy in memory and then runs mitmproxy's own
entry point (`mitmdump`) or the lean master's (`python -m regproxy.run.serve`), as the console scripts do;
nothing in the addon knows about it. The mitmproxy of one's own is a real one: a throwaway venv with only
`mitmproxy` (at requirements.txt's pin) installed by pip, as `pipx install mitmproxy` would make it. That is
about 15 s here, from the local package index; hiding modules from the project's venv instead would have
tested a finder of ours, not a Python without the packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rig import proxy
from rig.procs import Proc, clean_env, run, run_checked

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ADDON_DIR = REPO / "addon"
LISTEN = ["--mode", f"reverse:{proxy.DEAD_TARGET}@127.0.0.1:0"]
STARTUP_ERROR = "Error logged during startup, exiting..."

FAULTS = {
    "missing target": (
        "from mitmproxy.proxy.layers.http import _http2\ndel _http2.format_error\n",
        "mitmproxy.proxy.layers.http._http2.format_error is missing",
    ),
    "changed signature": (
        "from mitmproxy.proxy.layers.http import _http1\n_http1.should_make_pipe = lambda req, resp: False\n",
        "mitmproxy.proxy.layers.http._http1.should_make_pipe takes (req, resp), expected (request, response)",
    ),
    "version": (
        "from mitmproxy import version\nversion.VERSION = '13.0.0'\n",
        "the proxy is tested with mitmproxy 12.3.x only",
    ),
}
ENTRY = {
    "stock": "from mitmproxy.tools.main import mitmdump\nsys.exit(mitmdump())\n",
    "lean": "import runpy\nrunpy.run_module('regproxy.run.serve', run_name='__main__', alter_sys=True)\n",
}


def registryproxy_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "registryproxy: " in line]


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("master", list(ENTRY))
def test_a_mitmproxy_the_seam_does_not_fit_ends_the_start_up_on_one_line(
    tmp_path: Path, master: str, fault: str
) -> None:
    inject, finding = FAULTS[fault]
    wrapper = tmp_path / "wrapped_mitmproxy.py"
    wrapper.write_text(f"import sys\n{inject}{ENTRY[master]}")
    script = ["-s", str(proxy.ADDON_SCRIPT)] if master == "stock" else []
    argv = [sys.executable, str(wrapper), *script, *LISTEN, "--set", f"confdir={tmp_path / 'conf'}"]
    res = run(argv, timeout=60, env_extra={"PYTHONPATH": str(ADDON_DIR)}, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, res.describe()
    assert "Traceback" not in out, res.describe()
    (line,) = registryproxy_lines(out)
    version = "13.0.0" if fault == "version" else "12.3.1"
    assert (
        line.split("] ", 1)[-1]
        == f"registryproxy: cannot run on mitmproxy {version} (pyOpenSSL {pyopenssl()}): {finding}"
    )
    assert STARTUP_ERROR in out, res.describe()
    if master == "lean":
        assert "listening at" not in out  # ended before the servers came up


def pyopenssl() -> str:
    from importlib import metadata

    return metadata.version("pyOpenSSL")


@pytest.fixture(scope="module")
def own_mitmproxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only mitmproxy in it (requirements.txt's version), as a pipx install makes one."""
    pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("mitmproxy=="))
    venv = tmp_path_factory.mktemp("own-mitmproxy") / "venv"
    run_checked([sys.executable, "-m", "venv", str(venv)], timeout=120)
    run_checked(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", pin],
        timeout=600,
    )
    return venv


def test_a_mitmproxy_without_the_addons_packages_names_them_all_on_one_line_and_runs_once_they_are_added(
    own_mitmproxy: Path, tmp_path: Path
) -> None:
    mitmdump = own_mitmproxy / "bin" / "mitmdump"
    argv = [str(mitmdump), "-s", str(proxy.ADDON_SCRIPT), *LISTEN, "--set", f"confdir={tmp_path / 'conf'}"]
    res = run(argv, timeout=60, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, res.describe()
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, res.describe()
    (line,) = registryproxy_lines(out)
    message = line.split("] ", 1)[-1]
    head = f"registryproxy: mitmproxy 12.3.1's Python ({own_mitmproxy}) lacks the addon's packages "
    assert message.startswith(head), message
    packages = message.removeprefix(head).split(": add them", 1)[0].split(", ")
    # What mitmproxy itself does not bring; Werkzeug, which its Flask does, is there.
    assert {"PyYAML", "pyseto", "httpx", "prometheus-client", "redis"} <= set(packages), message
    assert "Werkzeug" not in packages
    assert message.endswith(
        f": add them with `pipx inject mitmproxy -r {REPO / 'requirements.txt'}` (or that Python's `pip install -r`), "
        f"or run ./run.sh once and use {REPO / '.venv' / 'bin' / 'mitmdump'}"
    )
    assert STARTUP_ERROR in out, res.describe()

    # The addon's requirements added (what `pipx inject` does): the same mitmdump runs the proxy.
    pip = [str(own_mitmproxy / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_checked([*pip, "-r", str(REPO / "requirements.txt")], timeout=600)
    config = tmp_path / "registryproxy.yaml"
    config.write_text("proxies:\n  'x/':\n    registry: http://127.0.0.1:9\n    remote: x\n")
    argv += ["--set", f"registryproxy_config={config}", "--set", "connection_strategy=lazy"]
    p = Proc("own-mitmdump").start(argv, env=clean_env(), cwd=tmp_path)
    try:
        p.wait_for_output(proxy.LISTENING, 30)
        assert p.running(), p.output()
        assert "registryproxy: 1 mappings loaded from registryproxy.yaml: x/" in p.output()
    finally:
        p.stop()
