"""One flow's state as the addon chain sees it: a small typed object, reachable from the flow.

The state lives in a weak mapping keyed by the flow, not in the flow itself, so mitmweb, `-w` and
mitmdump's dump never show or store it (it holds the upstream Authorization before it is sent).
`FlowStates`, the first addon of the chain, gives every new flow its state; the other addons read
it with `of(flow)`. Each field has one writer, named beside it; every addon may read any field.
What only one addon needs (timers, held secrets, client bookkeeping) stays in that addon.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Literal

from mitmproxy import http

from ..mapping.matcher import Match
from ..protocol.names import Route

Kind = Literal["local", "token", "upstream"]

_states: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()


@dataclass
class FlowState:
    """What the chain decided about one flow."""

    started: float = field(default_factory=time.monotonic)
    # Written by the addon that routes or answers the flow (operations, token endpoint, routing).
    kind: Kind = "local"
    log_path: str = "-"  # the name as logs may show it: capability keys replaced by the mapping's label
    base: str = ""  # the public base URL the client used: realm and token audience
    token: str = "-"  # the token outcome, for the log line
    token_refusal: str | None = None  # for metrics: why a presented or requested token was refused
    # Written by routing.
    route: Route | None = None
    match: Match | None = None
    page: dict[str, str] = field(default_factory=dict)  # tags/list `n` and `last` as asked
    upstream_auth: str | None = field(default=None, repr=False)  # sent by secrets.Courier, after display
    # Written by rewrite.
    upstream_status: int | None = None
    error_body: bytes | None = None  # the registry error that replaces the upstream's body
    # The response headers went to the client before the `response` hook (set by rewrite; keep_bodies
    # clears it again for a body it keeps whole).
    streamed: bool = False
    # Written by upstream_watch.
    bytes_streamed: int = 0
    timed_out: bool = False


def of(flow: http.HTTPFlow) -> FlowState | None:
    """The flow's state, or None for a flow the chain never took (e.g. one that failed early)."""
    return _states.get(flow)


def in_flight() -> list[http.HTTPFlow]:
    """Flows that still have a state (the mapping is weak: finished flows drop out with their flow)."""
    return list(_states)


class FlowStates:
    """First in the chain: every new request gets its state."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        _states[flow] = FlowState()
