"""OCI documents as a person debugging a pull reads them: the text of mitmweb's OCI content view.

An image index or Docker manifest list becomes one line per platform with its manifest's digest; an
image manifest (OCI or Docker v2 schema 2) one line for the config and one per layer (digest shortened,
size, media type) with the image's total size; an image config its platform, entrypoint and cmd, the
names of its environment variables (never their values) and its history; a redirect the host it sends
the client to. Pure: no mitmproxy, no I/O; `ociview` registers it with mitmproxy.

`render` never raises and never takes long: input that is not such a document (not JSON, the wrong
shape, too large, nested too deep) gives None, and the caller shows it another way; long lists and
long values are cut with a note saying how much was left out.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from .text import MAX_ENTRIES, as_dict, as_list, clip, count, human_size, joined, more, one_line, short_digest, table

# The distribution spec caps manifests at 4 MiB; a config is smaller still. Larger input is not parsed.
MAX_INPUT = 4 * 1024 * 1024

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# Media types whose documents carry no type of their own (blobs are served as octet-stream).
GENERIC_TYPES = frozenset({None, "", "application/json", "application/octet-stream", "text/plain"})


class Kind(enum.Enum):
    INDEX = "index"
    MANIFEST = "manifest"
    CONFIG = "config"


MEDIA_TYPES: dict[str, Kind] = {
    OCI_INDEX: Kind.INDEX,
    DOCKER_LIST: Kind.INDEX,
    OCI_MANIFEST: Kind.MANIFEST,
    DOCKER_MANIFEST: Kind.MANIFEST,
    OCI_CONFIG: Kind.CONFIG,
    DOCKER_CONFIG: Kind.CONFIG,
}
TITLES = {
    OCI_INDEX: "OCI image index",
    DOCKER_LIST: "Docker manifest list",
    OCI_MANIFEST: "OCI image manifest",
    DOCKER_MANIFEST: "Docker image manifest (v2 schema 2)",
}


def kind_for(content_type: str | None, data: bytes) -> Kind | None:
    """Which document `data` is, by its media type, else (for generic types) by a look at its keys.

    Cheap (substring checks, no parsing): mitmproxy asks every view about every body it shows."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    kind = MEDIA_TYPES.get(ctype)
    if kind is not None:
        return kind
    if ctype not in GENERIC_TYPES or not data or len(data) > MAX_INPUT or data[:64].lstrip()[:1] != b"{":
        return None
    if b'"rootfs"' in data and b'"architecture"' in data:
        return Kind.CONFIG
    if b'"schemaVersion"' in data:
        if b'"manifests"' in data:
            return Kind.INDEX
        if b'"layers"' in data and b'"config"' in data:
            return Kind.MANIFEST
    return None


def render(data: bytes, content_type: str | None) -> str | None:
    """The view of `data` (served as `content_type`), or None if it is not an OCI document."""
    kind = kind_for(content_type, data)
    if kind is None or len(data) > MAX_INPUT:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested beyond the parser's depth
        return None
    if not isinstance(doc, dict):
        return None
    try:
        if kind is Kind.INDEX:
            return _index(doc, _media_type(doc, content_type, DOCKER_LIST, OCI_INDEX))
        if kind is Kind.MANIFEST:
            return _manifest(doc, _media_type(doc, content_type, DOCKER_MANIFEST, OCI_MANIFEST))
        return _config(doc)
    except RecursionError:  # a value nested too deep to print
        return None


def render_redirect(status: int, location: str) -> str:
    """Where a redirect sends the client: the host only (the path and query may name or sign the blob)."""
    try:
        parts = urlsplit(location.strip())
        host, port = parts.hostname, parts.port
    except ValueError:  # a port out of range, a malformed IPv6 literal
        host, port = None, None
    if host:
        where = clip(f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
        return (
            f"Redirect {status}: the client fetches this from {where}\n"
            "(without the proxy's token; these bytes do not cross the proxy)\n"
        )
    if location.strip().startswith("/"):
        return f"Redirect {status}: the client fetches this from this proxy, at another path\n"
    return f"Redirect {status}: to a location that is not a URL\n"


# --- the documents --------------------------------------------------------------------------------


def _index(doc: dict[str, Any], media_type: str) -> str:
    entries = as_list(doc.get("manifests"))
    lines = [f"{TITLES.get(media_type, media_type)}: {count(len(entries), 'manifest')}"]
    by_digest = {
        e["digest"]: _platform(e.get("platform"))
        for e in entries[:MAX_ENTRIES]
        if isinstance(e, dict) and isinstance(e.get("digest"), str)
    }
    rows: list[Sequence[str]] = [("platform", "digest", "size", "media type")]
    notes: list[str] = []
    for entry in entries[:MAX_ENTRIES]:
        if not isinstance(entry, dict):
            rows.append(("?", "?", "?", "(not a descriptor)"))
            continue
        platform = _platform(entry.get("platform"))
        annotations = as_dict(entry.get("annotations"))
        described = annotations.get("vnd.docker.reference.digest")
        if annotations.get("vnd.docker.reference.type") == "attestation-manifest" and isinstance(described, str):
            platform = f"attestation of {by_digest.get(described) or short_digest(described)}"
        rows.append(
            (
                platform,
                short_digest(entry.get("digest")),
                human_size(entry.get("size")),
                one_line(entry.get("mediaType")),
            )
        )
    lines += table(rows) if entries else ["  (none)"]
    lines += more(len(entries))
    if doc.get("subject") is not None:
        notes.append(f"subject: {_descriptor(doc.get('subject'))}")
    if doc.get("artifactType") is not None:
        notes.append(f"artifact type: {one_line(doc.get('artifactType'))}")
    lines += notes
    lines += _annotations(doc.get("annotations"))
    return "\n".join(lines) + "\n"


def _manifest(doc: dict[str, Any], media_type: str) -> str:
    config = doc.get("config")
    layers = as_list(doc.get("layers"))
    sizes = [d.get("size") for d in [config, *layers] if isinstance(d, dict)]
    known = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s >= 0]
    total = human_size(sum(known)) if known else "?"
    if len(known) < len(sizes) or not isinstance(config, dict) or len(sizes) < len(layers) + 1:
        total += " (some sizes missing)"
    lines = [
        f"{TITLES.get(media_type, media_type)}: {count(len(layers), 'layer')}, {total} in all (config and layers, as stored)"
    ]
    rows: list[Sequence[str]] = [("", "digest", "size", "media type")]
    if isinstance(config, dict):
        rows.append(
            (
                "config",
                short_digest(config.get("digest")),
                human_size(config.get("size")),
                one_line(config.get("mediaType")),
            )
        )
    else:
        rows.append(("config", "?", "?", "(missing)"))
    for i, layer in enumerate(layers[:MAX_ENTRIES], 1):
        if isinstance(layer, dict):
            rows.append(
                (
                    f"layer {i}",
                    short_digest(layer.get("digest")),
                    human_size(layer.get("size")),
                    one_line(layer.get("mediaType")),
                )
            )
        else:
            rows.append((f"layer {i}", "?", "?", "(not a descriptor)"))
    lines += table(rows)
    lines += more(len(layers))
    for i, layer in enumerate(layers[:MAX_ENTRIES], 1):
        if isinstance(layer, dict) and as_dict(layer.get("annotations")):
            lines += _annotations(layer.get("annotations"), f"layer {i} annotations")
    if doc.get("artifactType") is not None:
        lines.append(f"artifact type: {one_line(doc.get('artifactType'))}")
    if doc.get("subject") is not None:
        lines.append(f"subject: {_descriptor(doc.get('subject'))}")
    lines += _annotations(doc.get("annotations"))
    return "\n".join(lines) + "\n"


def _config(doc: dict[str, Any]) -> str:
    conf = as_dict(doc.get("config"))
    lines = [f"Image config: {_platform(doc)}"]
    fields: list[tuple[str, str]] = []
    if doc.get("created") is not None:
        fields.append(("created", one_line(doc.get("created"))))
    for key, label in (("Entrypoint", "entrypoint"), ("Cmd", "cmd")):
        if key in conf:
            fields.append((label, _command(conf.get(key))))
    for key, label in (("WorkingDir", "workdir"), ("User", "user")):
        if conf.get(key):
            fields.append((label, one_line(conf.get(key))))
    env = as_list(conf.get("Env"))
    if env:
        names = [e.split("=", 1)[0] if isinstance(e, str) else "?" for e in env[:MAX_ENTRIES]]
        fields.append(("env", joined(names, len(env)) + " (values elided)"))
    for key, label in (("ExposedPorts", "ports"), ("Volumes", "volumes"), ("Labels", "labels")):
        names = list(as_dict(conf.get(key)))
        if names:
            fields.append((label, joined(names, len(names))))
    diff_ids = as_list(as_dict(doc.get("rootfs")).get("diff_ids"))
    fields.append(("layers", f"{len(diff_ids)} (uncompressed diff_ids)"))
    width = max(len(k) for k, _ in fields)
    lines += [f"  {k + ':':<{width + 1}} {v}" for k, v in fields]
    history = as_list(doc.get("history"))
    if history:
        empty = sum(1 for h in history if isinstance(h, dict) and h.get("empty_layer") is True)
        lines.append(f"history: {count(len(history), 'step')}, {len(history) - empty} with a layer")
        rows: list[Sequence[str]] = []
        for i, step in enumerate(history[:MAX_ENTRIES], 1):
            if not isinstance(step, dict):
                rows.append((str(i), "?", "(not a history entry)"))
                continue
            what = one_line(step.get("created_by") or step.get("comment") or "")
            if step.get("empty_layer") is True:
                what += "  (no layer)"
            rows.append((str(i), one_line(step.get("created") or "-"), what))
        lines += table(rows)
        lines += more(len(history))
    return "\n".join(lines) + "\n"


# --- pieces -----------------------------------------------------------------------------------------


def _media_type(doc: dict[str, Any], content_type: str | None, docker: str, oci: str) -> str:
    """The document's own mediaType when it names one of this kind, else the served type, else OCI's."""
    own = doc.get("mediaType")
    if isinstance(own, str) and own in (docker, oci):
        return own
    served = (content_type or "").split(";", 1)[0].strip().lower()
    return served if served in (docker, oci) else oci


def _platform(p: object) -> str:
    """`os/architecture[/variant]` (a config carries the same keys at its top level)."""
    d = as_dict(p)
    if not d:
        return "?"
    parts = [clip(str(d.get("os") or "?"), 40), clip(str(d.get("architecture") or "?"), 40)]
    if d.get("variant"):
        parts.append(clip(str(d.get("variant")), 40))
    text = "/".join(parts)
    if d.get("os.version"):
        text += f" ({clip(str(d.get('os.version')), 40)})"
    return text


def _descriptor(d: object) -> str:
    desc = as_dict(d)
    return (
        f"{short_digest(desc.get('digest'))} {human_size(desc.get('size'))} {one_line(desc.get('mediaType'))}".strip()
    )


def _annotations(a: object, title: str = "annotations") -> list[str]:
    items = list(as_dict(a).items())
    if not items:
        return []
    lines = [f"{title}:"]
    lines += [f"  {clip(str(k))}: {one_line(v)}" for k, v in items[:MAX_ENTRIES]]
    return lines + more(len(items))


def _command(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return clip(json.dumps(value[:MAX_ENTRIES], ensure_ascii=False))
    return one_line(value)
