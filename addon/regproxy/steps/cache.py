"""The pull-through cache in the chain: manifests and blobs answered from the store (cache/).

A request of a cached mapping (every mapping once `cache:` is set, unless it says `cache: false`) is
looked up by its link: the mapping, its upstream and the upstream repository (cache/keys.py), so
content one mapping has seen is never served through another. Three hooks, because the decision
needs the route (Router decides it in `requestheaders`) and must be known to the limits before they
admit the request (`Limits.request`: bytes served from the store do not spend `mapping_bytes`),
while the answer comes after the limits had their say:

- `requestheaders` looks the request up and plans its answer, noting `st.cache`:
  - a manifest by digest, a blob HEAD: linked → from the store (`hit`); else upstream (`fill` for a
    manifest GET, `miss` for a HEAD);
  - a manifest by tag: within `tag_ttl` of the upstream's last word → from the store; else the
    upstream is asked with a HEAD (Docker Hub counts GETs, not HEADs), and the digest it names comes
    from the store when linked (`hit`), else one GET goes upstream and is stored (`fill`). When the
    upstream cannot answer (unreachable, timed out, 5xx, 429), a tag it named within `stale_if_error`
    is answered from the store (`stale`, a log line and a metric); an unknown one gets the error the
    upstream's failure gets without a cache;
  - a blob GET goes to the local blob server (cache/blobserver.py) under a one-time ticket: from the
    store (`hit`; or a 307 to the S3 store's presigned URL with `redirect: true`), or fetched
    upstream while clients stream it (`fill`, one upstream GET however many ask at once);
- `request` carries the plan out (unless a limit refused the request meanwhile);
- `response` stores a manifest that went upstream: its body, kept whole by `KeepBodies`, verified
  against its digest.

A store that fails reads as a miss: the request goes upstream as without a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from mitmproxy import http

from ..cache import keys
from ..cache.fill import BlobJob
from ..cache.keys import TagRecord
from ..cache.service import MAX_MANIFEST, CachedManifest, CacheService
from ..cache.settings import CacheSettings
from ..cache.store import StoreError
from ..flow import answers, background
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..flow.state import FlowState
from ..mapping.matcher import Match
from ..ops.metrics import Metrics
from ..protocol.errors import RegistryError, for_proxy_failure, for_upstream_status
from ..protocol.names import RouteKind
from ..upstream.auth import UpstreamError
from .config_loader import Configuration

logger = logging.getLogger("registryproxy")

MARK_CACHED = ":floppy_disk:"
RETRY_OPEN = 30.0  # seconds before a store that failed to open is tried again
RELOAD_GRACE = 600.0  # seconds a replaced store keeps serving the transfers it began
BLOB_TYPE = "application/octet-stream"


@dataclass
class Plan:
    """What `request` does with a flow `requestheaders` looked up."""

    kind: Literal["local", "redirect", "blob", "fill"]
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # a HEAD answer's Content-Length, when there is no body to measure
    job: BlobJob | None = None
    link: str = ""
    hex: str | None = None  # the digest the stored manifest must have (a digest asked for, or the tag's HEAD)
    tag: str | None = None
    served: int = 0  # bytes answered from the store


class _Observer:
    """The cache's events, as metrics and log lines."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def fill_started(self, hex_digest: str) -> None:
        pass

    def fill_done(self, hex_digest: str, size: int) -> None:
        self.metrics.cache_bytes_filled(size)

    def fill_failed(self, hex_digest: str, reason: str) -> None:
        self.metrics.cache_fill_failed(reason)
        if reason in ("digest_mismatch", "size_mismatch", "store_error"):
            # The upstream's own refusals and failures are the access log's to show; these are the cache's.
            logger.warning(
                "registryproxy: cache fill of sha256:%s failed (%s); nothing stored", hex_digest[:12], reason
            )

    def store_failed(self) -> None:
        self.metrics.cache_store_failed()

    def evicted(self, key: str, size: int) -> None:
        self.metrics.cache_evicted()


class Cache:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._observer = _Observer(metrics)
        self._service: CacheService | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._spool: tempfile.TemporaryDirectory[str] | None = None
        self._plans: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()
        self._fills: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()

    def running(self) -> None:
        # Open the store (and load its libraries) now, not on the first pull, which would wait for it.
        state = self.config.state
        if state is not None and state.config.cache is not None:
            background.spawn(self._open_early(state.config.cache))

    async def _open_early(self, settings: CacheSettings) -> None:
        try:
            await self._current(settings)
        except Exception as e:  # noqa: BLE001 - the first request tries again, and answers for itself
            logger.error("registryproxy: the cache could not be opened at start (%s)", type(e).__name__)

    async def done(self) -> None:
        if self._service is not None:
            service, self._service = self._service, None
            await service.aclose()
        if self._spool is not None:
            self._spool.cleanup()

    # --- hooks ------------------------------------------------------------------

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        state = self.config.state
        if flow.response or not flow.live or st is None or state is None or st.kind != "upstream":
            return
        match, route = st.match, st.route
        if match is None or route is None or route.kind not in (RouteKind.MANIFEST, RouteKind.BLOB):
            return
        if flow.request.method not in ("GET", "HEAD") or not match.mapping.cache:
            return
        service = await self._current(state.config.cache)
        if service is None:
            return
        link = keys.link_id(match.mapping.key, match.mapping.upstream.origin, match.upstream_name)
        try:
            if route.kind is RouteKind.MANIFEST:
                plan = await self._manifest(flow, st, service, match, link, route.reference)
            else:
                plan = await self._blob(flow, st, service, link, route.reference)
        except StoreError:
            st.cache = "miss"  # counted by the service; served as without a cache
            return
        if plan is not None:
            self._plans[flow] = plan

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        plan = self._plans.pop(flow, None)
        st = flowstate.of(flow)
        if st is None or st.cache == "off":
            return
        kind = "manifest" if st.route is not None and st.route.kind is RouteKind.MANIFEST else "blob"
        if flow.response is not None or not flow.live:
            return  # refused by a limit meanwhile: no cache outcome to count
        self.metrics.cache_request(kind, st.cache)
        if self._service is not None:
            self.metrics.cache_store_size(self._service.index.total)
        if plan is None:
            return
        if st.cache in ("hit", "stale"):
            flow.marked = MARK_CACHED
        match plan.kind:
            case "local":
                answers.answer_locally(flow, plan.status, plan.body, plan.headers)
                if plan.length is not None and flow.response is not None:
                    flow.response.headers["Content-Length"] = str(plan.length)
                self.metrics.cache_bytes_served(plan.served if flow.request.method == "GET" else 0)
            case "redirect":
                answers.answer_locally(flow, 307, b"", plan.headers)
            case "blob":
                self._to_blob_server(flow, st, plan)
            case "fill":
                self._fills[flow] = plan

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        plan = self._fills.pop(flow, None)
        resp = flow.response
        service = self._service
        if plan is None or resp is None or service is None or resp.status_code != 200 or flow.request.method != "GET":
            return
        st = flowstate.of(flow)
        if st is None or st.streamed or resp.raw_content is None or resp.headers.get("content-encoding"):
            return  # streamed (too large or of unknown length): not cached
        body = resp.raw_content
        hex_digest = keys.sha256_hex(body)
        stated = keys.parse_digest(resp.headers.get("docker-content-digest", ""))
        if (plan.tag is None and plan.hex != hex_digest) or (stated is not None and stated != hex_digest):
            self.metrics.cache_fill_failed("digest_mismatch")
            logger.warning(
                "registryproxy: %s: the upstream's manifest does not match its digest; not cached", st.log_path
            )
            return
        media_type = resp.headers.get("content-type", "")
        if len(body) > MAX_MANIFEST or not await service.put_manifest(plan.link, hex_digest, media_type, body):
            return
        self.metrics.cache_bytes_filled(len(body))
        if plan.tag is not None:
            record = TagRecord(f"sha256:{hex_digest}", media_type, len(body), time.time())
            await service.put_tag(plan.link, plan.tag, record)

    # --- planning ---------------------------------------------------------------

    async def _manifest(
        self, flow: http.HTTPFlow, st: FlowState, service: CacheService, match: Match, link: str, reference: str
    ) -> Plan | None:
        get = flow.request.method == "GET"
        hex_digest = keys.parse_digest(reference)
        if hex_digest is None and ":" in reference:
            return None  # a digest of another algorithm: not cached (st.cache stays off)
        if hex_digest is not None:
            found = await service.manifest(link, hex_digest)
            if found is not None:
                return self._from_store(st, found, hex_digest, "hit")
            st.cache = "fill" if get else "miss"
            return Plan("fill", link=link, hex=hex_digest) if get else None

        record = await service.tag(link, reference)
        ttl = service.settings.tag_ttl
        if record is not None and ttl > 0 and time.time() - record.checked < ttl:
            found = await self._manifest_of(service, link, record)
            if found is not None:
                if get:
                    self.metrics.cache_manifest_get_saved()
                return self._from_store(st, found, keys.parse_digest(record.digest) or "", "hit")

        client = self.config.client
        if client is None:
            st.cache = "miss"
            return None
        try:
            head = await client.head(match.mapping, flow.request.url, self._upstream_headers(flow, st))
        except UpstreamError as e:
            return await self._stale(
                st, service, match, link, record, str(e), for_proxy_failure(504 if e.timeout else 502)
            )
        status = head.status_code
        if status >= 500 or status == 429:
            err = for_upstream_status(status, "manifest")
            retry = head.headers.get("retry-after")
            headers = {"Retry-After": retry} if status == 429 and retry and retry.isdigit() else {}
            return await self._stale(st, service, match, link, record, f"upstream answered {status}", err, headers)
        if status == 404:
            st.cache = "miss"
            err = for_upstream_status(404, "manifest")
            return Plan("local", err.status, err.body(), {"Content-Type": answers.JSON_TYPE})
        if status != 200:
            st.cache = "miss"  # 401, 403, ...: upstream, as without a cache (the rewrite answers it)
            return None
        named = keys.parse_digest(head.headers.get("docker-content-digest", ""))
        if named is None:
            st.cache = "fill" if get else "miss"
            return Plan("fill", link=link, tag=reference) if get else None
        media_type = head.headers.get("content-type", "")
        size = _length(head.headers)
        await service.put_tag(link, reference, TagRecord(f"sha256:{named}", media_type, size or 0, time.time()))
        found = await service.manifest(link, named)
        if found is not None:
            if get:
                self.metrics.cache_manifest_get_saved()
            return self._from_store(st, found, named, "hit")
        if get:
            st.cache = "fill"
            return Plan("fill", link=link, hex=named, tag=reference)
        st.cache = "miss"
        headers = {"Content-Type": media_type, "Docker-Content-Digest": f"sha256:{named}"}
        return Plan("local", 200, b"", headers, length=size or 0)

    async def _stale(
        self,
        st: FlowState,
        service: CacheService,
        match: Match,
        link: str,
        record: TagRecord | None,
        reason: str,
        err: RegistryError,
        headers: dict[str, str] | None = None,
    ) -> Plan:
        """The upstream could not say what a tag is: the cached answer within `stale_if_error`, else `err`."""
        window = service.settings.stale_if_error
        age = time.time() - record.checked if record is not None else 0.0
        if record is not None and window > 0 and age <= window:
            found = await self._manifest_of(service, link, record)
            if found is not None:
                self.metrics.cache_stale(match.mapping.label)
                logger.warning(
                    "registryproxy: %s: %s; answered from the cache (stale: the upstream named it %ds ago)",
                    st.log_path,
                    reason,
                    int(age),
                )
                return self._from_store(st, found, keys.parse_digest(record.digest) or "", "stale")
        st.cache = "miss"
        return Plan("local", err.status, err.body(), {"Content-Type": answers.JSON_TYPE, **(headers or {})})

    async def _blob(
        self, flow: http.HTTPFlow, st: FlowState, service: CacheService, link: str, reference: str
    ) -> Plan | None:
        hex_digest = keys.parse_digest(reference)
        if hex_digest is None:
            return None  # not a sha256 digest: not cached
        found = await service.blob(link, hex_digest)
        if flow.request.method == "HEAD":
            if found is None:
                st.cache = "miss"
                return None
            st.cache = "hit"
            headers = {
                "Content-Type": BLOB_TYPE,
                "Docker-Content-Digest": f"sha256:{hex_digest}",
                "Accept-Ranges": "bytes",
            }
            return Plan("local", 200, b"", headers, length=found.size)
        if found is not None:
            st.cache = "hit"
            url = await service.presign_blob(hex_digest)
            if url is not None:
                return Plan("redirect", 307, headers={"Location": url}, served=found.size)
        else:
            st.cache = "fill"
        client = self.config.client
        match = st.match
        if client is None or match is None:
            st.cache = "miss"
            return None
        mapping, url, headers = match.mapping, flow.request.url, self._upstream_headers(flow, st, blob=True)

        def open_upstream() -> contextlib.AbstractAsyncContextManager[httpx.Response]:
            return client.stream_get(mapping, url, headers)

        job = BlobJob(hex_digest, link, found is not None, open_upstream, on_done=self._blob_done)
        return Plan("blob", job=job, link=link, hex=hex_digest)

    # --- helpers ----------------------------------------------------------------

    def _blob_done(self, outcome: str, sent: int) -> None:
        if outcome == "hit":
            self.metrics.cache_bytes_served(sent)

    def _from_store(self, st: FlowState, found: CachedManifest, hex_digest: str, outcome: str) -> Plan:
        st.cache = outcome
        headers = {
            "Content-Type": found.media_type,
            "Docker-Content-Digest": f"sha256:{hex_digest}",
            "ETag": f'"sha256:{hex_digest}"',
        }
        return Plan("local", 200, found.body, headers, served=len(found.body))

    @staticmethod
    async def _manifest_of(service: CacheService, link: str, record: TagRecord) -> CachedManifest | None:
        hex_digest = keys.parse_digest(record.digest)
        return await service.manifest(link, hex_digest) if hex_digest is not None else None

    @staticmethod
    def _upstream_headers(flow: http.HTTPFlow, st: FlowState, *, blob: bool = False) -> dict[str, str]:
        """What the proxy's own upstream request sends: the client's pull headers as Router kept them (the
        Accept lines decide which manifest a tag names), and the upstream credential. A fill fetches the
        whole blob: the client's Range is served from the store or the spool."""
        headers: dict[str, str] = {}
        for k, v in flow.request.headers.fields:
            name = k.decode("latin-1").lower()
            if name == "host" or (blob and name in ("range", "if-range")):
                continue
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if st.upstream_auth:
            headers["authorization"] = st.upstream_auth
        return headers

    def _to_blob_server(self, flow: http.HTTPFlow, st: FlowState, plan: Plan) -> None:
        """Route the flow to the local blob server under a one-time ticket; the upstream credential travels
        in the ticket (memory), not in the request."""
        service = self._service
        if service is None or plan.job is None:
            return
        req = flow.request
        path = service.ticket(plan.job)
        st.upstream_auth = None
        req.scheme = "http"
        req.data.host = "127.0.0.1"
        req.data.port = service.port
        netloc = f"127.0.0.1:{service.port}"
        if req.is_http2 or req.is_http3:
            req.authority = netloc
        else:
            req.headers["Host"] = netloc
        req.path = path
        flow.comment = f"registryproxy: {st.log_path} via {st.match.mapping.label if st.match else '-'} from the cache ({st.cache})"

    async def _current(self, settings: CacheSettings | None) -> CacheService | None:
        """The service for the configuration's `cache:` section, opened (or reopened after a reload that
        changed the store) on first use; None without a cache or while the store cannot be opened."""
        service = self._service
        if settings is None:
            if service is not None:
                self._service = None
                background.spawn(service.aclose(RELOAD_GRACE))
            return None
        if service is not None and _same_store(service.settings, settings):
            if service.settings != settings:
                service.reconfigure(settings)
            return service
        async with self._lock:
            service = self._service
            if service is not None and _same_store(service.settings, settings):
                return service
            if time.monotonic() < self._retry_at:
                return None
            if self._spool is None:
                self._spool = tempfile.TemporaryDirectory(prefix="registryproxy-spool-")
            try:
                new = await CacheService.open(settings, Path(self._spool.name), self._observer)
            except StoreError as e:
                self._retry_at = time.monotonic() + RETRY_OPEN
                logger.error("registryproxy: cache store %s cannot be opened (%s); serving uncached", settings.store, e)
                return None
            self._service = new
            if service is not None:
                background.spawn(service.aclose(RELOAD_GRACE))
            return new


def _same_store(a: CacheSettings, b: CacheSettings) -> bool:
    return a.path == b.path and a.s3 == b.s3


def _length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None
