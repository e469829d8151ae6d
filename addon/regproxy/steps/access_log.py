"""The outcome of every flow: one access-log line, its metrics, and its comment and mark in mitmweb.

One line per request, text (readable) or JSON (one object a line on stdout), never holding a
secret: names are logged with capability keys replaced by the mapping's label, and JSON values go
through the redactor. mitmproxy's own per-connection lines are quiet unless asked for.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.messages import peer
from ..flow.state import FlowState
from ..mitm.connections import CONNECTION_LOGGER
from ..ops.metrics import Metrics
from .config_loader import Configuration

logger = logging.getLogger("registryproxy")

MARK_FAILED = ":red_circle:"
MARK_REFUSED = ":warning:"
LOG_FORMATS = ("text", "json")


class AccessLog:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._json: logging.Logger | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registryproxy_connection_logs",
            bool,
            False,
            "Also log mitmproxy's per-connection lines (client/server connect) at info level.",
        )
        loader.add_option(
            "registryproxy_log_format",
            str,
            "text",
            "The per-request log line: text (readable) or json (one JSON object a line, on stdout).",
            choices=LOG_FORMATS,
        )
        _connection_logs(False)

    def configure(self, updated: set[str]) -> None:
        if "registryproxy_connection_logs" in updated:
            _connection_logs(ctx.options.registryproxy_connection_logs)
        if "registryproxy_log_format" in updated:
            if ctx.options.registryproxy_log_format not in LOG_FORMATS:
                # mitmproxy enforces `choices` on its command line only, not for --set or an update.
                raise exceptions.OptionsError(
                    f"registryproxy_log_format: must be one of {', '.join(LOG_FORMATS)}, "
                    f"not {ctx.options.registryproxy_log_format!r}"
                )
            self._json = _json_access_log() if ctx.options.registryproxy_log_format == "json" else None

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if st is not None:
            self._report(flow, st)

    def _report(self, flow: http.HTTPFlow, st: FlowState) -> None:
        resp = flow.response
        status: int | str = resp.status_code if resp is not None else "error"
        if flow.error is not None and resp is not None and st.kind == "upstream" and not st.streamed:
            status = 502  # a body read whole (kept) broke off: the client got mitmproxy's 502, not these headers
        size = "-"
        if resp is not None:
            streamed = st.streamed and st.error_body is None
            size = str(st.bytes_streamed) if streamed else resp.headers.get("content-length", "-")
        mapping = st.match.mapping.label if st.match else "-"
        upstream: int | str = st.upstream_status if st.upstream_status is not None else "-"
        if st.cache in ("hit", "stale"):
            upstream = "-"  # answered from the store (through the blob server for a blob): no upstream asked
        if flow.error is not None:
            upstream = "timeout" if st.timed_out else "failed"
        elapsed = (time.monotonic() - st.started) * 1000

        route = "token" if st.kind == "token" else st.route.kind.value if st.route else "other"
        self.metrics.request(mapping=mapping, method=flow.request.method, route=route, status=status)
        if st.match is not None and st.bytes_streamed:
            self.metrics.bytes_streamed(st.match.mapping.label, st.bytes_streamed)
        if st.token_refusal is not None:
            self.metrics.token_refused(st.token_refusal)
        if st.link is not None and st.link_state is not None:
            self.metrics.link_request(st.link, st.link_state)

        if self._json is not None:
            record = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "request_id": flow.id,
                "client": peer(flow),
                "method": flow.request.method,
                "name": st.log_path,
                "mapping": mapping,
                "status": status,
                "upstream_status": None if upstream == "-" else upstream,
                "bytes": int(size) if size.isdigit() else None,
                "duration_ms": round(elapsed, 1),
                "token": st.token,
                "cache": st.cache,
                "link": st.link,
            }
            state = self.config.state
            if state is not None:
                # Redact values, not the line: the redactor hides any JSON "token" member wholesale.
                redact = state.redactor.text
                record = {k: redact(v) if isinstance(v, str) else v for k, v in record.items()}
            self._json.info(json.dumps(record, separators=(",", ":")))
        else:
            logger.info(
                "%s %s mapping=%s status=%s upstream=%s bytes=%s %.1fms cache=%s token=%s%s",
                flow.request.method,
                st.log_path,
                mapping,
                status,
                upstream,
                size,
                elapsed,
                st.cache,
                st.token,
                f" link={st.link}" if st.link is not None else "",
            )

        if st.kind == "upstream" and st.cache in ("hit", "stale"):
            flow.comment = f"{flow.comment}; token {st.token}"
        elif st.kind == "upstream":
            flow.comment = f"{flow.comment}; token {st.token}; upstream {upstream}"
        elif st.cache in ("hit", "stale"):
            flow.comment = (
                f"registryproxy: {st.log_path} answered from the cache ({st.cache}, {status}); token {st.token}"
            )
        else:
            flow.comment = f"registryproxy: {st.log_path} answered locally ({status}); token {st.token}"
        failed = flow.error is not None or st.timed_out or (isinstance(status, int) and status >= 500)
        challenge = status == 401 and st.token == "none"
        if failed:
            flow.marked = MARK_FAILED
        elif isinstance(status, int) and status >= 400 and not challenge:
            flow.marked = MARK_REFUSED


def _json_access_log() -> logging.Logger:
    """One JSON object a line on stdout, without mitmproxy's time prefix."""
    log = logging.getLogger("registryproxy.access")
    log.propagate = False
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


QUIET_LIBRARIES = ("botocore", "aiobotocore", "s3transfer", "urllib3", "aiohttp")


def _connection_logs(on: bool) -> None:
    """One line per request is ours; mitmproxy's per-connection lines only when asked for."""
    level = logging.NOTSET if on else logging.WARNING
    for name in (CONNECTION_LOGGER, "httpx", "httpcore"):
        logging.getLogger(name).setLevel(level)
    # The cache's S3 client and blob server, never: botocore's debug lines carry the request's signature and
    # credential (a presigned URL's signature is a read credential), whatever mitmproxy's verbosity.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
