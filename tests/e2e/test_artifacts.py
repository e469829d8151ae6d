"""Sigstore signatures through the proxy: found by skopeo and podman, checked against a policy, copied with `--all`.

Each test runs on every `side` (e2e/artifacts_rig.py): a plain-HTTP and an HTTPS token upstream, each with and
without the cache. Images are signed on the upstream the way cosign stores signatures (rig/sigstore.py: an
OCI image tagged `sha256-<hex>.sig` holding the simple-signing payload and its ECDSA signature, made with
a key in cosign's encrypted private-key format). What the tools here can and cannot do, seen with
skopeo 1.9.3 and podman 4.3.1 (Debian bookworm's containers/image 5.23.1):
- `skopeo copy --sign-by-sigstore-private-key` fails with "creating signature: Debian-local change:
  sigstore disabled", so the signature is made by rig/sigstore.py instead (the same manifest, payload
  and annotation cosign pushes);
- a `sigstoreSigned` requirement is enforced up to the signature's cryptographic check, which Debian's
  build refuses with "Source image rejected: Debian-local change: sigstore disabled": a signed image is
  FOUND through the proxy (both tools fetch the `.sig` manifest and its payload blob through it, the
  upstream sees those requests under its own names), and an unsigned image is REFUSED by the policy
  ("A signature was required, but no signature exists"). The signature itself is verified here with the
  public key, on the bytes the proxy served (the check containers/image makes: ECDSA P-256 over the
  payload, the payload naming the image's manifest digest).
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from e2e.artifacts_rig import Side, side
from rig import images, registry, sigstore
from rig.podman import Podman
from rig.procs import RigError, RunResult, run

pytestmark = pytest.mark.e2e
__all__ = ["side"]

DISABLED = "Debian-local change: sigstore disabled"
NO_SIGNATURE = "A signature was required, but no signature exists"
_seq = itertools.count()


def push_signed(
    s: Side, layout: Path, pair: sigstore.KeyPair, repo: str, *, index: bool = False
) -> tuple[str, dict[str, str]]:
    """An image (or multi-arch index) pushed as platform/REPO:v1 and signed, an index with each of its instances
    (`cosign sign --recursive`): (its digest, {signed digest: its `.sig` manifest's digest})."""
    seed = f"{s.name}-{repo}-{next(_seq)}"
    if index:
        images.build_index(layout, repo, layers=(1024, 512), seed=seed)
    else:
        images.build_image(layout, repo, layers=(1024,), seed=seed)
    digest = images.push(layout, repo, s.up, f"platform/{repo}", "v1", all=index)
    signed = [digest]
    if index:
        signed += [
            m["digest"] for m in json.loads(images.get_manifest(s.up, f"platform/{repo}", digest)[0])["manifests"]
        ]
    return digest, {d: sign(s, pair, repo, d) for d in signed}


def sign(s: Side, pair: sigstore.KeyPair, repo: str, digest: str) -> str:
    """Push the signature of platform/REPO@DIGEST (identity platform/REPO:v1) as cosign does; its manifest's digest."""
    payload = sigstore.simple_signing_payload(f"{s.upstream_prefix()}/{repo}:v1", digest)
    manifest, blobs = sigstore.signature_manifest(payload, sigstore.sign_payload(pair, payload))
    o = s.upstream_oras(f"platform/{repo}")
    for blob, media_type in zip(blobs, (sigstore.OCI_CONFIG, sigstore.SIGNATURE_MEDIA_TYPE), strict=True):
        o.push_blob(f"platform/{repo}", blob, media_type)
    return o.put_manifest(f"platform/{repo}", sigstore.signature_tag(digest), manifest, sigstore.OCI_MANIFEST)


def push_unsigned(s: Side, layout: Path, repo: str) -> str:
    images.build_image(layout, repo, layers=(1024,), seed=f"{s.name}-{repo}-{next(_seq)}")
    return images.push(layout, repo, s.up, f"platform/{repo}", "v1")


def verify_through_proxy(s: Side, pair: sigstore.KeyPair, repo: str, digest: str) -> None:
    """The signature as the proxy serves it: the public key verifies it, and its payload names `digest`."""
    o = s.proxy_oras()
    r = o.get_manifest(f"a/{repo}", sigstore.signature_tag(digest))
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == images.sha256_digest(r.content)
    up_body, _, up_digest = images.get_manifest(s.up, f"platform/{repo}", sigstore.signature_tag(digest))
    assert r.content == up_body and r.headers["Docker-Content-Digest"] == up_digest
    layer: dict[str, Any] = r.json()["layers"][0]
    assert layer["mediaType"] == sigstore.SIGNATURE_MEDIA_TYPE
    blob = o.request("GET", f"a/{repo}", f"blobs/{layer['digest']}")
    assert blob.status_code == 200
    payload: bytes = blob.content
    key = serialization.load_pem_public_key(pair.public_key.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    signature = base64.b64decode(layer["annotations"][sigstore.SIGNATURE_ANNOTATION])
    key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature otherwise
    critical = json.loads(payload)["critical"]
    assert critical["image"]["docker-manifest-digest"] == digest
    assert critical["identity"]["docker-reference"] == f"{s.upstream_prefix()}/{repo}:v1"


def fetched_signature(s: Side, repo: str, digest: str) -> bool:
    """Whether the upstream received, through the proxy, the GET of `repo`'s signature manifest for `digest`."""
    path = f"/v2/platform/{repo}/manifests/{sigstore.signature_tag(digest)}"
    return any(e.method == "GET" and e.path == path for e in s.up.access_log())


def assert_enforced(res: RunResult, *, signed: bool) -> None:
    """A signed image: accepted, or (Debian's build) refused only at the cryptographic check. Unsigned: refused."""
    if signed:
        assert res.returncode == 0 or DISABLED in res.stderr, res.describe()
        assert NO_SIGNATURE not in res.stderr, res.describe()
    else:
        assert res.returncode != 0 and NO_SIGNATURE in res.stderr, res.describe()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> sigstore.KeyPair:
    return sigstore.make_key_pair(tmp_path_factory.mktemp("sigstore-keys"))


def test_the_key_is_in_cosigns_format_and_signs(keys: sigstore.KeyPair) -> None:
    pem = keys.private_key.read_text()
    assert pem.startswith(f"-----BEGIN {sigstore.PRIVATE_KEY_PEM_TYPE}-----\n")
    doc = json.loads(base64.b64decode("".join(pem.strip().splitlines()[1:-1])))
    assert doc["kdf"]["name"] == "scrypt" and doc["kdf"]["params"] == sigstore.SCRYPT_PARAMS
    assert doc["cipher"]["name"] == "nacl/secretbox" and len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    key = serialization.load_pem_public_key(keys.public_key.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(sigstore.sign_payload(keys, b"x")), b"x", ec.ECDSA(hashes.SHA256()))


def test_skopeo_signs_with_the_key_or_says_its_build_has_no_sigstore(
    side: Side, keys: sigstore.KeyPair, tmp_path: Path
) -> None:
    """skopeo's own signing with the cosign-format key: Debian's build refuses to sign at all; a build with
    sigstore signs with this key, and its signature is then found and verified through the proxy."""
    images.build_image(tmp_path / "layout", "v1", layers=(512,), seed=f"{side.name}-skopeo-signed")
    regd = sigstore.registries_d(tmp_path / "registries.d")
    try:
        digest = sigstore.signed_push(tmp_path / "layout", "v1", side.up, "platform/skopeosigned", "v1", keys, regd)
    except RigError as e:
        assert DISABLED in str(e), e
        return
    verify_through_proxy(side, keys, "skopeosigned", digest)


def test_skopeo_finds_the_signature_and_the_policy_refuses_an_unsigned_image(
    side: Side, keys: sigstore.KeyPair, tmp_path: Path
) -> None:
    digest, _ = push_signed(side, tmp_path / "layout", keys, "signed")
    push_unsigned(side, tmp_path / "layout", "unsigned")
    regd = sigstore.registries_d(tmp_path / "registries.d")
    policy = sigstore.policy(tmp_path / "policy.json", keys.public_key, side.proxy_prefix(), side.upstream_prefix())
    side.up.clear_access_log()
    signed = sigstore.skopeo_verified_copy(
        f"docker://{side.proxy_prefix()}/signed:v1", f"oci:{tmp_path}/out:s", policy, regd, "--src-tls-verify=false"
    )
    assert_enforced(signed, signed=True)
    assert fetched_signature(side, "signed", digest)
    unsigned = sigstore.skopeo_verified_copy(
        f"docker://{side.proxy_prefix()}/unsigned:v1", f"oci:{tmp_path}/out:u", policy, regd, "--src-tls-verify=false"
    )
    assert_enforced(unsigned, signed=False)
    verify_through_proxy(side, keys, "signed", digest)


def test_podman_finds_the_signature_and_the_policy_refuses_an_unsigned_image(
    side: Side, keys: sigstore.KeyPair, tmp_path: Path
) -> None:
    digest, _ = push_signed(side, tmp_path / "layout", keys, "podsigned")
    push_unsigned(side, tmp_path / "layout", "podunsigned")
    podman = Podman(tmp_path / "podman")
    home = sigstore.podman_home(tmp_path / "home")
    policy = sigstore.policy(tmp_path / "policy.json", keys.public_key, side.proxy_prefix(), side.upstream_prefix())

    def pull(repo: str) -> RunResult:
        args = [
            "pull",
            "-q",
            "--signature-policy",
            str(policy),
            "--tls-verify=false",
            f"{side.proxy_prefix()}/{repo}:v1",
        ]
        return run(podman.argv(*args), timeout=120, env_extra={**podman.env(), "HOME": str(home)})

    side.up.clear_access_log()
    assert_enforced(pull("podsigned"), signed=True)
    assert fetched_signature(side, "podsigned", digest)
    assert_enforced(pull("podunsigned"), signed=False)


def test_skopeo_copy_all_through_the_proxy_keeps_every_digest_and_the_signatures(
    side: Side, keys: sigstore.KeyPair, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A multi-arch index signed with each of its instances, copied with `--all` from the proxy to another
    registry: the index and each instance keep their digests, and so does each signature's payload and
    annotation. skopeo writes each signature as a `.sig` manifest of its own making (its config and field
    order differ from cosign's), so those manifests' digests change; copying a `.sig` tag itself keeps its
    digest, as `cosign copy` does."""
    dest = registry.start_upstream("anonymous", tmp_path / "dest")
    request.addfinalizer(dest.stop)
    digest, signatures = push_signed(side, tmp_path / "layout", keys, "multi", index=True)
    regd = sigstore.registries_d(tmp_path / "registries.d")
    accept = tmp_path / "accept.json"
    accept.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    opts = ("--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests")
    res = sigstore.skopeo_verified_copy(
        f"docker://{side.proxy_prefix()}/multi:v1",
        f"docker://{dest.host}/copied/multi:v1",
        accept,
        regd,
        *opts,
        "--all",
    )
    assert res.returncode == 0, res.describe()
    index = json.loads(images.get_manifest(side.up, "platform/multi", "v1")[0])
    body, _, copied_digest = images.get_manifest(dest, "copied/multi", "v1")
    assert copied_digest == digest and images.sha256_digest(body) == digest
    assert len(index["manifests"]) == 2 and len(signatures) == 3
    for instance in index["manifests"]:
        assert images.manifest_digest(dest, "copied/multi", instance["digest"]) == instance["digest"]
    for signed, sig_digest in signatures.items():
        tag = sigstore.signature_tag(signed)
        up_sig = json.loads(images.get_manifest(side.up, "platform/multi", tag)[0])
        copied_body, _, copied_sig = images.get_manifest(dest, "copied/multi", tag)
        copied = json.loads(copied_body)
        assert [(x["digest"], x["annotations"]) for x in copied["layers"]] == [
            (x["digest"], x["annotations"]) for x in up_sig["layers"]
        ], tag
        assert copied_sig != sig_digest  # skopeo's own `.sig` manifest, as said above
        res = sigstore.skopeo_verified_copy(
            f"docker://{side.proxy_prefix()}/multi:{tag}",
            f"docker://{dest.host}/cosigned/multi:{tag}",
            accept,
            regd,
            *opts,
        )
        assert res.returncode == 0, res.describe()
        assert images.manifest_digest(dest, "cosigned/multi", tag) == sig_digest
