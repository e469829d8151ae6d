"""Sigstore signing and verification for the artifact tests, with trixie's skopeo 1.18 and podman 5.4.

Debian bookworm's skopeo 1.9.3 and podman 4.3.1 are built with sigstore disabled ("Debian-local change:
sigstore disabled"), so every step here runs trixie's builds (rig/trixie.py), which have it:
- the key pair: `skopeo generate-sigstore-key --output-prefix P --passphrase-file F` writes cosign's
  encrypted private-key format (`P.private`, PEM `ENCRYPTED COSIGN PRIVATE KEY`: scrypt and NaCl secretbox
  over the key, the JSON document go-tuf's `encrypted` package defines) and the PEM public key `P.pub`;
- signing: `skopeo copy --sign-by-sigstore-private-key P.private --sign-passphrase-file F` onto the
  upstream, with a registries.d that has `use-sigstore-attachments: true`, so the signature is stored as
  cosign stores it: an OCI image tagged `sha256-<hex>.sig` beside the signed manifest;
- verification: a containers policy.json whose `sigstoreSigned` requirement names the public key, with
  `remapIdentity` (the signature names the upstream's repository, the client pulls the proxy's), given to
  `skopeo copy --policy` and `podman pull --signature-policy`; podman finds the registries.d in
  `$HOME/.config/containers/registries.d` (it has no flag for it).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .procs import RigError, RunResult, run
from .registry import Upstream
from .trixie import Tools

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SKOPEO_TIMEOUT = 120.0
VERIFIED = "Requirement 0: allowed"  # skopeo --debug, once the signature is verified against the policy
NO_SIGNATURE = "A signature was required, but no signature exists"
BAD_SIGNATURE = "cryptographic signature verification failed"


@dataclass(frozen=True)
class KeyPair:
    private_key: Path  # cosign's encrypted private key (PEM)
    public_key: Path  # PEM SubjectPublicKeyInfo
    passphrase_file: Path


def generate_key_pair(tools: Tools, directory: Path, passphrase: str = "rig-sigstore-passphrase") -> KeyPair:
    """`skopeo generate-sigstore-key` into `directory` ("key.private", "key.pub"), with a passphrase file."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / "key.private", directory / "key.pub", directory / "passphrase")
    pair.passphrase_file.write_text(passphrase)
    argv = [*tools.skopeo(), "generate-sigstore-key", "--output-prefix", str(directory / "key")]
    res = run([*argv, "--passphrase-file", str(pair.passphrase_file)], timeout=60)
    if res.returncode != 0 or not pair.private_key.is_file() or not pair.public_key.is_file():
        raise RigError(f"skopeo generate-sigstore-key failed\n{res.describe()}")
    return pair


def registries_d(directory: Path) -> Path:
    """A registries.d that has every registry keep sigstore signatures as attachments (and an empty lookaside
    of its own, so no signature on the machine's /var/lib/containers/sigstore can count)."""
    directory.mkdir(parents=True, exist_ok=True)
    lookaside = directory / "lookaside"
    lookaside.mkdir(exist_ok=True)
    (directory / "default.yaml").write_text(
        f"default-docker:\n  use-sigstore-attachments: true\n  lookaside: file://{lookaside}\n"
    )
    return directory


def podman_home(base: Path) -> Path:
    """A HOME for podman whose `.config/containers/registries.d` is `registries_d`'s (podman has no flag for it)."""
    registries_d(base / ".config" / "containers" / "registries.d")
    return base


def policy(path: Path, public_key: Path, prefix: str, signed_prefix: str) -> Path:
    """A containers policy.json: images under `prefix` (the client's "HOST/REPO-PREFIX") need a sigstore signature
    by `public_key` whose identity is the same name under `signed_prefix` (the upstream's "HOST/REMOTE" the image
    was signed as); everything else is refused."""
    requirement = {
        "type": "sigstoreSigned",
        "keyPath": str(public_key),
        "signedIdentity": {"type": "remapIdentity", "prefix": prefix, "signedPrefix": signed_prefix},
    }
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {prefix: [requirement]}}}
    path.write_text(json.dumps(doc, indent=2))
    return path


def accept_anything(path: Path) -> Path:
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


def signature_tag(digest: str) -> str:
    """The cosign tag of the signatures of the manifest `digest` ("sha256-<hex>.sig")."""
    return digest.replace(":", "-", 1) + ".sig"


def signed_push(
    tools: Tools,
    src: str,
    upstream: Upstream,
    name: str,
    tag: str,
    pair: KeyPair,
    regd: Path,
    *,
    all: bool = False,
) -> str:
    """`skopeo copy --sign-by-sigstore-private-key` of `src` ("oci:DIR:TAG") to the upstream; the digest pushed."""
    with tempfile.TemporaryDirectory(prefix="rig-sign-") as tmp:
        digestfile, auth = Path(tmp) / "digest", Path(tmp) / "auth.json"
        auth.write_text("{}")
        argv = [*tools.skopeo(), "copy", "--quiet", "--dest-tls-verify=false", "--registries.d", str(regd)]
        argv += ["--policy", str(accept_anything(Path(tmp) / "policy.json"))]
        argv += ["--sign-by-sigstore-private-key", str(pair.private_key)]
        argv += ["--sign-passphrase-file", str(pair.passphrase_file), "--digestfile", str(digestfile)]
        if upstream.push_creds is not None:
            argv += ["--dest-creds", upstream.push_creds]
        if all:
            argv.append("--all")
        argv += [src, f"docker://{upstream.host}/{name}:{tag}"]
        res = run(argv, timeout=SKOPEO_TIMEOUT, env_extra={"REGISTRY_AUTH_FILE": str(auth)})
        if res.returncode != 0:
            raise RigError(f"signed push failed\n{res.describe()}")
        return digestfile.read_text().strip()


def skopeo_copy(tools: Tools, src: str, dest: str, policy_file: Path, regd: Path, *extra: str) -> RunResult:
    """`skopeo --debug copy --policy POLICY --registries.d DIR SRC DEST` (signatures checked on the way); never
    raises on failure. The debug log says `VERIFIED` for an image the policy admitted."""
    with tempfile.TemporaryDirectory(prefix="rig-verify-") as tmp:
        auth = Path(tmp) / "auth.json"
        auth.write_text("{}")
        argv = [*tools.skopeo(), "--debug", "copy", "--policy", str(policy_file), "--registries.d", str(regd)]
        return run([*argv, *extra, src, dest], timeout=SKOPEO_TIMEOUT, env_extra={"REGISTRY_AUTH_FILE": str(auth)})
