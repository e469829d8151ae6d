"""Bodies a person debugging a pull reads stay in the flow: manifests, indexes, image configs, errors.

`ResponseRewrite` streams every upstream body (blobs must stream with flat memory), so mitmweb, `-w`
and the dump would hold no body at all. In `responseheaders`, right after it, this turns streaming
off again for the answers worth reading that are small and of known length: a manifest or index (the
spec caps them at 4 MiB; kept up to `MAX_KEPT_BODY`, the size `Veil` scrubs secrets from) and a blob
announced at most `registryproxy_keep_blob_size` bytes long (an image config); mitmproxy then reads
the body whole and sends it on unchanged, and the flow keeps it. Only a complete `200` to a `GET` with
a `Content-Length` and no content coding is kept; everything else (larger, of unknown length, ranges,
encoded) still streams. A kept body must arrive within `upstream_timeout` (`UpstreamWatch`).

In `response`, for display only (the client has had its answer by then): a streamed upstream error
shows the registry error the client was sent instead of no body, and a redirect shows an empty body,
not the upstream's page (which repeats the signed URL), so that the OCI view says where it goes.

On load it registers the OCI content view (`ociview`) that reads these bodies.
"""

from __future__ import annotations

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..debug import contentview as ociview
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..protocol.names import RouteKind
from .veil import MAX_SCRUBBED_BODY

# A kept body is in the flow that mitmweb shows and `-w` saves, so `Veil` must be able to scrub it.
MAX_KEPT_BODY = min(4 * 1024 * 1024, MAX_SCRUBBED_BODY)
DEFAULT_KEEP_BLOB_SIZE = 64 * 1024  # image configs are a few KiB; layers are larger
OPTION = "registryproxy_keep_blob_size"
_DOCUMENTS = frozenset({RouteKind.MANIFEST, RouteKind.REFERRERS})


def keeps(kind: RouteKind, method: str, resp: http.Response, blob_limit: int) -> bool:
    """Whether the body of this upstream answer is read whole and kept in the flow."""
    limit = MAX_KEPT_BODY if kind in _DOCUMENTS else blob_limit if kind is RouteKind.BLOB else -1
    if limit < 0 or method != "GET" or resp.status_code != 200:
        return False
    headers = resp.headers
    length = headers.get("content-length", "")  # first: a layer is over the limit, and that settles it
    if not length.isdigit() or len(length) > 12 or int(length) > limit:
        return False  # of unknown length, or larger
    # Chunked framing beside a length, or a content coding (a coded body could not be scrubbed).
    return "transfer-encoding" not in headers and headers.get("content-encoding", "identity").lower() == "identity"


class KeepBodies:
    def __init__(self) -> None:
        self.blob_limit = DEFAULT_KEEP_BLOB_SIZE

    def load(self, loader: Loader) -> None:
        loader.add_option(
            OPTION,
            int,
            DEFAULT_KEEP_BLOB_SIZE,
            "Blobs announced at most this many bytes long (image configs) are kept in the flow, for mitmweb "
            f"and -w, instead of streamed; 0 keeps none, at most {MAX_KEPT_BODY}. Manifests and indexes are "
            f"always kept up to {MAX_KEPT_BODY} bytes.",
        )
        ociview.register()

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated:
            value = getattr(ctx.options, OPTION)
            if not 0 <= value <= MAX_KEPT_BODY:
                raise exceptions.OptionsError(f"{OPTION}: must be between 0 and {MAX_KEPT_BODY} bytes, not {value}")
            self.blob_limit = value

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        resp = flow.response
        if st is None or st.kind != "upstream" or st.route is None or resp is None:
            return
        if resp.stream is not True or st.error_body is not None:  # buffered already, or replaced
            return
        if keeps(st.route.kind, flow.request.method, resp, self.blob_limit):
            resp.stream = False
            st.streamed = False  # the headers now go out with the body, after `response`

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        resp = flow.response
        if st is None or st.kind != "upstream" or resp is None or not st.streamed or resp.raw_content is not None:
            return
        if flow.request.method == "HEAD":
            return
        if st.error_body is not None:
            resp.raw_content = st.error_body  # what the stream sent in place of the upstream's body
        elif 300 <= resp.status_code < 400 and "location" in resp.headers:
            resp.raw_content = b""
