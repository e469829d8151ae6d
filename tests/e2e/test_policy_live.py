"""A mapping's policy (`allow`, `deny`, `digests: resolved`; docs/policy.md): real docker-registry upstreams,
skopeo, ctr and docker, a real mitmdump.

The module's upstream uses token auth (rig/token_issuer.py), so both its registry requests (its request tap,
rig/tap.py) and its token requests (the issuer's record) are counted: a refused name reaches neither.

- skopeo, ctr and docker: an admitted tag pulls with the upstream's digest; a tag the policy refuses (not
  allowed; allowed but denied), a repository it denies: the client fails with `denied`, and the upstream saw
  no request (and no token request) naming it.
- A tags list is filtered to admitted tags (signature tags included), with `n`/`last` paging right.
- A signature tag (`sha256-<hex>.sig`) of an admitted digest pulls although no tag rule admits it.
- The digest gap (skopeo, ctr and docker): without `digests: resolved`, a digest pull of a refused tag's
  image works (documented); with it and a cache, the same pull is refused (and its blobs), while an admitted
  tag's digests (an index and its platform manifests and blobs) are admitted, also after a restart (the record
  is in the store), and through a second proxy on the same S3 bucket (replicas share the record).
- A reload that tightens a policy applies to the next request.
- An HTTPS upstream (the rig's `https-basic`): admitted and refused alike.
- Mirror mode: a root mapping's policy decides on the whole name of a `?ns=docker.io` request.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rig import clients, daemons, images, matrix, proxy, registry
from rig.https_upstream import HttpsRig
from rig.procs import wait_until
from rig.pullers import Puller
from rig.swift import Swift

pytestmark = pytest.mark.e2e

KEY_HEX = "d7" * 32
CLIENTS = ["skopeo", "ctr", "docker"]
POLICY: dict[str, Any] = {"allow": ["app:v*", "app:multi", "other/**"], "deny": ["app:v2*", "blocked"]}
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]


class Content:
    """The module's upstream and what it holds: platform/app v1, v2, latest (three images), multi (an index),
    the signature tag of v1; platform/blocked:v1."""

    def __init__(self, up: registry.Upstream, digests: dict[str, str]) -> None:
        self.up, self.digests = up, digests
        self.sig_tag = "sha256-" + digests["v1"].removeprefix("sha256:") + ".sig"


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Content]:
    base = tmp_path_factory.mktemp("policy")
    up = registry.start_upstream("token", base / "up")
    layout = base / "layout"
    digests: dict[str, str] = {}
    for i, tag in enumerate(("v1", "v2", "latest")):
        images.build_image(layout, tag, layers=(1024 + i, 2000 + i), seed=f"policy-{tag}")
        digests[tag] = images.push(layout, tag, up, "platform/app", tag)
    images.build_index(layout, "multi", layers=(1500, 700), seed="policy-multi")
    digests["multi"] = images.push(layout, "multi", up, "platform/app", "multi", all=True)
    images.build_image(layout, "sig", layers=(300,), seed="policy-sig")
    c = Content(up, digests)
    digests["sig"] = images.push(layout, "sig", up, "platform/app", c.sig_tag)
    digests["blocked"] = images.push(layout, "v1", up, "platform/blocked", "v1")
    yield c
    up.stop()


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Containerd]:
    d = daemons.start_containerd(tmp_path_factory.mktemp("policy-containerd"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def dockerd(containerd: daemons.Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Dockerd]:
    d = daemons.start_dockerd(tmp_path_factory.mktemp("policy-dockerd"), containerd)
    yield d
    d.stop()


def config(up: registry.Upstream, policy: dict[str, Any], store: Path | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"secretkey": KEY_HEX, "proxies": {"p/": {**matrix._mapping(up, "platform"), **policy}}}
    if store is not None:
        cfg["cache"] = {"store": str(store)}
    return cfg


def upstream_paths(up: registry.Upstream) -> list[str]:
    return [r.path for r in up.access_records()]


def token_scopes(up: registry.Upstream) -> list[str]:
    assert up.token_issuer is not None
    return [s for r in up.token_issuer.requests() for s in r.params.get("scope", [])]


def clear(up: registry.Upstream) -> None:
    up.clear_access_log()
    if up.token_issuer is not None:
        up.token_issuer.clear()


def get(rp: proxy.ProxyProc, path: str, name: str, method: str = "GET") -> httpx.Response:
    tok = httpx.get(f"{rp.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30).json()["token"]
    headers = [("Authorization", f"Bearer {tok}")] + [("Accept", t) for t in MANIFEST_TYPES]
    return httpx.request(method, f"{rp.url}{path}", headers=headers, timeout=30)


def denied(r: httpx.Response, what: str) -> bool:
    err = r.json()["errors"][0]
    return r.status_code == 403 and err == {"code": "DENIED", "message": f"the policy of mapping p/ refuses {what}"}


def said_denied(output: str) -> bool:
    """What a client says about a 403 DENIED: skopeo and docker quote the error, ctr names the status."""
    low = output.lower()
    return "denied" in low or "403 forbidden" in low


def rewrite_config(rp: proxy.ProxyProc, cfg: dict[str, Any]) -> None:
    before = rp.output().count("configuration reloaded")
    tmp = rp.config_path.with_name(rp.config_path.name + ".new")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, rp.config_path)
    wait_until(lambda: rp.output().count("configuration reloaded") > before, 15, "the reload", rp.output)


# --- admitted and refused, through every client -----------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_admitted_tags_pull_and_refused_ones_are_denied_without_an_upstream_request(
    request: pytest.FixtureRequest, content: Content, make_proxy: Any, tmp_path: Path, client: str
) -> None:
    up, digests = content.up, content.digests
    puller = Puller(client, request, tmp_path, "policy")
    rp = make_proxy(config(up, POLICY))
    assert puller.pull(rp, "p/app:v1") == digests["v1"], puller.last
    assert puller.pull(rp, "p/app:multi") == digests["multi"], puller.last
    clear(up)
    for name in ("p/app:latest", "p/app:v2", "p/blocked:v1"):
        assert puller.pull(rp, name) is None, f"{name} pulled\n{puller.last}"
        assert said_denied(puller.last), puller.last
    assert not [p for p in upstream_paths(up) if "/manifests/" in p or "/blobs/" in p or "blocked" in p]
    assert not [s for s in token_scopes(up) if "blocked" in s], token_scopes(up)


def test_refusals_answer_403_denied_naming_the_mapping_and_what_is_refused(content: Content, make_proxy: Any) -> None:
    up = content.up
    rp = make_proxy(config(up, POLICY))
    clear(up)
    assert denied(get(rp, "/v2/p/app/manifests/latest", "p/app"), "this tag")
    assert denied(get(rp, "/v2/p/app/manifests/v2", "p/app"), "this tag")
    assert denied(get(rp, "/v2/p/blocked/manifests/v1", "p/blocked"), "this repository")
    assert denied(get(rp, "/v2/p/blocked/tags/list", "p/blocked"), "this repository")
    assert denied(get(rp, "/v2/p/nothere/manifests/v1", "p/nothere"), "this repository")  # no allow names it
    head = get(rp, "/v2/p/app/manifests/latest", "p/app", "HEAD")
    assert head.status_code == 403 and head.content == b""
    assert "app:v*" not in rp.output() and "blocked" not in "".join(token_scopes(up))
    assert not [p for p in upstream_paths(up) if "/manifests/" in p or "blocked" in p or "nothere" in p]


# --- tags lists, signatures ---------------------------------------------------------------------


def test_a_tags_list_holds_only_admitted_tags_and_pages_right(content: Content, make_proxy: Any) -> None:
    rp = make_proxy(config(content.up, POLICY))
    want = sorted(["v1", "multi", content.sig_tag])
    r = get(rp, "/v2/p/app/tags/list", "p/app")
    assert r.status_code == 200 and r.json() == {"name": "p/app", "tags": want}, r.text
    pages, path = [], "/v2/p/app/tags/list?n=1"
    for _ in range(5):
        r = get(rp, path, "p/app")
        assert r.status_code == 200, r.text
        pages.append(r.json()["tags"])
        link = r.headers.get("link")
        if link is None:
            break
        path = link.split(">")[0].lstrip("<")
    assert pages == [[t] for t in want], pages
    assert get(rp, f"/v2/p/app/tags/list?n=2&last={want[0]}", "p/app").json()["tags"] == want[1:]
    listed = subprocess.run(
        ["skopeo", "list-tags", "--tls-verify=false", f"docker://{rp.host}/p/app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(listed.stdout)["Tags"] == want


def test_a_signature_tag_of_an_admitted_digest_pulls_whatever_the_tag_rules(
    content: Content, make_proxy: Any, tmp_path: Path
) -> None:
    rp = make_proxy(config(content.up, {"allow": ["app:v1"], "deny": ["app:sha256-*"]}))
    copied = clients.skopeo_copy(f"{rp.host}/p/app:{content.sig_tag}", tmp_path / "sig", tag="t")
    assert copied.check().digest == content.digests["sig"]


# --- the digest gap, and digests: resolved -------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_without_digests_resolved_a_digest_pull_of_a_refused_tag_works(
    request: pytest.FixtureRequest, content: Content, make_proxy: Any, tmp_path: Path, client: str
) -> None:
    """The documented gap: tag rules apply to tags; a digest of the repository is the repository's."""
    puller = Puller(client, request, tmp_path, "policy")
    rp = make_proxy(config(content.up, POLICY))
    assert puller.pull(rp, "p/app:latest") is None, puller.last
    assert puller.pull(rp, f"p/app@{content.digests['latest']}") == content.digests["latest"], puller.last


@pytest.mark.parametrize("client", CLIENTS)
def test_digests_resolved_closes_the_gap_and_admits_what_admitted_tags_resolve(
    request: pytest.FixtureRequest, content: Content, make_proxy: Any, tmp_path: Path, client: str
) -> None:
    up, digests = content.up, content.digests
    puller = Puller(client, request, tmp_path, "policy")
    cfg = config(up, {**POLICY, "digests": "resolved"}, tmp_path / "store")
    rp = make_proxy(cfg)
    clear(up)
    assert puller.pull(rp, f"p/app@{digests['latest']}") is None, puller.last
    assert said_denied(puller.last), puller.last
    assert not [p for p in upstream_paths(up) if digests["latest"] in p]
    # ctr and docker HEAD the tag, then GET the index and its platform manifests by digest.
    assert puller.pull(rp, "p/app:multi") == digests["multi"], puller.last
    assert puller.pull(rp, f"p/app@{digests['multi']}") == digests["multi"], puller.last
    # The record is in the store: a new process on it admits the digest.
    rp.stop()
    again = make_proxy(cfg)
    assert puller.pull(again, f"p/app@{digests['multi']}") == digests["multi"], puller.last
    manifest = get(again, f"/v2/p/app/manifests/{digests['latest']}", "p/app")
    assert denied(manifest, "this digest (not resolved from an admitted tag)")


def test_digests_resolved_refuses_the_blobs_of_a_refused_image(
    content: Content, make_proxy: Any, tmp_path: Path
) -> None:
    up, digests = content.up, content.digests
    rp = make_proxy(config(up, {**POLICY, "digests": "resolved"}, tmp_path / "store"))
    body, _, _ = images.get_manifest(up, "platform/app", "latest")
    layer = yaml.safe_load(body)["layers"][0]["digest"]
    clear(up)
    assert denied(get(rp, f"/v2/p/app/blobs/{layer}", "p/app"), "this digest (not resolved from an admitted tag)")
    assert not [p for p in upstream_paths(up) if p != "/v2/"]  # the token realm's discovery only
    copied = clients.skopeo_copy(f"{rp.host}/p/app:v1", tmp_path / "v1", tag="t")
    assert copied.check().digest == digests["v1"]
    v1_body, _, _ = images.get_manifest(up, "platform/app", "v1")
    v1_layer = yaml.safe_load(v1_body)["layers"][0]["digest"]
    assert get(rp, f"/v2/p/app/blobs/{v1_layer}", "p/app").status_code == 200


# --- reload, HTTPS -------------------------------------------------------------------------------


def test_a_reload_that_tightens_the_policy_applies_to_the_next_request(
    content: Content, make_proxy: Any, tmp_path: Path
) -> None:
    up, digests = content.up, content.digests
    rp = make_proxy(config(up, POLICY))
    assert clients.skopeo_copy(f"{rp.host}/p/app:v1", tmp_path / "a", tag="t").check().digest == digests["v1"]
    rewrite_config(rp, config(up, {**POLICY, "deny": [*POLICY["deny"], "app:v1"]}))
    clear(up)
    refused = clients.skopeo_copy(f"{rp.host}/p/app:v1", tmp_path / "b", tag="t")
    assert not refused.ok and said_denied(refused.describe()), refused.describe()
    assert not [p for p in upstream_paths(up) if "/manifests/" in p]
    assert "v1" not in get(rp, "/v2/p/app/tags/list", "p/app").json()["tags"]


def test_an_https_upstream_is_served_by_its_policy(https_rig: HttpsRig, make_proxy: Any, tmp_path: Path) -> None:
    up = https_rig["https-basic"]
    cfg = config(up, {"allow": ["app:v1"]})
    cfg["ca_file"] = str(https_rig.ca.ca_cert)
    rp = make_proxy(cfg)
    want = https_rig.digests["https-basic"][("platform/app", "v1")]
    assert clients.skopeo_copy(f"{rp.host}/p/app:v1", tmp_path / "a", tag="t").check().digest == want
    up.clear_access_log()
    refused = clients.skopeo_copy(f"{rp.host}/p/app:multi", tmp_path / "b", tag="t")
    assert not refused.ok and said_denied(refused.describe()), refused.describe()
    assert not [p for p in upstream_paths(up) if "/manifests/" in p]


def test_replicas_on_one_s3_bucket_share_the_record_of_resolved_digests(
    swift_s3: Swift, content: Content, make_proxy: Any, tmp_path: Path
) -> None:
    up, digests = content.up, content.digests
    bucket = f"rp-policy-{uuid.uuid4().hex[:12]}"
    swift_s3.create_bucket(bucket)
    cfg = config(up, {**POLICY, "digests": "resolved"})
    cfg["cache"] = {
        "store": f"s3://{bucket}/rp",
        "s3": {
            "endpoint_url": swift_s3.endpoint_url,
            "region": swift_s3.region,
            "access_key_id_env": "POLICY_S3_KEY_ID",
            "secret_access_key_env": "POLICY_S3_SECRET",
        },
    }
    env = {"POLICY_S3_KEY_ID": swift_s3.proxy_access_key_id, "POLICY_S3_SECRET": swift_s3.proxy_secret_access_key}
    one, two = make_proxy(cfg, env=env), make_proxy(cfg, env=env)
    by_digest = f"/v2/p/app/manifests/{digests['v1']}"
    assert denied(get(two, by_digest, "p/app"), "this digest (not resolved from an admitted tag)")
    assert clients.skopeo_copy(f"{one.host}/p/app:v1", tmp_path / "a", tag="t").check().digest == digests["v1"]
    # Resolved through the first replica: the second admits the digest, and pulls the image by it.
    assert get(two, by_digest, "p/app").status_code == 200
    copied = clients.skopeo_copy(f"{two.host}/p/app@{digests['v1']}", tmp_path / "b", tag="t")
    assert copied.check().digest == digests["v1"]
    assert denied(
        get(two, f"/v2/p/app/manifests/{digests['latest']}", "p/app"), "this digest (not resolved from an admitted tag)"
    )


def test_a_root_mappings_policy_decides_on_the_whole_name_of_a_mirror_request(
    content: Content, make_proxy: Any
) -> None:
    """containerd's `?ns=docker.io` through a root mapping (mirror mode): the policy sees the whole name."""
    up = content.up
    root = {**matrix._mapping(up, "platform"), "mirror_of": ["docker.io"], "allow": ["app"], "deny": ["app:latest"]}
    rp = make_proxy({"secretkey": KEY_HEX, "proxies": {"*": root}})

    def mirrored(name: str, ref: str) -> httpx.Response:
        r = httpx.get(f"{rp.url}/ns/docker.io/token", params={"scope": f"repository:{name}:pull"}, timeout=30)
        headers = [("Authorization", f"Bearer {r.json()['token']}")] + [("Accept", t) for t in MANIFEST_TYPES]
        return httpx.get(f"{rp.url}/v2/{name}/manifests/{ref}?ns=docker.io", headers=headers, timeout=30)

    clear(up)
    ok = mirrored("app", "v1")
    assert ok.status_code == 200 and ok.headers["docker-content-digest"] == content.digests["v1"]
    for name, ref, what in (("app", "latest", "this tag"), ("blocked", "v1", "this repository")):
        r = mirrored(name, ref)
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["message"] == f"the policy of mapping * refuses {what}"
    assert not [p for p in upstream_paths(up) if "latest" in p or "blocked" in p]
    assert not [s for s in token_scopes(up) if "blocked" in s]
