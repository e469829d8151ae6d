"""/healthz, /readyz and /metrics: on the registry port, or on a listener of their own.

By default the registry port answers the three paths (GET and HEAD), even before a valid
configuration is loaded, so a load balancer can tell a live process from a ready one. With
`registryproxy_ops_listen` they move to a separate plain-HTTP listener (`ops.OpsServer`) and the
registry port treats them as any other path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..ops import listener as ops
from ..ops.metrics import Metrics

logger = logging.getLogger("registryproxy")


class Operations:
    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> None:
        self.metrics = metrics
        self.ready = ready
        self._server: ops.OpsServer | None = None
        self._listen = ""
        self._running = False

    def load(self, loader: Loader) -> None:
        loader.add_option(
            ops.LISTEN_OPTION,
            str,
            "",
            "HOST:PORT of a separate plain-HTTP listener for /metrics, /healthz and /readyz; when set, "
            "the registry port no longer answers those paths.",
        )

    def configure(self, updated: set[str]) -> None:
        if ops.LISTEN_OPTION not in updated:
            return
        if ctx.options.registryproxy_ops_listen:
            try:
                ops.parse_listen(ctx.options.registryproxy_ops_listen)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if self._running:
            self._start()

    def running(self) -> None:
        self._running = True
        self._start()

    def done(self) -> None:
        self._running = False
        if self._server is not None:
            self._server.stop()
            self._server = None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or ctx.options.registryproxy_ops_listen:
            return
        req = flow.request
        path = req.path.partition("?")[0]
        if path not in ops.OPS_PATHS:
            return
        st = flowstate.of(flow)
        if st is not None:
            st.log_path = path
        answer = ops.health_answer(path, self.ready(), self.metrics.render, req.headers.get("accept"))
        if answer is not None and req.method in ("GET", "HEAD"):
            status, body, content_type = answer
            answers.answer_locally(flow, status, body, {"Content-Type": content_type, "Cache-Control": "no-store"})

    def _start(self) -> None:
        """Start (or move, or stop) the separate listener, as the option says."""
        listen = ctx.options.registryproxy_ops_listen
        if self._server is not None and listen == self._listen:
            return
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._listen = listen
        if not listen:
            return
        host, port = ops.parse_listen(listen)
        server = ops.OpsServer(host, port, self.metrics.render, self.ready)
        try:
            bound = server.start()
        except OSError as e:
            logger.error("registryproxy_ops_listen: cannot listen at %s (%s)", listen, e.strerror or type(e).__name__)
            return
        self._server = server
        logger.info("registryproxy: /metrics, /healthz and /readyz listening at %s:%d", *bound)
