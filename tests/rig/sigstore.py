"""Sigstore signing for the artifact tests: a cosign key pair, registries.d and policy.json files, signed pushes.

The key pair. skopeo 1.9.3 signs with `--sign-by-sigstore-private-key` but cannot make a key
(`skopeo generate-sigstore-key` came in 1.10); podman 4.3.1 cannot either, and no Debian package here
ships cosign. So `make_key_pair` writes the key in cosign's private-key format itself, with well-kept
libraries only, exactly as cosign (`cosign generate-key-pair`) and containers/image read it:

    -----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
    base64 of the JSON {"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": B64},
                        "cipher": {"name": "nacl/secretbox", "nonce": B64}, "ciphertext": B64}
    -----END ENCRYPTED SIGSTORE PRIVATE KEY-----

where the plaintext is the PKCS#8 DER of an ECDSA P-256 key (`cryptography`), the secretbox key is
`scrypt(passphrase, salt, N=32768, r=8, p=1, 32 bytes)` (`hashlib.scrypt`) and the ciphertext is
NaCl's secretbox (XSalsa20-Poly1305, PyNaCl's `SecretBox`) of it under a random 24-byte nonce, without
the nonce (the JSON carries it). This is go-tuf's `encrypted` package, which cosign and containers/image
(signature/sigstore) decrypt with; N=32768, r=8, p=1 are its parameters that every version accepts. The
public key is the PEM `PUBLIC KEY` (SubjectPublicKeyInfo) a policy's `keyPath` names.

Signatures are stored the way cosign stores them, as an OCI image tagged `sha256-<hex>.sig` beside the
signed manifest (`use-sigstore-attachments: true` in a registries.d file, which skopeo is given with
`--registries.d` and podman finds in `$HOME/.config/containers/registries.d`). `signed_push` asks skopeo to
sign (`--sign-by-sigstore-private-key`), which Debian's build refuses ("Debian-local change: sigstore
disabled"); so the tests make the signature here: `simple_signing_payload` (the payload cosign and
containers/image sign), `sign_payload` (ECDSA P-256 with SHA-256, with the key read back from cosign's format)
and `signature_manifest` (the `.sig` image: an OCI manifest whose one layer is the payload, of type
`application/vnd.dev.cosign.simplesigning.v1+json`, annotated `dev.cosignproject.cosign/signature`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nacl.secret import SecretBox

from .procs import RigError, RunResult, run
from .registry import Upstream

PRIVATE_KEY_PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
SCRYPT_PARAMS = {"N": 32768, "r": 8, "p": 1}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SKOPEO_TIMEOUT = 120.0


@dataclass(frozen=True)
class KeyPair:
    private_key: Path  # cosign's encrypted private key (PEM)
    public_key: Path  # PEM SubjectPublicKeyInfo
    passphrase_file: Path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encrypt_private_key(der: bytes, passphrase: bytes) -> bytes:
    """The PEM of cosign's encrypted private key holding the PKCS#8 DER `der`."""
    salt, nonce = os.urandom(32), os.urandom(SecretBox.NONCE_SIZE)
    n, r, p = SCRYPT_PARAMS["N"], SCRYPT_PARAMS["r"], SCRYPT_PARAMS["p"]
    key = hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n, dklen=SecretBox.KEY_SIZE)
    ciphertext = SecretBox(key).encrypt(der, nonce).ciphertext
    doc = {
        "kdf": {"name": "scrypt", "params": SCRYPT_PARAMS, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(ciphertext),
    }
    body = base64.encodebytes(json.dumps(doc).encode()).decode("ascii")
    return f"-----BEGIN {PRIVATE_KEY_PEM_TYPE}-----\n{body}-----END {PRIVATE_KEY_PEM_TYPE}-----\n".encode()


def decrypt_private_key(pem: bytes, passphrase: bytes) -> bytes:
    """The PKCS#8 DER inside cosign's encrypted private key (the inverse of `encrypt_private_key`)."""
    lines = pem.decode("ascii").strip().splitlines()
    if lines[0] != f"-----BEGIN {PRIVATE_KEY_PEM_TYPE}-----" or lines[-1] != f"-----END {PRIVATE_KEY_PEM_TYPE}-----":
        raise ValueError("not an encrypted sigstore private key")
    doc: dict[str, Any] = json.loads(base64.b64decode("".join(lines[1:-1])))
    params = doc["kdf"]["params"]
    key = hashlib.scrypt(
        passphrase,
        salt=base64.b64decode(doc["kdf"]["salt"]),
        n=params["N"],
        r=params["r"],
        p=params["p"],
        maxmem=2 * 128 * params["r"] * params["N"],
        dklen=SecretBox.KEY_SIZE,
    )
    nonce = base64.b64decode(doc["cipher"]["nonce"])
    return SecretBox(key).decrypt(base64.b64decode(doc["ciphertext"]), nonce)


def make_key_pair(directory: Path, passphrase: str = "rig-sigstore-passphrase") -> KeyPair:
    """A new ECDSA P-256 key pair under `directory`: cosign's encrypted private key, the public key, the passphrase."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pair = KeyPair(directory / "cosign.key", directory / "cosign.pub", directory / "passphrase")
    pair.private_key.write_bytes(encrypt_private_key(der, passphrase.encode()))
    pair.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pair.passphrase_file.write_text(passphrase)
    return pair


def registries_d(directory: Path) -> Path:
    """A registries.d directory that has every registry keep sigstore signatures as attachments."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    return directory


def podman_home(base: Path) -> Path:
    """A HOME for podman whose `.config/containers/registries.d` is `registries_d`'s (podman has no flag for it)."""
    registries_d(base / ".config" / "containers" / "registries.d")
    return base


def policy(path: Path, public_key: Path, prefix: str, signed_prefix: str) -> Path:
    """A containers policy.json: images under `prefix` (the proxy's "HOST/MAPPING") need a sigstore signature by
    `public_key` whose identity is the same name under `signed_prefix` (the upstream's "HOST/REMOTE" the image was
    signed as); everything else is refused."""
    requirement = {
        "type": "sigstoreSigned",
        "keyPath": str(public_key),
        "signedIdentity": {"type": "remapIdentity", "prefix": prefix, "signedPrefix": signed_prefix},
    }
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {prefix: [requirement]}}}
    path.write_text(json.dumps(doc, indent=2))
    return path


def signature_tag(digest: str) -> str:
    """The cosign tag of the signatures of the manifest `digest` ("sha256-<hex>.sig")."""
    return digest.replace(":", "-", 1) + ".sig"


def signed_push(
    layout_dir: Path,
    src_tag: str,
    upstream: Upstream,
    name: str,
    tag: str,
    pair: KeyPair,
    regd: Path,
    *,
    all: bool = False,
) -> str:
    """`skopeo copy --sign-by-sigstore-private-key` of `oci:DIR:SRC_TAG` to the upstream; the digest pushed."""
    with tempfile.TemporaryDirectory(prefix="rig-sign-") as tmp:
        digestfile, auth = Path(tmp) / "digest", Path(tmp) / "auth.json"
        auth.write_text("{}")
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--registries.d", str(regd)]
        argv += ["--sign-by-sigstore-private-key", str(pair.private_key)]
        argv += ["--sign-passphrase-file", str(pair.passphrase_file), "--digestfile", str(digestfile)]
        if upstream.push_creds is not None:
            argv += ["--dest-creds", upstream.push_creds]
        if all:
            argv.append("--all")
        argv += [f"oci:{layout_dir}:{src_tag}", f"docker://{upstream.host}/{name}:{tag}"]
        res = run(argv, timeout=SKOPEO_TIMEOUT, env_extra={"REGISTRY_AUTH_FILE": str(auth)})
        if res.returncode != 0:
            raise RigError(f"signed push failed\n{res.describe()}")
        return digestfile.read_text().strip()


def skopeo_verified_copy(src: str, dest: str, policy_file: Path, regd: Path, *extra: str) -> RunResult:
    """`skopeo copy --policy POLICY --registries.d DIR SRC DEST` (signatures checked on the way); never raises."""
    with tempfile.TemporaryDirectory(prefix="rig-verify-") as tmp:
        auth = Path(tmp) / "auth.json"
        auth.write_text("{}")
        argv = ["skopeo", "copy", "--quiet", "--policy", str(policy_file), "--registries.d", str(regd), *extra]
        return run([*argv, src, dest], timeout=SKOPEO_TIMEOUT, env_extra={"REGISTRY_AUTH_FILE": str(auth)})


def load_private_key(pair: KeyPair) -> ec.EllipticCurvePrivateKey:
    """The private key of `pair`, read back through cosign's format (so the file is what signs)."""
    passphrase = pair.passphrase_file.read_bytes()
    key = serialization.load_der_private_key(decrypt_private_key(pair.private_key.read_bytes(), passphrase), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RigError("the sigstore key is not an ECDSA key")
    return key


def simple_signing_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The payload a sigstore (cosign) signature signs: the image's identity and manifest digest."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": {"creator": "registryproxy tests (rig/sigstore.py)"},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign_payload(pair: KeyPair, payload: bytes) -> str:
    """The base64 ECDSA-P256-SHA256 signature (ASN.1 DER) of `payload`, as cosign's annotation holds it."""
    return _b64(load_private_key(pair).sign(payload, ec.ECDSA(hashes.SHA256())))


def signature_manifest(payload: bytes, signature: str) -> tuple[bytes, list[bytes]]:
    """The `.sig` image cosign pushes for one signature: (manifest bytes, [config, payload] blobs)."""
    payload_digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    config = json.dumps(
        {
            "architecture": "",
            "config": {},
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
        },
        separators=(",", ":"),
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "size": len(config),
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        },
        "layers": [
            {
                "mediaType": SIGNATURE_MEDIA_TYPE,
                "size": len(payload),
                "digest": payload_digest,
                "annotations": {SIGNATURE_ANNOTATION: signature},
            }
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode(), [config, payload]
