"""The upstream's time: a watchdog for the answer's headers, and for bodies that stop flowing.

mitmproxy has no response timeout of its own and cannot kill a flow in transit (mitmproxy#4711).
From the moment a request is sent upstream, the upstream has `upstream_timeout` seconds to answer
with headers, a streaming body may pause at most that long, and a buffered body (a small one kept
in the flow, a tags list: nothing reaches the client before it is complete) must be complete within
that long of its headers; otherwise the upstream connection is closed (`connections.close_upstream`):
the client gets a registry 502, or a failed (never a silently short) transfer. The same watch counts
the bytes sent on (streamed or buffered) and the upstream's latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.state import FlowState
from ..mitm.connections import close_upstream
from ..ops.metrics import Metrics
from .config_loader import Configuration

logger = logging.getLogger("registryproxy")


@dataclass
class _Watch:
    sent: float
    timer: asyncio.TimerHandle | None = None
    last_data: float = 0.0
    buffered: bool = False  # the body is read whole before it is sent; `timer` is its deadline


class UpstreamWatch:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._watches: weakref.WeakKeyDictionary[http.HTTPFlow, _Watch] = weakref.WeakKeyDictionary()
        self._streaming: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._idle_check: asyncio.Task[None] | None = None

    def done(self) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is None or st.kind != "upstream" or flow.response is not None:
            return
        watch = self._watches[flow] = _Watch(time.monotonic())
        # From here on the upstream has `upstream_timeout` to connect and answer with headers.
        watch.timer = asyncio.get_running_loop().call_later(self._timeout(), self._stalled, weakref.ref(flow))

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        watch = self._settle(flow)
        resp = flow.response
        if st is None or watch is None or resp is None:
            return
        if st.match is not None:
            self.metrics.upstream_latency(st.match.mapping.label, time.monotonic() - watch.sent)
        if resp.stream is True:
            resp.stream = self._counting_stream(flow, st, watch)
        elif not resp.stream:
            # No chunk of a buffered body is seen here: all of it must come within the timeout.
            watch.buffered = True
            watch.timer = asyncio.get_running_loop().call_later(self._timeout(), self._stalled, weakref.ref(flow))

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._streaming.discard(flow)
        watch = self._settle(flow)
        st = flowstate.of(flow)
        if watch is not None and watch.buffered and st is not None and flow.response is not None:
            st.bytes_streamed += len(flow.response.raw_content or b"")

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)
        self._streaming.discard(flow)

    def _settle(self, flow: http.HTTPFlow) -> _Watch | None:
        """The upstream answered (or failed): stop waiting for its headers."""
        watch = self._watches.get(flow)
        if watch is not None and watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None
        return watch

    def _stalled(self, ref: weakref.ref[http.HTTPFlow]) -> None:
        """No response headers (or no whole buffered body) within `upstream_timeout`: close the upstream."""
        flow = ref()
        st = flowstate.of(flow) if flow is not None else None
        watch = self._watches.get(flow) if flow is not None else None
        if flow is None or st is None or watch is None or not flow.live:
            return
        if flow.response is not None and not watch.buffered:  # the headers came meanwhile
            return
        st.timed_out = True
        if watch.buffered:
            logger.warning(
                "%s %s: upstream body incomplete after %ss", flow.request.method, st.log_path, self._timeout()
            )
        else:
            logger.warning(
                "%s %s: upstream sent no answer within %ss", flow.request.method, st.log_path, self._timeout()
            )
        close_upstream(flow)

    def _counting_stream(self, flow: http.HTTPFlow, st: FlowState, watch: _Watch) -> Callable[[bytes], bytes]:
        """Stream a response body, noting when data last came, so a stalled body is cut off."""
        watch.last_data = time.monotonic()
        self._streaming.add(flow)
        if self._idle_check is None or self._idle_check.done():
            self._idle_check = asyncio.get_running_loop().create_task(self._check_idle_streams())

        def stream(data: bytes) -> bytes:
            watch.last_data = time.monotonic()
            st.bytes_streamed += len(data)
            return data

        return stream

    async def _check_idle_streams(self) -> None:
        """While bodies stream: close the upstream of any that sent nothing for `upstream_timeout`."""
        while self._streaming:
            timeout = self._timeout()
            await asyncio.sleep(max(0.2, min(1.0, timeout / 4)))
            now = time.monotonic()
            for flow in list(self._streaming):
                st = flowstate.of(flow)
                watch = self._watches.get(flow)
                if st is None or watch is None or not flow.live or flow.error is not None:
                    self._streaming.discard(flow)
                elif now - watch.last_data > timeout:
                    self._streaming.discard(flow)
                    st.timed_out = True
                    logger.warning("%s %s: upstream body stalled for %ss", flow.request.method, st.log_path, timeout)
                    close_upstream(flow)

    def _timeout(self) -> float:
        state = self.config.state
        return state.config.upstream_timeout if state else 0.0
