"""Real upstream registries (`docker-registry serve CONFIG.yml`, distribution 2.8) for the tests.

Four kinds:
- "anonymous": no auth;
- "basic": htpasswd (made with `htpasswd -Bbn`);
- "token": `auth: token` with an in-process TokenIssuer (the user has full rights, anonymous
  callers get nothing: a private registry unless `public_repos`/`public_prefixes` say otherwise);
- "redirect": like "token", plus the storage `redirect` middleware pointing at an in-process
  BlobServer that serves the storage root, so blob GET/HEAD answer 307 there.

Each registry listens on an internal port behind a RequestTap (see tap.py) on the public port, so
`access_log()` knows whether each request carried Authorization; `registry_log()` is parsed from
the registry's own access log lines.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import yaml

from .blobserver import BlobServer
from .procs import LOOPBACK, Proc, RigError, wait_until, with_free_port
from .tap import AccessLogEntry, AccessRecord, RequestTap
from .token_issuer import TokenIssuer

KINDS = ("anonymous", "basic", "token", "redirect")
DEFAULT_USER = "rig-user"
DEFAULT_PASSWORD = "rig-password-1"

# distribution's access log ("combined" format, gorilla handlers), one line per request, e.g.
#   127.0.0.1 - - [27/Nov/2026:08:17:54 +0000] "HEAD /v2/a/b/manifests/x HTTP/1.1" 404 91 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)",
    re.MULTILINE,
)


class RegistryLogEntry(NamedTuple):
    method: str
    path: str
    status: int


def parse_registry_log(output: str) -> list[RegistryLogEntry]:
    """The requests distribution logged in `output`, in order of completion.

    Only the access-log lines are used: the structured `msg="response completed"` lines are not
    written for requests refused by the auth layer (401), these are.
    """
    return [
        RegistryLogEntry(m.group("method"), m.group("uri"), int(m.group("status")))
        for m in _ACCESS_LINE.finditer(output)
    ]


@dataclass
class Upstream:
    kind: str
    host: str  # "127.0.0.1:PORT" (the public, tapped port)
    url: str  # "http://127.0.0.1:PORT"
    username: str | None
    password: str | None
    storage_root: Path
    config_path: Path
    registry_port: int  # the registry's own port, behind the tap
    proc: Proc
    tap: RequestTap
    token_issuer: TokenIssuer | None = None
    blob_server: BlobServer | None = None
    ca_cert: Path | None = None  # the CA that signed an https upstream's certificates (see https_upstream.py)
    _stopped: bool = field(default=False, repr=False)

    def httpx_verify(self) -> ssl.SSLContext | bool:
        """`verify=` for httpx: a context trusting `ca_cert` when set (https upstreams), else True."""
        if self.ca_cert is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_cert))

    @property
    def push_creds(self) -> str | None:
        """ "user:pass" for `skopeo --dest-creds`/`--src-creds`, or None."""
        if self.username is None or self.password is None:
            return None
        return f"{self.username}:{self.password}"

    def basic_auth_header(self) -> str | None:
        creds = self.push_creds
        if creds is None:
            return None
        return "Basic " + base64.b64encode(creds.encode()).decode("ascii")

    def token(self, scopes: Collection[str], *, anonymous: bool = False) -> str:
        """A bearer token from this upstream's issuer (with the user's credentials unless anonymous)."""
        if self.token_issuer is None:
            raise RigError(f"{self.kind} upstream has no token issuer")
        headers = {}
        basic = self.basic_auth_header()
        if basic is not None and not anonymous:
            headers["Authorization"] = basic
        params: list[tuple[str, str | int | float | bool | None]] = [("service", self.token_issuer.service)]
        params += [("scope", s) for s in scopes]
        r = httpx.get(
            self.token_issuer.realm,
            params=params,
            headers=headers,
            timeout=10,
            trust_env=False,
            verify=self.httpx_verify(),
        )
        r.raise_for_status()
        tok: str = r.json()["token"]
        return tok

    def auth_headers(self, scopes: Collection[str] = ()) -> dict[str, str]:
        """Headers that authorize a direct request for `scopes` (e.g. "repository:a/b:pull")."""
        if self.token_issuer is not None:
            return {"Authorization": "Bearer " + self.token(scopes)}
        basic = self.basic_auth_header()  # "basic" kinds; None for anonymous ones
        return {"Authorization": basic} if basic else {}

    def access_log(self) -> list[AccessLogEntry]:
        """Every request that reached the registry: (method, path with query, had_authorization)."""
        return self.tap.entries()

    def access_records(self) -> list[AccessRecord]:
        """Like access_log(), with every request header (e.g. `.authorization`, `.header("accept")`)."""
        return self.tap.records()

    def clear_access_log(self) -> None:
        self.tap.clear()

    def registry_log(self) -> list[RegistryLogEntry]:
        """(method, path, status) parsed from the registry's own output (written once answered)."""
        return parse_registry_log(self.proc.output())

    def wait_registry_log(self, count: int, timeout: float = 5.0) -> list[RegistryLogEntry]:
        """registry_log() once it holds at least `count` entries (lines are written after the answer)."""
        wait_until(
            lambda: len(self.registry_log()) >= count,
            timeout,
            f"{count} access log lines from the {self.kind} registry",
            self.proc.describe,
        )
        return self.registry_log()

    def output(self) -> str:
        """The registry's raw stdout+stderr."""
        return self.proc.output()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.tap.stop()
        self.proc.stop()
        if self.token_issuer is not None:
            self.token_issuer.stop()
        if self.blob_server is not None:
            self.blob_server.stop()


def registry_binary() -> str:
    found = shutil.which("docker-registry") or shutil.which("registry")
    if found is None:
        raise RigError("docker-registry not found (Debian package docker-registry)")
    return found


def make_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    lines = []
    for user, password in users.items():
        r = subprocess.run(
            ["htpasswd", "-Bbn", user, password],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise RigError(f"htpasswd failed ({r.returncode}): {r.stderr}")
        lines.append(r.stdout.strip())
    path.write_text("\n".join(lines) + "\n")


def registry_config(
    kind: str,
    port: int,
    storage_root: Path,
    *,
    htpasswd: Path | None = None,
    issuer: TokenIssuer | None = None,
    blob_server: BlobServer | None = None,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": "rig-http-secret"},
    }
    if kind == "basic":
        assert htpasswd is not None
        cfg["auth"] = {"htpasswd": {"realm": "rig-basic-realm", "path": str(htpasswd)}}
    elif kind in ("token", "redirect"):
        assert issuer is not None
        cfg["auth"] = {
            "token": {
                "realm": issuer.realm,
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": str(issuer.cert_path),
            }
        }
    if kind == "redirect":
        assert blob_server is not None
        cfg["storage"]["redirect"] = {"disable": False}
        cfg["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": blob_server.url}}]}
    return cfg


def registry_env() -> dict[str, str]:
    """The environment for `docker-registry`: no *_PROXY, no REGISTRY_* (distribution reads every
    REGISTRY_* variable as a setting: REGISTRY_AUTH_FILE, set for podman, would become auth.file),
    no AWS_CA_BUNDLE (makes the s3 driver panic)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("REGISTRY_")}
    env.pop("AWS_CA_BUNDLE", None)
    return env


def launch_registry(
    name: str,
    workdir: Path,
    config_path: Path,
    make_config: Callable[[int], dict[str, Any]],
    timeout: float = 20.0,
    env_extra: Mapping[str, str] | None = None,
) -> tuple[Proc, int]:
    """Write `make_config(port)` to `config_path` for a free port and run `docker-registry serve` on
    it until it listens (its own "listening on" line, then the port); another port when someone took
    that one first (the registry exits saying "address already in use"). Returns (proc, port).
    `env_extra` adds to registry_env() (e.g. SSL_CERT_FILE: the CAs a pull-through registry trusts)."""

    def start(port: int) -> tuple[Proc, int]:
        config_path.write_text(yaml.safe_dump(make_config(port), sort_keys=False))
        proc = Proc(name)
        env = {**registry_env(), **(env_extra or {})}
        proc.start([registry_binary(), "serve", str(config_path)], env=env, cwd=workdir)
        try:
            proc.wait_for_output(rf"listening on {re.escape(LOOPBACK)}:{port}\b", timeout)
            proc.wait_for_port(LOOPBACK, port, timeout)
        except BaseException:
            proc.stop()
            raise
        return proc, port

    return with_free_port(start)


def start_upstream(
    kind: str,
    workdir: Path,
    *,
    username: str = DEFAULT_USER,
    password: str = DEFAULT_PASSWORD,
    public_repos: Collection[str] = (),
    public_prefixes: Collection[str] = (),
    token_expires_in: int = 300,
    timeout: float = 20.0,
) -> Upstream:
    """Start one upstream of `kind` with its files under `workdir` (which must be fresh)."""
    if kind not in KINDS:
        raise ValueError(f"unknown upstream kind {kind!r}; one of {KINDS}")
    workdir.mkdir(parents=True, exist_ok=True)
    storage_root = workdir / "storage"
    storage_root.mkdir(exist_ok=True)
    users = {username: password}
    issuer: TokenIssuer | None = None
    blobs: BlobServer | None = None
    htpasswd: Path | None = None
    has_creds = kind != "anonymous"
    if kind == "basic":
        htpasswd = workdir / "htpasswd"
        make_htpasswd(htpasswd, users)
    if kind in ("token", "redirect"):
        issuer = TokenIssuer(
            workdir,
            users,
            service=f"rig-{kind}-registry",
            issuer=f"rig-{kind}-issuer",
            public_repos=public_repos,
            public_prefixes=public_prefixes,
            expires_in=token_expires_in,
        ).start()
    if kind == "redirect":
        blobs = BlobServer(storage_root).start()

    config_path = workdir / "config.yml"
    try:

        def make_config(port: int) -> dict[str, Any]:
            return registry_config(kind, port, storage_root, htpasswd=htpasswd, issuer=issuer, blob_server=blobs)

        proc, port = launch_registry(f"registry-{kind}", workdir, config_path, make_config, timeout)
        try:
            tap = RequestTap(port)
        except BaseException:
            proc.stop()
            raise
    except BaseException:
        if issuer is not None:
            issuer.stop()
        if blobs is not None:
            blobs.stop()
        raise
    host = f"{LOOPBACK}:{tap.port}"
    return Upstream(
        kind=kind,
        host=host,
        url=f"http://{host}",
        username=username if has_creds else None,
        password=password if has_creds else None,
        storage_root=storage_root,
        config_path=config_path,
        registry_port=port,
        proc=proc,
        tap=tap,
        token_issuer=issuer,
        blob_server=blobs,
    )
