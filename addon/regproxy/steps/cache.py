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

import contextlib
import logging
import time
import weakref

import httpx
from mitmproxy import http

from ..cache import admitted, keys, plans
from ..cache.jobs import BlobJob
from ..cache.keys import TagRecord
from ..cache.plans import Plan
from ..cache.service import CacheHolder, CacheService
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


class Cache:
    def __init__(self, config: Configuration, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics.cache
        self.holder = CacheHolder(self.metrics)
        self._plans: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()
        self._fills: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()

    def running(self) -> None:
        # Open the store (and load its libraries) now, not on the first pull, which would wait for it.
        state = self.config.state
        if state is not None and state.config.cache is not None:
            background.spawn(self._open_early(state.config.cache))

    async def _open_early(self, settings: CacheSettings) -> None:
        try:
            await self.holder.current(settings)
        except Exception as e:  # noqa: BLE001 - the first request tries again, and answers for itself
            logger.error("registryproxy: the cache could not be opened at start (%s)", type(e).__name__)

    async def done(self) -> None:
        await self.holder.aclose()

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
        service = await self.holder.current(state.config.cache)
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
        self.metrics.request(kind, st.cache)
        service = self.holder.service
        if service is not None:
            self.metrics.store_size(service.index.total)
        if plan is None:
            return
        if st.cache in ("hit", "stale"):
            flow.marked = MARK_CACHED
        match plan.kind:
            case "local":
                answers.answer_locally(flow, plan.status, plan.body, plan.headers)
                if plan.length is not None and flow.response is not None:
                    flow.response.headers["Content-Length"] = str(plan.length)
                self.metrics.served(plan.served if flow.request.method == "GET" else 0)
            case "redirect":
                answers.answer_locally(flow, 307, b"", plan.headers)
            case "blob":
                if service is not None:
                    self._to_blob_server(flow, st, plan, service)
            case "fill":
                self._fills[flow] = plan

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        plan = self._fills.pop(flow, None)
        resp = flow.response
        service = self.holder.service
        if plan is None or resp is None or service is None or resp.status_code != 200 or flow.request.method != "GET":
            return
        st = flowstate.of(flow)
        if st is None or st.streamed or resp.raw_content is None or resp.headers.get("content-encoding"):
            return  # streamed (too large or of unknown length): not cached
        body = resp.raw_content
        failed = await service.fill_manifest(
            plan.link,
            body,
            resp.headers.get("content-type", ""),
            expected=plan.hex if plan.tag is None else None,  # a tag may have moved since its HEAD
            stated=keys.parse_digest(resp.headers.get("docker-content-digest", "")),
            tag=plan.tag,
        )
        if failed is None:
            self.metrics.filled(len(body))
            await self._admit(st, service, plan.link, keys.sha256_hex(body), body)
        elif failed == "digest_mismatch":
            self.metrics.fill_failure(failed)
            logger.warning(
                "registryproxy: %s: the upstream's manifest does not match its digest; not cached", st.log_path
            )

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
                await self._admit(st, service, link, hex_digest, found.body)
                st.cache = "hit"
                return plans.manifest(found, hex_digest)
            st.cache = "fill" if get else "miss"
            return Plan("fill", link=link, hex=hex_digest) if get else None

        record = await service.tag(link, reference)
        ttl = service.settings.tag_ttl
        if record is not None and ttl > 0 and time.time() - record.checked < ttl:
            found = await service.manifest_of(link, record)
            if found is not None:
                await self._admit(st, service, link, keys.parse_digest(record.digest) or "", found.body)
                return self._tag_hit(st, get, found, record.digest)

        client = self.config.client
        if client is None:
            st.cache = "miss"
            return None
        try:
            head = await client.head(match.mapping, flow.request.url, self._upstream_headers(flow, st))
        except UpstreamError as e:
            err = for_proxy_failure(504 if e.timeout else 502)
            return await self._stale(st, service, match, link, record, str(e), err)
        status = head.status_code
        if status >= 500 or status == 429:
            retry = head.headers.get("retry-after")
            headers = {"Retry-After": retry} if status == 429 and retry and retry.isdigit() else {}
            err = for_upstream_status(status, "manifest")
            return await self._stale(st, service, match, link, record, f"upstream answered {status}", err, headers)
        st.cache = "miss"
        if status == 404:
            return plans.error(for_upstream_status(404, "manifest"))
        if status != 200:
            return None  # 401, 403, ...: upstream, as without a cache (the rewrite answers it)
        named = keys.parse_digest(head.headers.get("docker-content-digest", ""))
        if named is None:
            st.cache = "fill" if get else "miss"
            return Plan("fill", link=link, tag=reference) if get else None
        media_type = head.headers.get("content-type", "")
        length = head.headers.get("content-length", "")
        size = int(length) if length.isdigit() else 0
        await service.put_tag(link, reference, TagRecord(f"sha256:{named}", media_type, size, time.time()))
        found = await service.manifest(link, named)
        await self._admit(st, service, link, named, found.body if found is not None else None)
        if found is not None:
            return self._tag_hit(st, get, found, f"sha256:{named}")
        if get:
            st.cache = "fill"
            return Plan("fill", link=link, hex=named, tag=reference)
        return plans.manifest_head(media_type, named, size)

    def _tag_hit(self, st: FlowState, get: bool, found: plans.CachedManifest, digest: str) -> Plan:
        """A tag answered from the store: an upstream manifest GET spared (for a GET)."""
        if get:
            self.metrics.manifest_get_saved()
        st.cache = "hit"
        return plans.manifest(found, keys.parse_digest(digest) or "")

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
            found = await service.manifest_of(link, record)
            if found is not None:
                await self._admit(st, service, link, keys.parse_digest(record.digest) or "", found.body)
                self.metrics.stale(match.mapping.label)
                logger.warning(
                    "registryproxy: %s: %s; answered from the cache (stale: the upstream named it %ds ago)",
                    st.log_path,
                    reason,
                    int(age),
                )
                st.cache = "stale"
                return plans.manifest(found, keys.parse_digest(record.digest) or "")
        st.cache = "miss"
        return plans.error(err, headers)

    async def _blob(
        self, flow: http.HTTPFlow, st: FlowState, service: CacheService, link: str, reference: str
    ) -> Plan | None:
        hex_digest = keys.parse_digest(reference)
        if hex_digest is None:
            return None  # not a sha256 digest: not cached
        found = await service.blob(link, hex_digest)
        if flow.request.method == "HEAD":
            st.cache = "miss" if found is None else "hit"
            return plans.blob_head(hex_digest, found.size) if found is not None else None
        st.cache = "fill" if found is None else "hit"
        if found is not None:
            url = await service.presign_blob(hex_digest)
            if url is not None:
                return Plan("redirect", 307, headers={"Location": url}, served=found.size)
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

    @staticmethod
    async def _admit(st: FlowState, service: CacheService, link: str, hex_digest: str, body: bytes | None) -> None:
        """Under `digests: resolved` (policy's `st.admitted_via`): record the manifest and what it lists."""
        if st.admitted_via is not None and hex_digest:
            await service.admit(link, [hex_digest, *admitted.listed(body)], st.admitted_via)

    def _blob_done(self, outcome: str, sent: int) -> None:
        if outcome == "hit":
            self.metrics.served(sent)

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

    @staticmethod
    def _to_blob_server(flow: http.HTTPFlow, st: FlowState, plan: Plan, service: CacheService) -> None:
        """Route the flow to the local blob server under a one-time ticket; the upstream credential travels
        in the ticket (memory), not in the request."""
        if plan.job is None:
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
        label = st.match.mapping.label if st.match else "-"
        flow.comment = f"registryproxy: {st.log_path} via {label} from the cache ({st.cache})"
