"""Sigstore signatures through the proxy, made and verified by the real tools: trixie's skopeo 1.18 and podman 5.4.

Each test runs on every `side` (e2e/artifacts_rig.py): a plain-HTTP and an HTTPS token upstream, each with and
without the cache. The key pair comes from `skopeo generate-sigstore-key` (cosign's encrypted format), images
are signed onto the upstream with `skopeo copy --sign-by-sigstore-private-key` (the signature stored as cosign
stores it, an image tagged `sha256-<hex>.sig`, `use-sigstore-attachments: true`), and pulled through the proxy
under a policy.json `sigstoreSigned` requirement with the public key (rig/sigstore.py). Debian bookworm's
skopeo 1.9.3 and podman 4.3.1 have sigstore disabled, so trixie's builds do all of it (rig/trixie.py); the rest
of the suite keeps bookworm's.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.artifacts_rig import Side, side
from rig import images, registry, sigstore, trixie
from rig.podman import Podman
from rig.procs import RunResult, run

pytestmark = pytest.mark.e2e
__all__ = ["side"]

_seq = itertools.count()


@pytest.fixture(scope="module")
def tools() -> trixie.Tools:
    return trixie.ensure()


@pytest.fixture(scope="module")
def keys(tools: trixie.Tools, tmp_path_factory: pytest.TempPathFactory) -> sigstore.KeyPair:
    return sigstore.generate_key_pair(tools, tmp_path_factory.mktemp("sigstore-keys"))


@pytest.fixture(scope="module")
def other_keys(tools: trixie.Tools, tmp_path_factory: pytest.TempPathFactory) -> sigstore.KeyPair:
    """A second key pair: a policy naming its public key must refuse what `keys` signed."""
    return sigstore.generate_key_pair(tools, tmp_path_factory.mktemp("sigstore-other-keys"), "another-passphrase")


@pytest.fixture
def regd(tmp_path: Path) -> Path:
    return sigstore.registries_d(tmp_path / "registries.d")


def push_signed(
    tools: trixie.Tools, s: Side, layout: Path, pair: sigstore.KeyPair, regd: Path, repo: str, *, index: bool = False
) -> str:
    """An image (or, with `index`, a two-platform index pushed with `--all`) pushed as platform/REPO:v1 by skopeo
    signing it with `pair`; the digest pushed."""
    seed = f"{s.name}-{repo}-{next(_seq)}"
    if index:
        images.build_index(layout, repo, layers=(1024, 512), seed=seed)
    else:
        images.build_image(layout, repo, layers=(1024,), seed=seed)
    return sigstore.signed_push(tools, f"oci:{layout}:{repo}", s.up, f"platform/{repo}", "v1", pair, regd, all=index)


def push_unsigned(s: Side, layout: Path, repo: str) -> str:
    images.build_image(layout, repo, layers=(1024,), seed=f"{s.name}-{repo}-{next(_seq)}")
    return images.push(layout, repo, s.up, f"platform/{repo}", "v1")


def fetched_signature(s: Side, repo: str, digest: str) -> bool:
    """Whether the upstream received, through the proxy, the GET of `repo`'s signature manifest for `digest`."""
    path = f"/v2/platform/{repo}/manifests/{sigstore.signature_tag(digest)}"
    return any(e.method == "GET" and e.path == path for e in s.up.access_log())


def tamper_signature(s: Side, repo: str, digest: str) -> None:
    """Replace platform/REPO's signature of `digest` on the upstream by the same `.sig` manifest with one bit of
    its ECDSA signature (the annotation) flipped."""
    tag = sigstore.signature_tag(digest)
    manifest = json.loads(images.get_manifest(s.up, f"platform/{repo}", tag)[0])
    annotations = manifest["layers"][0]["annotations"]
    raw = bytearray(base64.b64decode(annotations[sigstore.SIGNATURE_ANNOTATION]))
    raw[-1] ^= 0x01
    annotations[sigstore.SIGNATURE_ANNOTATION] = base64.b64encode(bytes(raw)).decode()
    body = json.dumps(manifest, separators=(",", ":")).encode()
    s.upstream_oras(f"platform/{repo}").put_manifest(f"platform/{repo}", tag, body, manifest["mediaType"])


def policies(s: Side, tmp_path: Path, keys: sigstore.KeyPair, other: sigstore.KeyPair) -> tuple[Path, Path]:
    """The policy with the signing key's public key, and the same policy with another key's."""
    good = sigstore.policy(tmp_path / "policy.json", keys.public_key, s.proxy_prefix(), s.upstream_prefix())
    bad = sigstore.policy(tmp_path / "other.json", other.public_key, s.proxy_prefix(), s.upstream_prefix())
    return good, bad


def test_the_tools_are_trixies_pinned_builds_run_as_themselves(tools: trixie.Tools) -> None:
    skopeo = run([*tools.skopeo(), "--version"], timeout=30)
    podman = run([*tools.podman(), "--version"], timeout=30)
    assert skopeo.stdout.strip() == f"skopeo version {trixie.SKOPEO_VERSION}", skopeo.describe()
    assert podman.stdout.strip() == f"podman version {trixie.PODMAN_VERSION}", podman.describe()
    assert tools.skopeo()[0].startswith(str(tools.root)) and tools.podman()[0].startswith(str(tools.root))


def test_skopeo_generates_a_key_in_cosigns_encrypted_format(keys: sigstore.KeyPair) -> None:
    lines = keys.private_key.read_text().strip().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----", lines[0]
    assert lines[-1] == "-----END ENCRYPTED COSIGN PRIVATE KEY-----"
    doc = json.loads(base64.b64decode("".join(lines[1:-1])))
    assert doc["kdf"]["name"] == "scrypt" and set(doc["kdf"]["params"]) == {"N", "r", "p"}
    assert doc["cipher"]["name"] == "nacl/secretbox" and len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    assert keys.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")


def test_skopeo_verifies_a_skopeo_signature_through_the_proxy_and_refuses_unsigned_tampered_and_foreign_keys(
    side: Side,
    tools: trixie.Tools,
    keys: sigstore.KeyPair,
    other_keys: sigstore.KeyPair,
    regd: Path,
    tmp_path: Path,
) -> None:
    digest = push_signed(tools, side, tmp_path / "layout", keys, regd, "signed")
    tampered_digest = push_signed(tools, side, tmp_path / "layout", keys, regd, "tampered")
    tamper_signature(side, "tampered", tampered_digest)
    push_unsigned(side, tmp_path / "layout", "unsigned")
    good, bad = policies(side, tmp_path, keys, other_keys)

    def copy(repo: str, policy_file: Path, out: str) -> RunResult:
        src, dest = f"docker://{side.proxy_prefix()}/{repo}:v1", f"oci:{tmp_path}/out:{out}"
        return sigstore.skopeo_copy(
            tools, src, dest, policy_file, regd, "--src-tls-verify=false", "--remove-signatures"
        )

    side.up.clear_access_log()
    signed = copy("signed", good, "s")
    assert signed.returncode == 0 and sigstore.VERIFIED in signed.stderr, signed.describe()
    assert fetched_signature(side, "signed", digest)
    assert images.layout_digest(tmp_path / "out", "s") == digest
    foreign = copy("signed", bad, "f")
    assert foreign.returncode != 0 and sigstore.BAD_SIGNATURE in foreign.stderr, foreign.describe()
    unsigned = copy("unsigned", good, "u")
    assert unsigned.returncode != 0 and sigstore.NO_SIGNATURE in unsigned.stderr, unsigned.describe()
    tampered = copy("tampered", good, "t")
    assert tampered.returncode != 0 and sigstore.BAD_SIGNATURE in tampered.stderr, tampered.describe()
    assert fetched_signature(side, "tampered", tampered_digest)
    # The signature manifest the proxy served is the upstream's, byte for byte.
    tag = sigstore.signature_tag(digest)
    body, _, sig_digest = images.get_manifest(side.up, "platform/signed", tag)
    r = side.proxy_oras().get_manifest("a/signed", tag)
    assert r.status_code == 200 and r.content == body and r.headers["Docker-Content-Digest"] == sig_digest
    assert json.loads(body)["layers"][0]["mediaType"] == sigstore.SIGNATURE_MEDIA_TYPE


@pytest.fixture
def podman(tools: trixie.Tools, tmp_path: Path) -> Iterator[Podman]:
    p = Podman(tmp_path / "podman", command=tools.podman(), containers_conf=tools.podman_containers_conf())
    try:
        yield p
    finally:
        p.close()


def test_podman_verifies_a_skopeo_signature_through_the_proxy_and_refuses_unsigned_and_foreign_keys(
    side: Side,
    tools: trixie.Tools,
    keys: sigstore.KeyPair,
    other_keys: sigstore.KeyPair,
    regd: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    digest = push_signed(tools, side, tmp_path / "layout", keys, regd, "podsigned")
    push_unsigned(side, tmp_path / "layout", "podunsigned")
    good, bad = policies(side, tmp_path, keys, other_keys)
    home = sigstore.podman_home(tmp_path / "home")
    env = {**podman.env(), "HOME": str(home), "PODMAN_IGNORE_CGROUPSV1_WARNING": "1"}

    def pull(repo: str, policy_file: Path) -> RunResult:
        args = ["--log-level=debug", "pull", "-q", "--signature-policy", str(policy_file), "--tls-verify=false"]
        return run(podman.argv(*args, f"{side.proxy_prefix()}/{repo}:v1"), timeout=120, env_extra=env)

    side.up.clear_access_log()
    foreign = pull("podsigned", bad)
    assert foreign.returncode != 0 and sigstore.BAD_SIGNATURE in foreign.stderr, foreign.describe()
    assert podman.images() == []
    signed = pull("podsigned", good)
    assert signed.returncode == 0 and sigstore.VERIFIED in signed.stderr, signed.describe()
    assert fetched_signature(side, "podsigned", digest)
    assert podman.inspect(f"{side.proxy_prefix()}/podsigned:v1").digest == digest
    unsigned = pull("podunsigned", good)
    assert unsigned.returncode != 0 and sigstore.NO_SIGNATURE in unsigned.stderr, unsigned.describe()


def test_skopeo_copy_all_through_the_proxy_keeps_every_digest_and_every_signature(
    side: Side,
    tools: trixie.Tools,
    keys: sigstore.KeyPair,
    regd: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """skopeo 1.18 signing with `--all` signs the index and each instance (three `.sig` images). `skopeo copy
    --all` from the proxy (its policy verifying the index's signature) to another registry copies the index,
    both instances and all three signatures, each under the same digest: the `.sig` manifests too, since the
    upstream's were written by the same containers/image, which rebuilds them identically (same payloads,
    same annotations, the same config)."""
    dest = registry.start_upstream("anonymous", tmp_path / "dest")
    request.addfinalizer(dest.stop)
    digest = push_signed(tools, side, tmp_path / "layout", keys, regd, "multi", index=True)
    index = json.loads(images.get_manifest(side.up, "platform/multi", "v1")[0])
    instances = [m["digest"] for m in index["manifests"]]
    assert len(instances) == 2
    signed = [digest, *instances]
    up_sigs = {d: images.get_manifest(side.up, "platform/multi", sigstore.signature_tag(d)) for d in signed}
    policy = sigstore.policy(tmp_path / "policy.json", keys.public_key, side.proxy_prefix(), side.upstream_prefix())
    opts = ("--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests", "--all")
    src, dst = f"docker://{side.proxy_prefix()}/multi:v1", f"docker://{dest.host}/copied/multi:v1"
    res = sigstore.skopeo_copy(tools, src, dst, policy, regd, *opts)
    assert res.returncode == 0 and sigstore.VERIFIED in res.stderr, res.describe()
    body, _, copied_digest = images.get_manifest(dest, "copied/multi", "v1")
    assert copied_digest == digest and images.sha256_digest(body) == digest
    for instance in instances:
        assert images.manifest_digest(dest, "copied/multi", instance) == instance
    for d, (up_body, _, up_digest) in up_sigs.items():
        copied_body, _, copied_sig = images.get_manifest(dest, "copied/multi", sigstore.signature_tag(d))
        assert copied_sig == up_digest and copied_body == up_body, d
    # The copy's signatures still verify, each instance's under its own digest (the identity remapped).
    dest_policy = sigstore.policy(
        tmp_path / "dest.json", keys.public_key, f"{dest.host}/copied", side.upstream_prefix()
    )
    for instance in instances:
        check = sigstore.skopeo_copy(
            tools,
            f"docker://{dest.host}/copied/multi@{instance}",
            f"oci:{tmp_path}/check:{instance[7:19]}",
            dest_policy,
            regd,
            "--src-tls-verify=false",
            "--remove-signatures",
        )
        assert check.returncode == 0 and sigstore.VERIFIED in check.stderr, check.describe()
