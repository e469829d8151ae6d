"""mitmweb's OCI content view: manifests, indexes, configs and blob redirects as a person reads them.

Registered with mitmproxy's content-view API (`contentviews.add`), so mitmweb (and mitmdump's dump at
`flow_detail` 3 and up) picks it by itself for the OCI and Docker manifest and index media types, for
image configs (served as octet-stream blobs: recognised by their keys) and for redirects; other bodies
keep mitmproxy's own views (JSON for the registry's errors and tags lists). It renders the flow as it
is shown: the body `Veil` left in it and the redirect's redacted `Location`. The text comes from
`ociview_render`; this module only adapts it to mitmproxy.
"""

from __future__ import annotations

import json

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata, SyntaxHighlight

from .render import MAX_INPUT, kind_for, render, render_redirect

# Above mitmproxy's JSON view (1), which would otherwise take every `+json` media type.
PRIORITY = 2.0


class OciContentview(Contentview):
    @property
    def name(self) -> str:
        return "OCI"

    @property
    def syntax_highlight(self) -> SyntaxHighlight:
        return "none"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        location = _redirect(metadata)
        if location is not None:
            assert isinstance(metadata.http_message, http.Response)
            return render_redirect(metadata.http_message.status_code, location)
        text = render(data, metadata.content_type)
        return text if text is not None else _fallback(data)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if _redirect(metadata) is not None or kind_for(metadata.content_type, data) is not None:
            return PRIORITY
        return -1


def _redirect(metadata: Metadata) -> str | None:
    """The Location of a redirect answer (as the flow shows it: its query redacted)."""
    msg = metadata.http_message
    if isinstance(msg, http.Response) and 300 <= msg.status_code < 400:
        return msg.headers.get("location")
    return None


def _fallback(data: bytes) -> str:
    """A body the OCI view was chosen for by hand but is no OCI document: as JSON, else as text."""
    if len(data) <= MAX_INPUT:
        try:
            return json.dumps(json.loads(data), indent=4, ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
    return data.decode("utf-8", "replace")


_registered = False


def register() -> None:
    """Make the view available to mitmproxy (once per process: the registry is global)."""
    global _registered
    if not _registered:
        contentviews.add(OciContentview())
        _registered = True
