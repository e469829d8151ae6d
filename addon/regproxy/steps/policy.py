"""Policy: what a mapping serves (its `allow`, `deny` and `digests` keys; the decisions are policy/'s).

Right after `Router` matched the name and before the cache plans anything or anything goes upstream,
`requestheaders` decides the request by the mapping's policy and answers a refusal itself: `403 DENIED`
naming the mapping (its label) and what its policy refuses (the repository, the tag, the digest), never
its patterns. What it admits goes on:
- a tags list through a mapping with a policy lists only the tags the policy admits (`st.tag_filter`,
  applied by the rewrite before the page is cut); under `digests: resolved` a signature tag is listed
  when the digest it names is admitted (looked up in `response`, before the rewrite);
- under `digests: resolved` (which needs the cache) a digest reference (a manifest by digest, a blob, a
  referrers list, the digest a signature tag names) is admitted only when the cache store records it as
  resolved from a tag the policy still admits; for an admitted tag (or digest) `st.admitted_via` names
  the tag, and the cache step records what it resolves or stores under it (cache/admitted.py lists it).
"""

from __future__ import annotations

import json

from mitmproxy import http

from ..cache import keys
from ..cache.service import CacheHolder, CacheService
from ..flow import answers
from ..flow import state as flowstate
from ..flow.answers import fail_closed
from ..mapping.matcher import Match, policy_names
from ..ops.metrics import Metrics
from ..policy import Policy, decide, narrowed, signed_digest
from ..policy.decide import Refusal
from ..protocol.errors import RegistryError
from ..protocol.names import RouteKind, is_valid_digest
from .config_loader import Configuration

MAX_SIGNATURE_LOOKUPS = 1000  # signature tags of one tags list looked up under `digests: resolved`
WHAT = {"repository": "this repository", "tag": "this tag", "digest": "this digest (not resolved from an admitted tag)"}


class ServePolicy:
    def __init__(self, config: Configuration, holder: CacheHolder, metrics: Metrics) -> None:
        self.config = config
        self.holder = holder
        self.metrics = metrics

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.of(flow)
        if flow.response or not flow.live or st is None or st.kind != "upstream":
            return
        match, route = st.match, st.route
        if match is None or route is None or not match.mapping.policy.restricts:
            return
        policy = match.mapping.policy
        names = policy_names(match)
        tag = route.reference if route.kind is RouteKind.MANIFEST and not is_valid_digest(route.reference) else None
        decision = decide(policy, names, tag)
        if decision.refused is not None:
            self._refuse(flow, match, decision.refused)
            return
        if route.kind is RouteKind.TAGS:
            mine = narrowed(policy, names)  # each tag is decided: by this repository's patterns only
            st.tag_filter = lambda t: _lists(mine, names, t, set())
            return
        if not policy.digests_resolved:
            return
        if tag is not None and decision.signature_of is None:
            st.admitted_via = tag
            return
        digest = decision.signature_of or route.reference
        origin = await self._resolved(match, policy, names, digest)
        if origin is None:
            self._refuse(flow, match, "digest")
            return
        st.admitted_via = origin

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        """Under `digests: resolved`: which signature tags of a tags list name an admitted digest."""
        st = flowstate.of(flow)
        resp = flow.response
        if st is None or st.kind != "upstream" or st.tag_filter is None or resp is None or resp.status_code != 200:
            return
        match = st.match
        if match is None or not match.mapping.policy.digests_resolved:
            return
        names = policy_names(match)
        policy = narrowed(match.mapping.policy, names)
        admitted: set[str] = set()
        for tag in _signature_tags(resp.content or b"")[:MAX_SIGNATURE_LOOKUPS]:
            signed = signed_digest(tag)
            if signed is not None and await self._resolved(match, policy, names, signed) is not None:
                admitted.add(tag)
        st.tag_filter = lambda t: _lists(policy, names, t, admitted)

    async def _resolved(self, match: Match, policy: Policy, names: tuple[str, ...], digest: str) -> str | None:
        """The tag a digest was resolved from, if the store records it and the policy still admits that tag."""
        hex_digest = keys.parse_digest(digest)
        service = await self._service()
        if hex_digest is None or service is None:
            return None
        link = keys.link_id(match.mapping.key, match.mapping.upstream.origin, match.upstream_name)
        record = await service.admitted(link, hex_digest)
        if record is None:
            return None
        again = decide(policy, names, record.tag)
        return record.tag if again.admitted and again.signature_of is None else None

    async def _service(self) -> CacheService | None:
        state = self.config.state
        return await self.holder.current(state.config.cache) if state is not None else None

    def _refuse(self, flow: http.HTTPFlow, match: Match, refused: Refusal) -> None:
        label = match.mapping.label
        self.metrics.policy_refused(label, refused)
        err = RegistryError(403, "DENIED", f"the policy of mapping {label} refuses {WHAT[refused]}")
        answers.answer_error(flow, err, note=f"policy refused the {refused}")


def _lists(policy: Policy, names: tuple[str, ...], tag: str, signatures: set[str]) -> bool:
    """Whether a tags list shows the tag: admitted, and a signature tag under `digests: resolved` only when
    the digest it names is admitted (`signatures`)."""
    decision = decide(policy, names, tag)
    if not decision.admitted:
        return False
    return decision.signature_of is None or not policy.digests_resolved or tag in signatures


def _signature_tags(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return []
    tags = data.get("tags") if isinstance(data, dict) else None
    return [t for t in tags if isinstance(t, str) and signed_digest(t) is not None] if isinstance(tags, list) else []
