"""Single measurements against one running target: a blob GET, a load-generator run, a skopeo pull."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from bench.targets import Target, Usage, usage_between
from rig import clients
from rig.images import MANIFEST_TYPES
from rig.procs import LOOPBACK, RigError, clean_env

MIB = 1024 * 1024
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --- the big blob ----------------------------------------------------------------------------------


def blob_chunks(size: int) -> Iterator[bytes]:
    """`size` deterministic bytes in 1 MiB chunks: one pseudo-random MiB, each chunk stamped with its index."""
    base = random.Random(20240601).randbytes(MIB)
    for i in range(size // MIB):
        yield i.to_bytes(8, "big") + base[8:]


def push_blob(
    registry_url: str,
    name: str,
    size: int,
    *,
    headers: Mapping[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> str:
    """Monolithic upload (POST, then one streamed PUT ?digest=) of blob_chunks(size); returns its digest.

    `headers` (e.g. Authorization) go with both requests; `verify` as httpx takes it (an https registry)."""
    h = hashlib.sha256()
    for chunk in blob_chunks(size):
        h.update(chunk)
    digest = f"sha256:{h.hexdigest()}"
    with httpx.Client(timeout=600, trust_env=False, headers=dict(headers or {}), verify=verify) as c:
        start = c.post(f"{registry_url}/v2/{name}/blobs/uploads/")
        if start.status_code != 202:
            raise RigError(f"blob upload start: {start.status_code} {start.text}")
        loc = urljoin(registry_url, start.headers["location"])
        sep = "&" if "?" in loc else "?"
        put = c.put(
            f"{loc}{sep}digest={digest}",
            content=blob_chunks(size),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        if put.status_code != 201:
            raise RigError(f"blob upload: {put.status_code} {put.text}")
    return digest


@dataclass(frozen=True)
class Transfer:
    bytes: int
    seconds: float
    ttfb_s: float
    status: int

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def fetch_discard(
    url: str,
    token: str | None,
    timeout: float = 600.0,
    *,
    headers: Mapping[str, str] | None = None,
    cacert: Path | None = None,
) -> Transfer:
    """GET `url` and throw the body away: with curl when installed (cheaper), else httpx.

    `token`: a bearer token; `headers`: more request headers (or another Authorization); `cacert`: the CA
    that signed an https `url`'s certificate."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    curl = shutil.which("curl")
    if curl is not None:
        argv = [curl, "-sS", "-o", "/dev/null", "--max-time", str(int(timeout))]
        if cacert is not None:
            argv += ["--cacert", str(cacert)]
        for k, v in headers.items():
            argv += ["-H", f"{k}: {v}"]
        argv += ["-w", "%{http_code} %{size_download} %{time_total} %{time_starttransfer}", url]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, env=clean_env(), check=False)
        if r.returncode != 0:
            raise RigError(f"curl {url}: exit {r.returncode}: {r.stderr.strip()}")
        code, size, total, first = r.stdout.split()
        return Transfer(int(size), float(total), float(first), int(code))
    t0 = time.perf_counter()
    n = 0
    ttfb = 0.0
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(cacert)) if cacert is not None else True
    with httpx.stream("GET", url, headers=headers, timeout=timeout, trust_env=False, verify=verify) as resp:
        for part in resp.iter_raw(4 * MIB):
            if not n:
                ttfb = time.perf_counter() - t0
            n += len(part)
        status = resp.status_code
    return Transfer(n, time.perf_counter() - t0, ttfb, status)


@dataclass(frozen=True)
class BlobResult:
    transfers: list[Transfer]
    wall_s: float
    proxy: Usage
    registry: Usage

    @property
    def aggregate_mb_s(self) -> float:
        return sum(t.bytes for t in self.transfers) / self.wall_s / 1e6


def blob_get(target: Target, registry: Target, repo: str, digest: str, size: int, parallel: int = 1) -> BlobResult:
    """`parallel` concurrent GETs of blob `digest` of upstream `repo` through `target`, with CPU and peak RSS used."""
    name = target.local_name(repo)
    path = f"/v2/{name}/blobs/{digest}"
    token = target.token(name)
    before, reg_before = target.sample(), registry.sample()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        transfers = list(pool.map(lambda _: fetch_discard(target.url + path, token), range(parallel)))
    wall = time.perf_counter() - t0
    after, reg_after = target.sample(), registry.sample()
    for t in transfers:
        if t.status != 200 or t.bytes != size:
            raise RigError(f"{target.name}: blob GET answered {t.status} with {t.bytes} of {size} bytes")
    proxy = usage_between(before, after) if target.name != "direct" else Usage(0.0, 0.0, 0.0, 0)
    return BlobResult(transfers, wall, proxy, usage_between(reg_before, reg_after))


# --- small requests ----------------------------------------------------------------------------


def loadgen(
    target: Target,
    path: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    connections: int = 1,
    count: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    expect: tuple[int, ...] = (200,),
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run loadgen.py in its own process against `target`; adds the proxy's CPU seconds (`server_cpu_s`)."""
    argv = [
        sys.executable,
        str(LOADGEN),
        "--port",
        str(target.port),
        "--path",
        path,
        "--method",
        method,
        "--connections",
        str(connections),
        "--warmup",
        str(warmup),
        "--timeout",
        str(timeout),
    ]
    for k, v in headers:
        argv += ["--header", f"{k}: {v}"]
    if count is not None:
        argv += ["--count", str(count)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    before = target.sample()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=clean_env(), check=False)
    after = target.sample()
    try:
        result: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RigError(f"loadgen against {target.name}: exit {r.returncode}\n{r.stdout}\n{r.stderr}") from None
    if result["errors"]:
        raise RigError(f"loadgen against {target.name} {method} {path}: {result['errors']}")
    bad = {k: v for k, v in result["statuses"].items() if int(k) not in expect}
    if bad:
        raise RigError(f"loadgen against {target.name} {method} {path}: unexpected statuses {bad}")
    result["server_cpu_s"] = usage_between(before, after).cpu_s
    return result


def manifest_headers(token: str | None) -> list[tuple[str, str]]:
    h = [("Accept", t) for t in MANIFEST_TYPES]
    if token:
        h.append(("Authorization", f"Bearer {token}"))
    return h


# --- whole pulls -------------------------------------------------------------------------------

_BYTES_LINE = re.compile(r"^.*\bGET (?P<path>\S+) .*\bstatus=(?P<status>\d+) .*\bbytes=(?P<bytes>\d+|-)", re.MULTILINE)


def logged_bytes(output: str) -> tuple[int, int]:
    """(blob bytes, all bytes) the addon's per-request log lines in `output` report as answered."""
    blob = total = 0
    for m in _BYTES_LINE.finditer(output):
        if m.group("bytes") == "-":
            continue
        n = int(m.group("bytes"))
        total += n
        if "/blobs/" in m.group("path"):
            blob += n
    return blob, total


@dataclass(frozen=True)
class PullResult:
    seconds: float
    digest: str
    proxy_cpu_s: float
    blob_bytes_logged: int | None  # what the proxy carried for blob GETs (None: no log lines to read)
    bytes_logged: int | None


def skopeo_pull(target: Target, host: str, name: str, creds: str | None, expect_digest: str) -> PullResult:
    """`skopeo copy docker://HOST/NAME:latest oci:TMP` timed; checks the digest; counts the proxy's bytes."""
    out_before = len(target.output())
    before = target.sample()
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        t0 = time.perf_counter()
        res = clients.skopeo_copy(f"{host}/{name}:latest", Path(tmp) / "layout", creds=creds, timeout=300)
        seconds = time.perf_counter() - t0
    after = target.sample()
    res.check()
    if res.digest != expect_digest:
        raise RigError(f"{target.name}: pulled {res.digest}, upstream has {expect_digest}")
    blob: int | None = None
    total: int | None = None
    if target.registryproxy:
        time.sleep(0.05)  # the last log line is written right after the answer
        blob, total = logged_bytes(target.output()[out_before:])
    return PullResult(seconds, expect_digest, usage_between(before, after).cpu_s, blob, total)


def pull_sequence(client: httpx.Client, base: str, name: str) -> int:
    """One client pull over HTTP as skopeo does it: ping, token, manifest, config and layer blobs.

    Returns the bytes received.
    """
    ping = client.get(f"{base}/v2/")
    if ping.status_code != 401:
        raise RigError(f"ping: {ping.status_code}")
    tok = client.get(f"{base}/token", params={"service": base.split("//", 1)[1], "scope": f"repository:{name}:pull"})
    tok.raise_for_status()
    auth = {"Authorization": f"Bearer {tok.json()['token']}"}
    man = client.get(f"{base}/v2/{name}/manifests/latest", headers=[*manifest_headers(None), *auth.items()])
    if man.status_code != 200:
        raise RigError(f"manifest: {man.status_code} {man.text}")
    doc = man.json()
    n = len(man.content)
    for desc in [doc["config"], *doc["layers"]]:
        r = client.get(f"{base}/v2/{name}/blobs/{desc['digest']}", headers=auth)
        if r.status_code != 200 or len(r.content) != desc["size"]:
            raise RigError(f"blob {desc['digest']}: {r.status_code}")
        n += len(r.content)
    return n


def local_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"
