"""The proxy under demonstration: mitmdump (or mitmweb) with the addon, and what its log says it did.

`start_proxy` runs it on a free loopback port with the demo's configuration, its mitmproxy files kept
in the session's directory, and waits until it listens; `served_by` finds the log line of a pull's
manifest request, which names the mapping that served it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_file
from ..run.launch import LOOPBACK, free_port, mitm_args
from .registry import TAG
from .session import Child, DemoError, Session

PROXY_LISTENING = re.compile(r"listening at 127\.0\.0\.1:(?P<port>\d+)")
WEB_LISTENING = re.compile(r"Web server listening at (?P<url>http://\S+)")


@dataclass
class Proxy:
    child: Child
    port: int
    tool: str
    web_url: str | None
    labels: dict[str, str]  # mapping key -> the label the proxy logs for it

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def start_proxy(session: Session, config_path: Path, web: bool) -> Proxy:
    """mitmdump (or mitmweb) with the addon on a free loopback port; waits for it to listen."""
    try:
        labels = {m.key: m.label for m in load_file(config_path).mappings}
    except ConfigError as e:
        raise DemoError(f"the demo's config was refused: {e}") from None
    tool = "mitmweb" if web else "mitmdump"
    binary = Path(sys.executable).parent / tool
    base = [str(binary), *mitm_args(str(config_path), LOOPBACK, 0), "--set", "flow_detail=0"]
    base += ["--set", f"confdir={session.dir / 'mitmproxy'}"]  # its CA stays in the temp dir
    for attempt in range(3):
        argv = list(base)
        if web:
            argv += ["--set", "web_open_browser=false", "--set", f"web_host={LOOPBACK}"]
            argv += ["--set", f"web_port={free_port()}"]
        child = session.spawn(tool, argv)
        try:
            port = int(child.wait_for(PROXY_LISTENING, 60)["port"])
            web_url = child.wait_for(WEB_LISTENING, 30)["url"] if web else None
            return Proxy(child, port, tool, web_url, labels)
        except DemoError:
            taken = "already in use" in child.output()
            session.stop(child)
            if attempt == 2 or not taken:
                raise
    raise AssertionError("not reached")


def served_by(proxy: Proxy, log_name: str, start: int) -> str:
    """The proxy's log line for the manifest request of LOG_NAME:TAG written after offset `start`."""
    pattern = re.compile(rf"(?:GET|HEAD) {re.escape(log_name)}/manifests/{TAG} mapping=\S+ status=\d+.*$", re.MULTILINE)
    return proxy.child.wait_for(pattern, 10, start).group(0)
