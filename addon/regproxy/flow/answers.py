"""Answers the proxy gives itself: registry JSON errors, challenges, and the fail-closed guard.

Every step of the chain that answers a client locally does it through `answer_locally` (or its two
forms, `answer_error` and `answer_challenge`), which is also the one writer of what a local answer says
in the flow's state: the token outcome, why a token was refused, and that nothing goes upstream. Every
hook is wrapped in `fail_closed`: mitmproxy logs an exception raised in a hook and lets the flow go on
unmodified to its target (the client's Authorization included), so a hook that fails must answer the
client with an error, or kill the flow, itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from mitmproxy import http

from ..protocol.challenge import bearer_challenge
from ..protocol.errors import RegistryError
from . import state as flowstate
from .messages import content_length

logger = logging.getLogger("registryproxy")

TOKEN_PATH = "/token"
API_VERSION = {"Docker-Distribution-Api-Version": "registry/2.0"}
JSON_TYPE = "application/json; charset=utf-8"
# The largest request body the proxy lets mitmproxy read: the token endpoint's form, and the body of any
# request it answers itself (mitmproxy reads a body in full before it sends a local answer).
MAX_LOCAL_BODY = 64 * 1024


def answer_locally(
    flow: http.HTTPFlow,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    token: str | None = None,
    refusal: str | None = None,
    note: str | None = None,
) -> None:
    """Answer the client here: the request goes no further. A HEAD answer carries the length, not the body.

    What the answer says goes into the flow's state, here and nowhere else: `token` is the token
    outcome for the log line (None keeps the one so far), `note` is added to it (`limited: …`),
    `refusal` says why a token was refused (for metrics); a flow routed upstream becomes local again
    and holds no upstream credential. A flow already ended (a step before closed it unread) is left alone:
    it gets no second answer.
    """
    if not flow.live:
        return
    st = flowstate.of(flow)
    if st is not None:
        if token is not None:
            st.token = token
        if note is not None:
            st.token = f"{st.token}; {note}"
        if refusal is not None:
            st.token_refusal = refusal
        if st.kind == "upstream":
            st.kind = "local"
        st.upstream_auth = None
    if content_length(flow.request) > MAX_LOCAL_BODY:
        # mitmproxy would read (and hold) the whole body before sending this answer: a multi-GB
        # upload to a pull-only proxy would fill memory. Close the connection unread instead.
        if st is not None:
            st.token = f"{st.token}; {status} answer replaced by closing: body over {MAX_LOCAL_BODY} bytes"
        flow.kill()
        return
    all_headers = {"Content-Type": JSON_TYPE, **API_VERSION, **(headers or {})}
    if flow.request.method == "HEAD":
        flow.response = http.Response.make(status, b"", all_headers)
        flow.response.headers["Content-Length"] = str(len(body))
    else:
        flow.response = http.Response.make(status, body, all_headers)


def answer_error(
    flow: http.HTTPFlow,
    err: RegistryError,
    headers: dict[str, str] | None = None,
    *,
    token: str | None = None,
    refusal: str | None = None,
    note: str | None = None,
) -> None:
    """`answer_locally` with a registry error."""
    answer_locally(flow, err.status, err.body(), headers, token=token, refusal=refusal, note=note)


def service(base: str) -> str:
    """The token service name: the public base URL's host[:port]."""
    return urlsplit(base).netloc


def challenge_header(base: str, scope: str | None, error: str | None) -> str:
    return bearer_challenge(base + TOKEN_PATH, service(base), scope, error)


def answer_challenge(
    flow: http.HTTPFlow,
    base: str,
    scope: str | None,
    error: str | None,
    *,
    token: str | None = None,
    refusal: str | None = None,
) -> None:
    """`answer_locally` with a 401 and the proxy's own Bearer challenge for `scope`."""
    header = challenge_header(base, scope, error)
    answer_error(flow, RegistryError(401, "UNAUTHORIZED"), {"WWW-Authenticate": header}, token=token, refusal=refusal)


def error_response(err: RegistryError) -> http.Response:
    """A registry error as a response object (for replacing a response already there)."""
    return http.Response.make(err.status, err.body(), {"Content-Type": JSON_TYPE, **API_VERSION})


def internal_error(flow: http.HTTPFlow, hook: str, exc: Exception) -> None:
    """A hook failed: refuse the request with a 500 (or end a flow already answered)."""
    logger.error("internal error in %s hook (%s); the request was refused", hook, type(exc).__name__)
    logger.debug("internal error details", exc_info=exc)
    try:
        if flow.response is None and flow.live:
            flow.response = error_response(RegistryError(500, "UNKNOWN", "internal proxy error"))
        elif flow.live:
            flow.kill()
    except Exception:  # noqa: BLE001 - last resort
        if flow.killable:
            flow.kill()


F = TypeVar("F", bound=Callable[..., Any])


def fail_closed(hook: F) -> F:
    """Wrap a flow hook (sync or async): on any exception answer the client with an error, or kill the flow."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: object, flow: http.HTTPFlow) -> None:
            try:
                await cast(Callable[..., Awaitable[None]], hook)(self, flow)
            except Exception as e:  # noqa: BLE001 - every failure must fail closed
                internal_error(flow, hook.__name__, e)

        return cast(F, async_wrapper)

    @functools.wraps(hook)
    def wrapper(self: object, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:  # noqa: BLE001 - every failure must fail closed
            internal_error(flow, hook.__name__, e)

    return cast(F, wrapper)
