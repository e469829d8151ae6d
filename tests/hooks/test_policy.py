"""steps/policy.py in the whole chain, in-process: refusals answered in `requestheaders` (nothing goes
upstream), tags lists filtered with `n`/`last`, a reload that tightens, signature tags, and
`digests: resolved` with and without a record of the digest in the cache store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from hooks.conftest import Chain, config_text, request_flow, sample
from mitmproxy import http
from regproxy.cache import keys
from regproxy.flow import state as flowstate
from regproxy.steps.cache import Cache
from regproxy.steps.policy import ServePolicy
from regproxy.tokens.paseto import Grant

HOST = "reg.test"
UPSTREAM = "http://127.0.0.1:5002"
HEX = "cd" * 32
POLICY = {"allow": ["app:v*", "app:multi", "other/**"], "deny": ["app:v2*", "blocked"]}


def cfg(policy: dict[str, Any], **settings: Any) -> str:
    return config_text({"p/": {"registry": UPSTREAM, "remote": "platform", **policy}}, **settings)


def pull(chain: Chain, path: str, name: str, method: str = "GET") -> http.HTTPFlow:
    mapping = next(m for m in chain.state.config.mappings if m.key == "p/")
    tok = chain.state.codec.issue_access(f"http://{HOST}", (Grant(mapping.identity, (name,), "T"),), 60)
    f = request_flow(path, method, [("Authorization", f"Bearer {tok}")], HOST)
    asyncio.run(chain.hook("requestheaders", f))
    return f


def refused(f: http.HTTPFlow, what: str, method: str = "GET") -> None:
    """403 DENIED, answered in `requestheaders` (mitmproxy sends a flow answered there nowhere): the flow is
    local again and holds no upstream credential."""
    assert f.response is not None and f.response.status_code == 403
    st = flowstate.of(f)
    assert st is not None and st.kind == "local" and st.upstream_auth is None
    if method == "GET":
        assert (
            f.response.content
            == json.dumps(
                {"errors": [{"code": "DENIED", "message": f"the policy of mapping p/ refuses {what}"}]},
                separators=(",", ":"),
            ).encode()
        )
    else:
        assert f.response.content == b"" and int(f.response.headers["content-length"]) > 0


def forwarded(f: http.HTTPFlow) -> None:
    assert f.response is None and (f.request.host, f.request.port) == ("127.0.0.1", 5002)


def test_refused_tags_and_repositories_answer_403_denied_and_go_nowhere(make_chain: Any) -> None:
    chain = make_chain(cfg(POLICY))
    refused(pull(chain, "/v2/p/app/manifests/latest", "p/app"), "this tag")
    refused(pull(chain, "/v2/p/app/manifests/v2.1", "p/app"), "this tag")
    refused(pull(chain, "/v2/p/app/manifests/latest", "p/app", "HEAD"), "this tag", "HEAD")
    refused(pull(chain, "/v2/p/blocked/manifests/v1", "p/blocked"), "this repository")
    refused(pull(chain, f"/v2/p/blocked/blobs/sha256:{HEX}", "p/blocked"), "this repository")
    refused(pull(chain, "/v2/p/blocked/tags/list", "p/blocked"), "this repository")
    refused(pull(chain, "/v2/p/nope/manifests/v1", "p/nope"), "this repository")
    forwarded(pull(chain, "/v2/p/app/manifests/v1", "p/app"))
    forwarded(pull(chain, f"/v2/p/app/manifests/sha256:{HEX}", "p/app"))  # a digest: the repository decides
    forwarded(pull(chain, f"/v2/p/other/a/b/blobs/sha256:{HEX}", "p/other/a/b"))
    metrics = chain.find(ServePolicy).metrics
    counted = {
        r: sample(metrics, "registryproxy_policy_refusals_total", mapping="p/", refused=r)
        for r in ("tag", "repository")
    }
    assert counted == {"tag": 3, "repository": 4}


def test_signature_tags_of_an_admitted_repository_are_admitted_whatever_the_tag_rules(make_chain: Any) -> None:
    chain = make_chain(cfg({"allow": ["app:v1"], "deny": ["app:sha256-*"]}))
    forwarded(pull(chain, f"/v2/p/app/manifests/sha256-{HEX}.sig", "p/app"))
    forwarded(pull(chain, f"/v2/p/app/manifests/sha256-{HEX}.att", "p/app"))
    refused(pull(chain, f"/v2/p/app/manifests/sha256-{HEX}.other", "p/app"), "this tag")


def tags_answer(chain: Chain, query: str, tags: list[str]) -> tuple[list[str], str | None]:
    f = pull(chain, f"/v2/p/app/tags/list{query}", "p/app")
    forwarded(f)
    f.response = http.Response.make(200, json.dumps({"name": "platform/app", "tags": tags}).encode())
    chain.run("responseheaders", f)
    chain.run("response", f)
    assert f.response is not None
    body = json.loads(f.response.content or b"")
    assert body["name"] == "p/app"
    return body["tags"], f.response.headers.get("link")


def test_a_tags_list_holds_only_admitted_tags_and_pages_on_them(make_chain: Any) -> None:
    chain = make_chain(cfg(POLICY))
    upstream = ["latest", "v1", "v2", "v3", "multi", "x", f"sha256-{HEX}.sig", "v20"]
    assert tags_answer(chain, "", upstream) == (sorted(["multi", "v1", "v3", f"sha256-{HEX}.sig"]), None)
    # Upstream ignores `n` (distribution 2.8): the page is cut here, after the filter.
    tags, link = tags_answer(chain, "?n=2", upstream)
    assert (
        tags == ["multi", f"sha256-{HEX}.sig"]
        and link == f'</v2/p/app/tags/list?n=2&last=sha256-{HEX}.sig>; rel="next"'
    )
    tags, link = tags_answer(chain, f"?n=2&last=sha256-{HEX}.sig", upstream)
    assert tags == ["v1", "v3"] and link is None


def test_a_reload_that_tightens_the_policy_applies_to_the_next_request(make_chain: Any, tmp_path: Path) -> None:
    chain = make_chain(cfg(POLICY))
    forwarded(pull(chain, "/v2/p/app/manifests/v1", "p/app"))
    path = Path(chain.tctx.options.registryproxy_config)
    path.write_text(cfg({**POLICY, "deny": [*POLICY["deny"], "app:v1"]}))
    chain.config.reload("test")
    refused(pull(chain, "/v2/p/app/manifests/v1", "p/app"), "this tag")


def test_digests_resolved_admits_only_recorded_digests_of_admitted_tags(make_chain: Any, tmp_path: Path) -> None:
    chain = make_chain(cfg({**POLICY, "digests": "resolved"}, cache={"store": str(tmp_path / "store")}))
    digest = f"/v2/p/app/manifests/sha256:{HEX}"
    refused(pull(chain, digest, "p/app"), "this digest (not resolved from an admitted tag)")
    refused(pull(chain, f"/v2/p/app/blobs/sha256:{HEX}", "p/app"), "this digest (not resolved from an admitted tag)")
    refused(
        pull(chain, f"/v2/p/app/manifests/sha256-{HEX}.sig", "p/app"), "this digest (not resolved from an admitted tag)"
    )

    async def record(tag: str) -> None:
        cache = chain.find(Cache)
        service = await cache.holder.current(chain.state.config.cache)
        assert service is not None
        mapping = chain.state.config.mappings[0]
        link = keys.link_id(mapping.key, mapping.upstream.origin, "platform/app")
        await service.admit(link, [HEX], tag)

    asyncio.run(record("v1"))
    for path in (f"/v2/p/app/blobs/sha256:{HEX}", f"/v2/p/app/manifests/sha256-{HEX}.sig"):
        f = pull(chain, path, "p/app", "HEAD")
        assert f.response is None or f.response.status_code != 403, path  # admitted: on to the cache
    # A record from a tag the policy refuses now admits nothing.
    asyncio.run(record("latest"))
    refused(pull(chain, digest, "p/app"), "this digest (not resolved from an admitted tag)")


def test_under_digests_resolved_a_tags_list_shows_signature_tags_of_admitted_digests_only(
    make_chain: Any, tmp_path: Path
) -> None:
    chain = make_chain(cfg({**POLICY, "digests": "resolved"}, cache={"store": str(tmp_path / "store")}))
    other = "ef" * 32

    async def record() -> None:
        service = await chain.find(Cache).holder.current(chain.state.config.cache)
        assert service is not None
        mapping = chain.state.config.mappings[0]
        await service.admit(keys.link_id(mapping.key, mapping.upstream.origin, "platform/app"), [HEX], "v1")

    asyncio.run(record())
    upstream = ["v1", "latest", f"sha256-{HEX}.sig", f"sha256-{HEX}.att", f"sha256-{other}.sig"]
    tags, link = tags_answer(chain, "", upstream)
    assert tags == [f"sha256-{HEX}.att", f"sha256-{HEX}.sig", "v1"] and link is None


def test_a_mirror_requests_whole_name_is_what_the_policy_decides(make_chain: Any) -> None:
    chain = make_chain(
        config_text({"*": {"registry": UPSTREAM, "mirror_of": ["docker.io"], "allow": ["library/*"], "deny": ["x/**"]}})
    )
    root = chain.state.config.mappings[0]

    def mirrored(path: str, name: str) -> http.HTTPFlow:
        base = f"http://{HOST}/ns/docker.io"
        tok = chain.state.codec.issue_access(base, (Grant(root.identity, (name,), "T"),), 60)
        f = request_flow(f"{path}?ns=docker.io", "GET", [("Authorization", f"Bearer {tok}")], HOST)
        asyncio.run(chain.hook("requestheaders", f))
        return f

    forwarded(mirrored("/v2/library/nginx/manifests/1", "library/nginx"))
    f = mirrored("/v2/x/library/nginx/manifests/1", "x/library/nginx")
    assert f.response is not None and f.response.status_code == 403
    assert b"the policy of mapping * refuses this repository" in (f.response.content or b"")
