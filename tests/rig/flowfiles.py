"""What the secret scans read: a proxy at its most verbose (`DEBUG_ARGS`), and its flow files (`mitmdump -w`)
read back as text."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import http
from mitmproxy import io as mitmio

# mitmdump at its most talkative: every log line, every flow in full, every connection.
DEBUG_ARGS = (
    "--set",
    "termlog_verbosity=debug",
    "--set",
    "flow_detail=4",
    "--set",
    "registryproxy_connection_logs=true",
)


def flow_texts(path: Path) -> list[str]:
    """Every flow in a -w file, as text: its whole state, and each header, path, body and comment."""
    texts = []
    with path.open("rb") as fh:
        for f in mitmio.FlowReader(fh).stream():
            assert isinstance(f, http.HTTPFlow), type(f)
            parts = [repr(f.get_state()), f.comment, f.request.url, f.request.path]
            for msg in (f.request, f.response):
                if msg is None:
                    continue
                parts += [f"{k}: {v}" for k, v in msg.headers.items(multi=True)]
                parts.append((msg.raw_content or b"").decode("utf-8", "replace"))
            if f.error is not None:
                parts.append(f.error.msg)
            texts.append("\n".join(parts))
    return texts
