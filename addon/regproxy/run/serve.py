"""A lean mitmproxy master: only the addons a reverse registry proxy needs, plus registryproxy.

`mitmdump` loads about forty default addons and dispatches every hook of every request to
each of them; on small requests that dispatch is about half of mitmproxy's busy time. This
master keeps the proxy core (core options, proxy server, next-layer and TLS selection, error
check), the two addons an operator may still ask for on the command line (`-s` scripts and
`-w` flow saving; the flows it sees hold no secret, see regproxy.veil), and the registryproxy
addon chain itself (regproxy.chain). It takes mitmdump's command line, so `./run.sh` passes the
same arguments to either.

Run as `python -m regproxy.run.serve [mitmdump arguments]` (this is what `./run.sh` does);
`mitmdump -s addon/registryproxy.py` keeps working unchanged. As the entry script does, the master
asks regproxy.run.preflight first and imports the chain only when it has no objection; otherwise it
logs preflight's one line, with no chain, and mitmproxy's error check ends the start-up on it.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from mitmproxy import master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, save, script, tlsconfig
from mitmproxy.tools import cmdline
from mitmproxy.tools.main import run

from . import preflight

logger = logging.getLogger("registryproxy")


class RegistryProxyMaster(master.Master):
    def __init__(
        self,
        opts: options.Options,
        loop: asyncio.AbstractEventLoop | None = None,
        with_termlog: bool = True,
    ) -> None:
        super().__init__(opts, event_loop=loop, with_termlog=with_termlog)
        # Order matters: hooks run in this order. The registryproxy chain stands where mitmdump's script
        # loader runs `-s` scripts: before flow saving (`-w`), which must see only flows without secrets,
        # and before TlsConfig, which leaves alone an upstream TLS connection the chain has set up.
        problem = preflight.problem()
        registryproxy: list[object] = []
        if problem is None:
            from .. import chain  # only now: the chain's modules reach into mitmproxy as they are imported

            registryproxy.append(chain.proxy())
        self.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            script.ScriptLoader(),
            *registryproxy,
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            save.Save(),
            errorcheck.ErrorCheck(),
        )
        if problem is not None:
            logger.error(problem)  # after ErrorCheck is there to see it: the start-up ends on this line


def main(argv: list[str] | None = None) -> None:
    run(RegistryProxyMaster, cmdline.mitmdump, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
