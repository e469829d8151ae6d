"""A real forward proxy for egress tests: Debian's tinyproxy (`tinyproxy-bin`), run inside a test
namespace (rig/netns.py) so that it, and only it, can reach the namespace's `remote` address.

tinyproxy 1.11 at `LogLevel Connect` writes, per client connection (its own file, not syslog):

    CONNECT   Dec 03 08:36:33.221 [7550]: Connect (file descriptor 5): 198.18.7.1
    CONNECT   Dec 03 08:36:33.235 [7550]: Request (file descriptor 5): CONNECT 198.19.7.1:9443 HTTP/1.1
    CONNECT   Dec 03 08:36:33.267 [7550]: Established connection to host "198.19.7.1" using file descriptor 6.

A CONNECT refused for its credentials (407) has the first two lines, not the third. With
`credentials` the proxy demands them (`BasicAuth`); it serves only the namespace's peer address
(`Allow`), on the namespace's link address, and lets CONNECT reach any port (no `ConnectPort`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .netns import Netns
from .procs import Proc, RigError, port_open, wait_quiet, wait_until

PORT = 3128  # the default; inside the namespace its ports are its own
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")
_FROM = re.compile(r"Connect \(file descriptor (\d+)\): (\S+)$", re.MULTILINE)
_ESTABLISHED = re.compile(r'Established connection to host "([^"]+)"')


@dataclass(frozen=True)
class ProxyLog:
    """What tinyproxy logged since a mark."""

    text: str

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request, in order: `CONNECT host:port`, `GET http://…` (forwarded)."""
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(self.text)]

    @property
    def connects(self) -> list[str]:
        """`host:port` of every CONNECT request, in order."""
        return [target for method, target in self.requests if method == "CONNECT"]

    @property
    def clients(self) -> set[str]:
        """The addresses client connections came from."""
        return {m.group(2) for m in _FROM.finditer(self.text)}

    @property
    def established(self) -> int:
        """Tunnels opened to their destination."""
        return len(_ESTABLISHED.findall(self.text))


class ForwardProxy:
    """tinyproxy in `net`, at `net.link_addr`:`port`. `start()`, `log(since)`, `mark()`, `stop()`."""

    def __init__(
        self, net: Netns, workdir: Path, credentials: tuple[str, str] | None = None, *, port: int = PORT
    ) -> None:
        if shutil.which("tinyproxy") is None:
            raise RigError("tinyproxy not found (Debian package tinyproxy-bin)")
        self.net = net
        self.workdir = workdir
        self.credentials = credentials
        self.port = port
        self.log_path = workdir / "tinyproxy.log"
        self.proc = Proc("tinyproxy")

    @property
    def address(self) -> str:
        return f"{self.net.link_addr}:{self.port}"

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        """`http://[user:password@]ADDRESS` (percent-encoded), with the given credentials."""
        if credentials is None:
            return f"http://{self.address}"
        user, password = (quote(c, safe="") for c in credentials)
        return f"http://{user}:{password}@{self.address}"

    def start(self, timeout: float = 15.0) -> ForwardProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"Port {self.port}",
            f"Listen {self.net.link_addr}",
            f"Allow {self.net.host_addr}",
            "Timeout 60",
            "MaxClients 100",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            "DisableViaHeader Yes",
        ]
        if self.credentials is not None:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        conf = self.workdir / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc.start(self.net.argv("tinyproxy", "-d", "-c", str(conf)), cwd=self.workdir)
        try:
            # Its port is its own (the namespace's address): no other program can take it first.
            self.proc.wait_ready(
                lambda: port_open(self.net.link_addr, self.port), timeout, f"to listen on {self.address}"
            )
        except RigError as e:
            self.stop()
            raise RigError(f"{e}\n--- log:\n{self.log_text()[-4000:]}") from e
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> str:
        return f"{self.proc.describe()}\n--- log:\n{self.log_text()[-4000:]}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """A position in the log; `log(mark)` is what came after it (lines of a request that just
        ended may still be on their way: wait for them with `wait_established`)."""
        return len(self.log_text())

    def log(self, since: int = 0) -> ProxyLog:
        return ProxyLog(self.log_text()[since:])

    def wait_established(self, since: int, count: int, timeout: float = 5.0) -> ProxyLog:
        """The log since `since` once it shows at least `count` established tunnels."""
        wait_until(lambda: self.log(since).established >= count, timeout, f"{count} tunnels", self.describe)
        wait_quiet(lambda: len(self.log_text()), 0.1)  # and anything logged right after
        return self.log(since)

    def stop(self) -> None:
        self.proc.stop()


__all__ = ["PORT", "ForwardProxy", "ProxyLog"]
