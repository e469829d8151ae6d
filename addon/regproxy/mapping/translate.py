"""Local names said in the upstream's, and where the upstream points said in the proxy's names.

A pull goes upstream as the upstream's path with only the query parameters its route defines
(`upstream_path`, `upstream_params`). An upstream names its own repositories (`/v2/backplane/true/...`)
in redirects, pagination links and tags lists; the client must see the local name (`/v2/bp/true/...`),
and the holder of a capability URL must never learn the upstream's name. Pure functions over a `Match`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

from ..protocol.names import TAG_RE, Route, RouteKind
from .matcher import Match

_LINK_RE = re.compile(r"\s*<([^>]*)>\s*(;.*)?")
_LINK_SPLIT_RE = re.compile(r",\s*(?=<)")
_ARTIFACT_TYPE_RE = re.compile(r"[\w.+/-]{1,255}")


def upstream_params(route: Route, query: str) -> list[tuple[str, str]]:
    """The query parameters sent upstream: only those a pull route defines, validated."""
    if not query or route.kind not in (RouteKind.TAGS, RouteKind.REFERRERS):
        return []
    keep = []
    for k, v in parse_qsl(query, keep_blank_values=False)[:8]:
        if route.kind is RouteKind.TAGS:
            ok = (k == "n" and v.isdigit() and len(v) <= 6) or (k == "last" and TAG_RE.fullmatch(v) is not None)
        else:
            ok = k == "artifactType" and _ARTIFACT_TYPE_RE.fullmatch(v) is not None
        if ok:
            keep.append((k, v))
    return keep


def upstream_path(match: Match, route: Route, params: list[tuple[str, str]]) -> str:
    """The path (and query) a pull of this route asks the upstream for."""
    query = f"?{urlencode(params)}" if params else ""
    return f"/v2/{match.upstream_name}{route.suffix}{query}"


def local_path(path: str, match: Match) -> str | None:
    """An upstream API path of this match's repository, as the local path; None if it is not one."""
    prefix = f"/v2/{match.upstream_name}/"
    if not path.startswith(prefix):
        return None
    return f"/v2/{match.local_name}/{path[len(prefix) :]}"


def rewrite_location(location: str, request_url: str, match: Match) -> str | None:
    """A redirect target made absolute; one back into the upstream API becomes the local path.
    None: drop the header."""
    absolute = urljoin(request_url, location.strip())
    try:
        parts = urlsplit(absolute)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https"):
        return None
    if _same_origin(parts.scheme, parts.hostname or "", port, match):
        local = local_path(parts.path, match) if parts.path.startswith("/v2/") else None
        if local is None:
            # Elsewhere on the upstream: fine to follow for a namespace, but it would name the
            # upstream to the holder of a capability URL.
            return None if match.mapping.capability or parts.path.startswith("/v2/") else absolute
        return local + (f"?{parts.query}" if parts.query else "")
    return absolute


def _same_origin(scheme: str, host: str, port: int | None, match: Match) -> bool:
    """Whether scheme://host:port is the mapping's upstream, however it is spelled (case, default port)."""
    upstream = match.mapping.upstream
    default = 443 if scheme == "https" else 80
    return (
        scheme == upstream.scheme
        and host.lower().strip("[]") == upstream.host.lower().strip("[]")
        and (port or default) == upstream.port
    )


def rewrite_link(value: str, match: Match) -> str | None:
    """`<…/v2/upstream/name/tags/list?…>; rel="next"` with the local name; None to drop it. A header
    may hold several links (RFC 8288): each is rewritten, and one that cannot be is dropped."""
    rewritten = [x for x in (_rewrite_one_link(v, match) for v in _LINK_SPLIT_RE.split(value)) if x is not None]
    return ", ".join(rewritten) if rewritten else None


def _rewrite_one_link(value: str, match: Match) -> str | None:
    m = _LINK_RE.fullmatch(value)
    if m is None or "<" in (m[2] or ""):
        return None
    try:
        parts = urlsplit(m[1])
        port = parts.port
    except ValueError:
        return None
    if (parts.scheme or parts.netloc) and not _same_origin(parts.scheme, parts.hostname or "", port, match):
        return None  # a link elsewhere than the upstream's API
    local = local_path(parts.path, match)
    if local is None:
        return None
    target = local + (f"?{parts.query}" if parts.query else "")
    return f"<{target}>{m[2] or ''}"


def rewrite_tags(
    body: bytes, match: Match, page: dict[str, str], has_link: bool, admit: Callable[[str], bool] | None = None
) -> tuple[bytes, str | None] | None:
    """A tags list with the local name, in lexical order, after `last`, only the tags `admit` admits (a
    mapping's policy; None: all), and paged here if the upstream ignored `n` (distribution 2.8 does): the
    new body and the `Link` to add, if any. Tags are filtered before the page is cut, so a page holds `n`
    admitted tags and its `Link` names the last of them. Sorting and `last` change nothing for an upstream
    that honours them (its pages may then hold fewer than `n` after the filter; its `Link` still leads on).
    None: the body is not a tags list."""
    try:
        data = json.loads(body or b"")
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("tags", []), list | None):
        return None
    data["name"] = match.local_name
    last = page.get("last")
    tags = sorted(
        t
        for t in data.get("tags") or []
        if isinstance(t, str) and (last is None or t > last) and (admit is None or admit(t))
    )
    n = int(page["n"]) if "n" in page else None
    link = None
    if n is not None and len(tags) > n and not has_link:
        if n > 0:
            query = urlencode({"n": n, "last": tags[n - 1]})
            link = f'</v2/{match.local_name}/tags/list?{query}>; rel="next"'
        tags = tags[:n]
    if data.get("tags") is not None:
        data["tags"] = tags
    return json.dumps(data, separators=(",", ":")).encode(), link
