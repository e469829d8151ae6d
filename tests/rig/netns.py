"""A network namespace joined to this one by a veth pair: test hosts under real, non-loopback addresses.

The proxy never sends loopback traffic through a forward proxy (transport/egress.py), so egress tests need
upstreams under another address, one that still never leaves the machine:

    this (host) namespace                       namespace NAME (made here, removed by close())
    veth HOST_IF  host_addr  198.18.I.1/30 <--> veth NS_IF  link_addr  198.18.I.2/30
                                                lo:         remote     198.19.I.1/32

- `link_addr` is reachable from here (the forward proxy listens there);
- `remote` (where the upstream's servers listen) is reachable only from inside the namespace, so
  only through a forward proxy running there: its route here is `prohibit`, so a direct connect
  fails at once (EACCES) and nothing is ever sent towards the machine's default route.
  `direct(True)` routes it over the veth instead (for NO_PROXY tests), `direct(False)` forbids it
  again.

198.18.0.0/15 is reserved for network tests (RFC 2544): no real host has these addresses. I is the
first index whose addresses and names are unused, so concurrent runs do not collide.

Names: `create(hostnames=...)` makes those names resolve to `remote` for programs run inside with
`argv(...)` (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts), and only for them: here
they resolve to nothing, so a proxy that reaches them must leave the resolving to its forward proxy.

Servers: `relay(...)` makes a `rig.relay.Relay` whose listening socket is created inside the
namespace (on `remote`, a kernel-chosen port) while its thread, and so its connections to its
target, stay in this namespace: a server of this process (127.0.0.1) exposed at `remote:PORT`.
Programs run inside with `argv(...)` (`ip netns exec NAME ...`); stop them before `close()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from .procs import RigError
from .relay import Relay

T = TypeVar("T")
PREFIX = "rpeg"  # names: namespace rpeg-I, interfaces rpeg-I-h / rpeg-I-n
MAX_INDEX = 250
ETC_NETNS = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if check and res.returncode != 0:
        raise RigError(f"ip {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def _in_use(index: int) -> bool:
    addrs = _ip("-o", "addr").stdout + _ip("route").stdout + _ip("netns", "list").stdout
    return any(s in addrs for s in (f"198.18.{index}.", f"198.19.{index}.", f"{PREFIX}-{index}"))


class Netns:
    """See the module docstring. `Netns.create()`, then `close()` (also on error: it is idempotent)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"{PREFIX}-{index}"
        self.host_if = f"{PREFIX}-{index}-h"
        self.ns_if = f"{PREFIX}-{index}-n"
        self.host_addr = f"198.18.{index}.1"
        self.link_addr = f"198.18.{index}.2"
        self.remote = f"198.19.{index}.1"
        self.etc = ETC_NETNS / self.name  # files `ip netns exec` mounts over /etc's
        self._direct: bool | None = None
        self._relays: list[Relay] = []
        self._closed = False

    @classmethod
    def create(cls, hostnames: Sequence[str] = ()) -> Netns:
        if os.geteuid() != 0:
            raise RigError("network namespaces need root")
        for index in range(1, MAX_INDEX):
            if _in_use(index):
                continue
            net = cls(index)
            if _ip("netns", "add", net.name, check=False).returncode != 0:
                continue  # taken meanwhile
            try:
                net._wire()
                if hostnames:
                    net._hosts(hostnames)
            except BaseException:
                net.close()
                raise
            return net
        raise RigError("no free 198.18.I.0/30 for a test namespace")

    def _wire(self) -> None:
        n = self.name
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", n)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", n, "addr", "add", f"{self.link_addr}/30", "dev", self.ns_if)
        _ip("-n", n, "link", "set", self.ns_if, "up")
        _ip("-n", n, "link", "set", "lo", "up")
        _ip("-n", n, "addr", "add", f"{self.remote}/32", "dev", "lo")
        self.direct(False)

    def _hosts(self, hostnames: Sequence[str]) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{self.remote} {' '.join(hostnames)}"]
        (self.etc / "hosts").write_text("\n".join(lines) + "\n")

    # -- routing ------------------------------------------------------------------------------
    def direct(self, allowed: bool) -> None:
        """Whether this namespace can reach `remote` directly (over the veth) or not at all."""
        route = ["via", self.link_addr, "dev", self.host_if] if allowed else []
        kind = [] if allowed else ["prohibit"]
        _ip("route", "replace", *kind, f"{self.remote}/32", *route)
        self._direct = allowed

    # -- running things inside ----------------------------------------------------------------
    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def inside(self, fn: Callable[[], T]) -> T:
        """`fn()` on a thread that entered the namespace (sockets it creates live there); the
        thread ends with it, so no other code ever runs in the namespace."""
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                with open(f"/run/netns/{self.name}", "rb") as f:
                    os.setns(f.fileno(), os.CLONE_NEWNET)
                result.append(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error.append(e)

        t = threading.Thread(target=run, name=f"netns-{self.name}")
        t.start()
        t.join(30)
        if error:
            raise error[0]
        if not result:
            raise RigError(f"nothing came back from namespace {self.name}")
        return result[0]  # type: ignore[no-any-return]

    def relay(self, name: str, *, host: str | None = None, **kw: Any) -> Relay:
        """A Relay (not started) listening at `host` (default `remote`):PORT inside the namespace;
        `kw` as Relay's (server_tls, client_tls, server_hostname). Stopped by close()."""
        r = self.inside(lambda: Relay(name=name, host=host or self.remote, **kw))
        self._relays.append(r)
        return r

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the relays, remove the route, the veth pair and the namespace (idempotent).
        Processes started with argv() must be stopped first."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for r in self._relays:
            try:
                r.stop()
            except Exception as e:  # noqa: BLE001 - go on removing the rest
                errors.append(f"relay {r.name}: {e}")
        if self._direct is not None:
            _ip("route", "del", f"{self.remote}/32", check=False)
        _ip("link", "del", self.host_if, check=False)  # takes its peer with it
        res = _ip("netns", "del", self.name, check=False)
        if res.returncode != 0:
            errors.append(res.stderr.strip())
        if self.etc.exists():
            shutil.rmtree(self.etc)
            try:
                ETC_NETNS.rmdir()  # when no other namespace has files there
            except OSError:
                pass
        if errors:
            raise RigError(f"namespace {self.name} not cleanly removed: {'; '.join(errors)}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Netns"]
