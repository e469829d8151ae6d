"""A lean mitmproxy master: only the addons a reverse registry proxy needs, plus registryproxy.

`mitmdump` loads about forty default addons and dispatches every hook of every request to
each of them; on small requests that dispatch is about half of mitmproxy's busy time. This
master keeps the proxy core (core options, proxy server, next-layer and TLS selection, error
check), the two addons an operator may still ask for on the command line (`-s` scripts and
`-w` flow saving, which here writes redacted copies of the flows), and the registryproxy addon itself. It takes mitmdump's command line, so
`./run.sh` passes the same arguments to either.

Run as `python -m regproxy.serve [mitmdump arguments]` (this is what `./run.sh` does);
`mitmdump -s addon/registryproxy.py` keeps working unchanged.
"""

from __future__ import annotations

import asyncio
import sys

from mitmproxy import flow as mflow
from mitmproxy import http, master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, save, script, tlsconfig
from mitmproxy.tools import cmdline
from mitmproxy.tools.main import run

from .addon import RegistryProxy
from .redact import Redactor, capability_keys

MAX_REDACTED_BODY = 256 * 1024


class RedactingSave(save.Save):
    """`-w FILE`, but every HTTP flow is written as a redacted copy (see regproxy.redact).

    What a client was sent (its token, the challenge naming its capability key) is in the live
    flow and cannot be held back; the copy that reaches the file holds none of it.
    """

    def __init__(self, proxy: RegistryProxy) -> None:
        super().__init__()
        self._proxy = proxy

    def _redactor(self) -> Redactor:
        state = self._proxy.state
        return Redactor(capability_keys(state.config.mappings) if state else ())

    def save_flow(self, flow: mflow.Flow) -> None:
        if isinstance(flow, http.HTTPFlow):
            self.active_flows.discard(flow)
            flow = redacted_copy(flow, self._redactor())
        super().save_flow(flow)

    def done(self) -> None:
        redactor = self._redactor()
        self.active_flows = {
            redacted_copy(f, redactor) if isinstance(f, http.HTTPFlow) else f for f in self.active_flows
        }
        super().done()


def redacted_copy(flow: http.HTTPFlow, redactor: Redactor) -> http.HTTPFlow:
    """A copy of the flow with secrets replaced in its path, headers, small bodies and comment."""
    copy: http.HTTPFlow = flow.copy()
    copy.request.path = redactor.text(copy.request.path)
    copy.comment = redactor.text(copy.comment)
    for message in (copy.request, copy.response):
        if message is None:
            continue
        message.headers = http.Headers(
            [(k, redactor.text(v.decode("latin-1")).encode("latin-1")) for k, v in message.headers.fields]
        )
        raw = message.raw_content
        if raw and len(raw) <= MAX_REDACTED_BODY:
            text = raw.decode("utf-8", "surrogateescape")
            redacted = redactor.text(text)
            if redacted != text:
                message.raw_content = redacted.encode("utf-8", "surrogateescape")
    return copy


class RegistryProxyMaster(master.Master):
    def __init__(
        self,
        opts: options.Options,
        loop: asyncio.AbstractEventLoop | None = None,
        with_termlog: bool = True,
    ) -> None:
        super().__init__(opts, event_loop=loop, with_termlog=with_termlog)
        # Order matters: hooks run in this order, and registryproxy must see every flow before
        # flow saving (`-w`) does, as it does under mitmdump, where scripts come before Save.
        proxy = RegistryProxy()
        self.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            script.ScriptLoader(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            proxy,
            RedactingSave(proxy),
            errorcheck.ErrorCheck(),
        )


def main(argv: list[str] | None = None) -> None:
    run(RegistryProxyMaster, cmdline.mitmdump, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
