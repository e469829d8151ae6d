"""One flow's state as the addon chain sees it: a small typed object, reachable from the flow.

The state lives in a weak mapping keyed by the flow, not in the flow itself, so mitmweb, `-w` and
mitmdump's dump never show or store it (it holds the upstream Authorization before it is sent).
`FlowStates`, the first addon of the chain, gives every new flow its state; the other addons read
it with `of(flow)`. What only one addon needs (timers, held secrets, client bookkeeping) stays in that
addon.

Who writes what: every addon may read any field; a field is written only by the modules its
`# Written by` comment names (steps/ modules, and flow/answers.py), and tests/hooks/flow/test_state.py
holds the code to that. Most fields have one writer; where there are more, each writes in a case of
its own:
- the step that claims a flow says what it is and how the log names it (`kind`, `log_path`, `base`):
  ops_endpoints the name of its own paths, token_endpoint `/token`, routing every registry route; a
  request routing sends upstream it also notes as `ok` (`token`), with its upstream credential;
- whatever a local answer says (the token outcome, why a token was refused, that nothing goes
  upstream: `kind` local again, no upstream credential) is written by `answers.answer_locally`,
  whichever step answers; a step that answers passes it what to say;
- `streamed` is set by rewrite, and cleared by keep_bodies for a body it keeps whole.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
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

    # Written by nobody: when `FlowStates` made the state.
    started: float = field(default_factory=time.monotonic)
    # Written by token_endpoint, routing and answers: "token" for `/token` (token_endpoint), "upstream"
    # for a request routed upstream (routing); a routed flow answered here after all (a limit) is
    # "local" again (answers).
    kind: Kind = "local"
    # Written by ops_endpoints, token_endpoint and routing: the name as logs may show it (capability
    # keys replaced by the mapping's label), each for the paths it claims.
    log_path: str = "-"
    # Written by token_endpoint and routing: the public base URL the client used (realm, token audience).
    base: str = ""
    # Written by routing and answers: the token outcome for the log line; "ok" for a request routed
    # upstream (routing), else what the step answering the flow passed, with the answer's notes (answers).
    token: str = "-"
    # Written by answers: for metrics, why a presented or requested token was refused.
    token_refusal: str | None = None
    # Written by routing.
    route: Route | None = None
    match: Match | None = None
    page: dict[str, str] = field(default_factory=dict)  # tags/list `n` and `last` as asked
    # Written by routing and token_endpoint: the id(s) of the share link(s) the request came through (never
    # the link itself).
    link: str | None = None
    # Written by routing: that link's state (ok, expired, revoked), for metrics.
    link_state: str | None = None
    # Written by routing, cache and answers: the upstream credential (sent by veil.Courier, after display);
    # routing sets it, a local answer drops it (answers), and so does cache for a blob GET it sends to its blob
    # server (the credential travels in the blob server's ticket).
    upstream_auth: str | None = field(default=None, repr=False)
    # Written by rewrite.
    upstream_status: int | None = None
    error_body: bytes | None = None  # the registry error that replaces the upstream's body
    # Written by rewrite and keep_bodies: the response headers went to the client before the `response`
    # hook (rewrite sets it; keep_bodies clears it again for a body it keeps whole).
    streamed: bool = False
    # Written by policy: under `digests: resolved`, the tag whose admission admits what this request resolves
    # (the cache records the digests it resolves or stores under it); None: nothing to record.
    admitted_via: str | None = None
    # Written by policy: for a tags list through a mapping with a policy, which tags it lists (None: all).
    tag_filter: Callable[[str], bool] | None = None
    # Written by cache: how the cache answered (hit, stale), filled or missed; off when it had no say.
    cache: str = "off"
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
