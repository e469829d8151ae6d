"""Real clients: skopeo (1.9.3) over plain HTTP on loopback.

What skopeo does with digests when copying docker://… to an `oci:` layout (seen with 1.9.3):
- A source manifest that is already OCI (a single-arch image, or an index copied with --all) is
  kept byte for byte, with or without --preserve-digests: the digest recorded in the destination
  index.json equals the source digest.
- A Docker v2 schema 2 source is CONVERTED to an OCI manifest by default (new digest). With
  `--preserve-digests` skopeo instead stores the Docker manifest unchanged in the OCI layout, so
  the recorded digest equals the source's. `skopeo_copy` passes --preserve-digests by default,
  so for every image here the recorded digest is the upstream's `Docker-Content-Digest`.
- Without --all, a multi-arch index resolves to the instance for the host platform
  (linux/amd64 here) and the recorded digest is that instance's manifest digest, not the index's.
- skopeo tries https first even with --src-tls-verify=false and falls back to http on an
  HTTP answer to its TLS ClientHello.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .images import layout_digest
from .procs import RigError, RunResult, run


@dataclass(frozen=True)
class CopyResult:
    returncode: int
    stdout: str
    stderr: str
    digest: str | None  # what the client recorded in the destination layout for `tag`
    dest_dir: Path
    tag: str
    argv: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return RunResult(self.argv, self.returncode, self.stdout, self.stderr).describe()

    def check(self) -> CopyResult:
        """self, or RigError with skopeo's output when the copy failed."""
        if not self.ok or self.digest is None:
            raise RigError(f"skopeo copy failed\n{self.describe()}")
        return self


def _auth_env(tmp: str) -> dict[str, str]:
    auth_file = Path(tmp) / "auth.json"
    auth_file.write_text("{}")
    return {"REGISTRY_AUTH_FILE": str(auth_file)}


def skopeo_copy(
    src_ref: str,
    dest_dir: Path,
    all: bool = False,
    creds: str | None = None,
    tls_verify: bool = False,
    *,
    cert_dir: Path | None = None,
    tag: str = "latest",
    preserve_digests: bool = True,
    extra_args: tuple[str, ...] = (),
    timeout: float = 120.0,
) -> CopyResult:
    """`skopeo copy [--all] docker://SRC oci:DEST_DIR:TAG`; never raises for skopeo's failures.

    `src_ref` may be "HOST/NAME:TAG" or "docker://HOST/NAME:TAG"; `creds` is "user:pass";
    `cert_dir` (a directory holding the CA as `ca.crt`) is passed as `--src-cert-dir`.
    """
    ref = src_ref if "://" in src_ref else f"docker://{src_ref}"
    argv = [
        "skopeo",
        "copy",
        "--quiet",
        f"--src-tls-verify={'true' if tls_verify else 'false'}",
    ]
    if cert_dir is not None:
        argv += ["--src-cert-dir", str(cert_dir)]
    if creds is not None:
        argv += ["--src-creds", creds]
    if all:
        argv.append("--all")
    if preserve_digests:
        argv.append("--preserve-digests")
    argv += [*extra_args, ref, f"oci:{dest_dir}:{tag}"]
    with tempfile.TemporaryDirectory(prefix="rig-skopeo-") as tmp:
        res = run(argv, timeout=timeout, env_extra=_auth_env(tmp))
    digest = layout_digest(dest_dir, tag) if res.returncode == 0 else None
    return CopyResult(res.returncode, res.stdout, res.stderr, digest, dest_dir, tag, tuple(argv))


def skopeo_inspect(
    ref: str,
    raw: bool = False,
    creds: str | None = None,
    tls_verify: bool = False,
    *,
    extra_args: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> tuple[int, str, str]:
    """`skopeo inspect [--raw] docker://REF`; returns (returncode, stdout, stderr)."""
    full = ref if "://" in ref else f"docker://{ref}"
    argv = ["skopeo", "inspect", f"--tls-verify={'true' if tls_verify else 'false'}"]
    if raw:
        argv.append("--raw")
    if creds is not None:
        argv += ["--creds", creds]
    argv += [*extra_args, full]
    with tempfile.TemporaryDirectory(prefix="rig-skopeo-") as tmp:
        res = run(argv, timeout=timeout, env_extra=_auth_env(tmp))
    return res.returncode, res.stdout, res.stderr


def inspect_digest(ref: str, creds: str | None = None) -> str:
    """The manifest digest `skopeo inspect` reports for `ref` (RigError if it fails)."""
    rc, out, err = skopeo_inspect(ref, creds=creds)
    if rc != 0:
        raise RigError(f"skopeo inspect {ref} failed ({rc}): {err}")
    digest: str = json.loads(out)["Digest"]
    return digest
