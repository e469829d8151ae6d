"""Operating the proxy: metrics, health, JSON access logs, live configuration reload and key rotation.

Each test runs its own real mitmdump with the addon (rig.proxy.start_proxy) over the session's real
docker-registry upstreams, drives it with skopeo and httpx, and reads back what an operator sees:
/metrics (parsed with prometheus_client's own parser), /healthz, /readyz, the proxy's output lines.
Configuration files are rewritten atomically (a new inode), as an editor or a config-map update does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from regproxy.config import load_file
from regproxy.tokens.paseto import key_id
from rig import clients, proxy, registry, standard
from rig.procs import RigError, wait_until, with_free_port
from rig.standard import APP

pytestmark = pytest.mark.e2e

KEY_A = "a1" * 16 + "4f" * 16
KEY_B = "b2" * 16 + "e8" * 16
# Not rig.keys.CAP: /metrics is searched for each part of this key, so every part holds a letter
# (one of only digits could be a number there).
CAP = "3c9e1f7a-6b2d-4e80-9a5c-d41f0b7e2a96"
CAP_ENV = "RP_OPS_CAP_PASSWORD"
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]
JSON_FIELDS = {
    "time",
    "request_id",
    "client",
    "method",
    "name",
    "mapping",
    "status",
    "upstream_status",
    "bytes",
    "duration_ms",
    "token",
    "cache",
    "link",  # the share link's id (docs/links.md), null without one
}
RELOADED = "configuration reloaded"
REFUSED = re.compile(r"^.*reload.*refused.*$", re.MULTILINE)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ProxyFactory = Callable[..., proxy.ProxyProc]  # the `make_proxy` fixture (tests/e2e/conftest.py)


# --- helpers ------------------------------------------------------------------------------------


def _creds(u: registry.Upstream) -> dict[str, str]:
    return {"username": u.username, "password": u.password} if u.username and u.password else {}


def ops_config(up: dict[str, registry.Upstream], **top: Any) -> dict[str, Any]:
    """A namespace mapping over the token upstream, a capability mapping over it (password from the
    environment) and a namespace mapping over the redirect upstream."""
    tok, red = up["token"], up["redirect"]
    return {
        **({"secretkey": KEY_A} if "secretkeys" not in top else {}),
        **top,
        "proxies": {
            "tok/": {"registry": tok.url, "remote": "platform", **_creds(tok)},
            f"{CAP}/app": {"registry": tok.url, "remote": APP, "username": tok.username, "password_env": CAP_ENV},
            "redir/": {"registry": red.url, "remote": "platform", **_creds(red)},
        },
    }


def ops_env(up: dict[str, registry.Upstream]) -> dict[str, str]:
    return {CAP_ENV: up["token"].password or ""}


def labels_of(p: proxy.ProxyProc) -> dict[str, str]:
    """Mapping key -> the label the proxy uses for it in logs and metrics (Mapping.label)."""
    return {m.key: m.label for m in load_file(p.config_path, {**os.environ, **p.env}).mappings}


def rewrite_config(p: proxy.ProxyProc, config: dict[str, Any] | str) -> None:
    """Replace the proxy's configuration file atomically (a new inode, whatever the size and mtime)."""
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    tmp = p.config_path.with_name(p.config_path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, p.config_path)


def wait_count(p: proxy.ProxyProc, needle: str, count: int, timeout: float = 10.0) -> None:
    wait_until(
        lambda: p.output().count(needle) >= count,
        timeout,
        f"{count} x {needle!r} in the proxy's output",
        p.output,
    )


def scrape(url: str) -> tuple[str, Samples]:
    """/metrics at `url`: the text and its samples, parsed by prometheus_client."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return r.text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls) in samples if n == name and label in dict(ls)}


def token_for(p: proxy.ProxyProc, *names: str) -> str:
    r = httpx.get(f"{p.url}/token", params=[("scope", f"repository:{n}:pull") for n in names], timeout=30)
    assert r.status_code == 200, r.text
    tok: str = r.json()["token"]
    return tok


def manifest(p: proxy.ProxyProc, name: str, tok: str | None, ref: str = "v1") -> httpx.Response:
    headers = list(MANIFEST_ACCEPT)
    if tok is not None:
        headers.append(("Authorization", f"Bearer {tok}"))
    return httpx.get(f"{p.url}/v2/{name}/manifests/{ref}", headers=headers, timeout=30)


def footer_kid(token: str) -> str:
    """The key id in a PASETO's footer (v4.local.PAYLOAD.FOOTER, the footer base64url JSON)."""
    parts = token.split(".")
    assert len(parts) == 4 and parts[:2] == ["v4", "local"], "not a v4.local token with a footer"
    footer = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4))
    kid: str = json.loads(footer)["kid"]
    return kid


def blob_bytes(img: Any) -> int:
    """The config and layer sizes of a built test image (rig.images.ImageInfo)."""
    return int(img.config.size + sum(layer.size for layer in img.layers))


def pull(p: proxy.ProxyProc, name: str, dest: Path, tag: str = "v1") -> str:
    res = clients.skopeo_copy(f"{p.host}/{name}:{tag}", dest, tag=tag).check()
    assert res.digest is not None
    return res.digest


# --- 1. metrics, health ------------------------------------------------------------------------


def test_metrics_count_a_session_by_mapping_route_and_status(
    make_proxy: ProxyFactory,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    test_images: standard.TestImages,
    tmp_path: Path,
) -> None:
    p = make_proxy(ops_config(upstreams), env=ops_env(upstreams))
    labels = labels_of(p)
    cap_label = labels[f"{CAP}/app"]
    assert re.fullmatch(r"cap:[0-9a-f]{10}", cap_label)
    tok, red = upstreams["token"], upstreams["redirect"]

    for name, kind in (("tok/app", "token"), (f"{CAP}/app", "token"), ("redir/app", "redirect")):
        assert pull(p, name, tmp_path / name.replace("/", "_")) == image_digests[kind][(APP, "v1")]
    bad = manifest(p, "tok/app", "v4.local.bm90LWEtdG9rZW4tb2YtdGhpcy1wcm94eQ")
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    pw = httpx.post(
        f"{p.url}/token",
        data={"grant_type": "password", "username": "u", "password": "p", "scope": "repository:tok/app:pull"},
        timeout=30,
    )
    assert pw.status_code == 200

    text, s = scrape(p.url)
    req = "registryproxy_requests_total"
    assert label_values(s, req, "mapping") == {"-", "tok/", "redir/", cap_label}
    for label in ("tok/", cap_label):
        assert total(s, req, mapping=label, method="GET", route="manifest", status="200") >= 1, label
        assert total(s, req, mapping=label, method="GET", route="blob", status="200") >= 1 + len(test_images.v1.layers)
        # Every byte of the image's blobs streamed through the proxy (manifests count too).
        assert total(s, "registryproxy_streamed_bytes_total", mapping=label) >= blob_bytes(test_images.v1), label
    assert total(s, req, mapping="redir/", route="manifest", status="200") >= 1
    assert total(s, req, mapping="redir/", route="blob", status="307") >= 1 + len(test_images.v1.layers)
    assert total(s, req, mapping="-", route="ping", status="401") >= 3  # each skopeo's first ping
    assert total(s, req, mapping="-", route="token", status="200") >= 4
    assert total(s, req, mapping="-", route="manifest", status="401") >= 1  # the invalid token
    for label in ("tok/", cap_label, "redir/"):
        assert total(s, "registryproxy_upstream_latency_seconds_count", mapping=label) > 0, label
    assert total(s, "registryproxy_redirects_total", mapping="redir/") >= 1 + len(test_images.v1.layers)
    assert total(s, "registryproxy_redirects_total", mapping="tok/") == 0
    assert total(s, "registryproxy_tokens_issued_total", grant="anonymous") >= 3
    assert total(s, "registryproxy_tokens_issued_total", grant="password") == 1
    assert total(s, "registryproxy_tokens_refused_total", reason="invalid_token") >= 1
    fetches = "registryproxy_upstream_token_fetches_total"
    assert total(s, fetches, upstream=tok.host, outcome="ok") >= 1
    assert total(s, fetches, upstream=red.host, outcome="ok") >= 1
    assert total(s, fetches, outcome="failed") == 0
    assert total(s, "registryproxy_mappings") == 3
    assert total(s, "registryproxy_secret_keys") == 1
    # Capability mappings are labelled, never named: neither the key nor the upstream repository.
    for secret in (CAP, *CAP.split("-"), APP, KEY_A):
        assert secret not in text, f"/metrics shows {secret!r}"

    health = httpx.get(f"{p.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "alive"
    ready = httpx.get(f"{p.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# --- 2. the ops listener -----------------------------------------------------------------------


def test_ops_listener_takes_the_operations_paths_off_the_registry_port(
    make_proxy: ProxyFactory, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    def start(ops_port: int) -> tuple[proxy.ProxyProc, int]:
        p = make_proxy(
            ops_config(upstreams), ["--set", f"registryproxy_ops_listen=127.0.0.1:{ops_port}"], env=ops_env(upstreams)
        )
        try:  # the port was free when picked; the ops listener says when it is not any more
            proxy.wait_listening(p.proc, ops_port)
        except BaseException:
            p.stop()
            raise
        return p, ops_port

    p, ops_port = with_free_port(start)
    # Both listeners log "listening at": take the registry port from mitmproxy's own line.
    m = p.wait_for_output(r"reverse proxy to \S+ listening at 127\.0\.0\.1:(\d+)")
    p.port = int(m.group(1))
    p.wait_for_output(rf"/metrics, /healthz and /readyz listening at 127\.0\.0\.1:{ops_port}")
    ops = f"http://127.0.0.1:{ops_port}"
    assert p.port != ops_port

    r = manifest(p, "tok/app", token_for(p, "tok/app"))
    assert r.status_code == 200 and r.headers["docker-content-digest"] == image_digests["token"][(APP, "v1")]

    health = httpx.get(f"{ops}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "alive"
    ready = httpx.get(f"{ops}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    _, s = scrape(ops)
    assert total(s, "registryproxy_requests_total", mapping="tok/", route="manifest", status="200") == 1
    assert total(s, "registryproxy_mappings") == 3
    assert httpx.post(f"{ops}/metrics", timeout=10).status_code == 405

    for path in ("/healthz", "/readyz", "/metrics"):
        for method in ("GET", "HEAD"):
            r = httpx.request(method, f"{p.url}{path}", timeout=10)
            assert r.status_code in (401, 404), (method, path, r.status_code)
            assert r.headers["content-type"].startswith("application/json"), (method, path)
            if method == "GET":
                assert r.json()["errors"][0]["code"], path
                assert b"registryproxy_" not in r.content and b"alive" not in r.content and b"ready" not in r.content
    _, after = scrape(ops)
    # The registry port answered those itself, as registry requests (route "other").
    assert total(after, "registryproxy_requests_total", route="other") >= 6


# --- 3. JSON access log ------------------------------------------------------------------------


def test_json_access_log_has_one_object_per_request_and_no_secret(
    make_proxy: ProxyFactory,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    issued_upstream_tokens: Callable[[], list[str]],
    tmp_path: Path,
) -> None:
    p = make_proxy(ops_config(upstreams), ["--set", "registryproxy_log_format=json"], env=ops_env(upstreams))
    cap_label = labels_of(p)[f"{CAP}/app"]
    for name, kind in (("tok/app", "token"), (f"{CAP}/app", "token"), ("redir/app", "redirect")):
        assert pull(p, name, tmp_path / name.replace("/", "_")) == image_digests[kind][(APP, "v1")]
    received = [token_for(p, "tok/app", f"{CAP}/app")]
    assert manifest(p, f"{CAP}/app", received[0]).status_code == 200
    assert manifest(p, "tok/app", "v4.local.bm90LWEtdG9rZW4tb2YtdGhpcy1wcm94eQ").status_code == 401
    pw = httpx.post(
        f"{p.url}/token",
        data={
            "grant_type": "password",
            "username": "u",
            "password": "client-secret-x1",
            "scope": f"repository:{CAP}/app:pull",
        },
        timeout=30,
    )
    assert pw.status_code == 200
    received += [pw.json()["token"], pw.json()["refresh_token"]]
    assert issued_upstream_tokens(), "the proxy fetched no upstream token"

    # Every request is logged: as many JSON lines as requests counted (plus the scrape's own line).
    _, s = scrape(p.url)
    counted = int(total(s, "registryproxy_requests_total"))

    def json_lines() -> list[str]:
        return [line for line in p.output().splitlines() if line.startswith("{")]

    wait_until(lambda: len(json_lines()) >= counted + 1, 10, f"{counted + 1} JSON lines", p.output)
    records = [json.loads(line) for line in json_lines()]
    assert len(records) == counted + 1
    for rec in records:
        assert set(rec) == JSON_FIELDS, rec
        assert rec["method"] in ("GET", "HEAD", "POST")
        assert isinstance(rec["status"], int) and isinstance(rec["duration_ms"], int | float)
        assert rec["bytes"] is None or isinstance(rec["bytes"], int)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", rec["client"])
        assert rec["time"].endswith("+00:00")
        assert isinstance(rec["token"], str) and isinstance(rec["name"], str)
    assert len({rec["request_id"] for rec in records}) == len(records)
    tokens = {rec["token"] for rec in records}
    assert {"ok", "none", "invalid_token"} <= tokens, tokens
    assert any(t.startswith("issued pull on") for t in tokens), tokens
    assert all(rec["upstream_status"] is None or isinstance(rec["upstream_status"], int | str) for rec in records)
    assert {rec["mapping"] for rec in records} == {"-", "tok/", "redir/", cap_label}
    assert any(rec["name"] == "/metrics" and rec["status"] == 200 for rec in records)
    assert any(rec["status"] == 307 and rec["mapping"] == "redir/" for rec in records)
    assert any(rec["upstream_status"] == 200 and rec["mapping"] == cap_label for rec in records)
    # The text format's line is not written besides the JSON one; everything else is mitmproxy's log.
    assert not re.search(r" mapping=\S+ status=", p.output())
    for line in p.output().splitlines():
        assert not line or line.startswith(("{", "[")), line

    output = p.output()
    secrets = {KEY_A, CAP, "client-secret-x1", *received, *issued_upstream_tokens()}
    for u in upstreams.values():
        if u.password:
            secrets |= {u.password, u.basic_auth_header() or ""}
    for secret in filter(None, secrets):
        assert secret not in output, f"a secret ({len(secret)} chars) appears in the output"
    assert "v4.local." not in output and "eyJ" not in output


# --- 4. key rotation ---------------------------------------------------------------------------


class Puller:
    """A client pulling tok/app:v1 (manifest and first layer) in a loop on its own thread.

    It behaves like a registry client: it keeps its token; on a 401 it asks the challenge's realm
    for a new one and retries once. `refused` holds the key id of each token a 401 refused (None:
    no token yet); anything else that goes wrong is a failure.
    """

    def __init__(self, base: str, name: str, digest: str) -> None:
        self.base, self.name, self.digest = base, name, digest
        self.token: str | None = None
        self.refused: list[str | None] = []
        self.failures: list[str] = []
        self.pulls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="puller", daemon=True)

    def start(self) -> Puller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the puller did not stop"

    def wait_pulls(self, more: int, timeout: float = 30.0) -> None:
        target = self.pulls + more
        wait_until(lambda: self.pulls >= target or bool(self.failures), timeout, f"{more} more pulls")
        assert not self.failures, self.failures

    def _run(self) -> None:
        with httpx.Client(timeout=15) as client:
            while not self._stop.is_set():
                try:
                    self._pull(client)
                except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                    self.failures.append(repr(e))
                self._stop.wait(0.05)  # pacing, so the pulls leave CPU to the proxy and skopeo

    def _get(self, client: httpx.Client, path: str) -> httpx.Response:
        for attempt in (1, 2):
            headers = list(MANIFEST_ACCEPT)
            if self.token is not None:
                headers.append(("Authorization", f"Bearer {self.token}"))
            r = client.get(f"{self.base}{path}", headers=headers)
            if r.status_code != 401 or attempt == 2:
                return r
            self.refused.append(footer_kid(self.token) if self.token is not None else None)
            challenge = dict(re.findall(r'(\w+)="([^"]*)"', r.headers["www-authenticate"]))
            t = client.get(challenge["realm"], params={"service": challenge["service"], "scope": challenge["scope"]})
            if t.status_code != 200:
                raise AssertionError(f"token request refused: {t.status_code} {t.text}")
            self.token = t.json()["token"]
        raise AssertionError("not reached")

    def _pull(self, client: httpx.Client) -> None:
        m = self._get(client, f"/v2/{self.name}/manifests/v1")
        if m.status_code != 200 or m.headers.get("docker-content-digest") != self.digest:
            self.failures.append(f"manifest: {m.status_code} {m.text[:200]}")
            return
        layer = m.json()["layers"][0]["digest"]
        b = self._get(client, f"/v2/{self.name}/blobs/{layer}")
        if b.status_code != 200 or f"sha256:{hashlib.sha256(b.content).hexdigest()}" != layer:
            self.failures.append(f"blob: {b.status_code}")
            return
        self.pulls += 1


@pytest.fixture
def puller_box() -> Iterator[list[Puller]]:
    box: list[Puller] = []
    yield box
    for pl in box:
        pl.stop()


def test_key_rotation_keeps_a_pulling_client_pulling(
    make_proxy: ProxyFactory,
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    puller_box: list[Puller],
    tmp_path: Path,
) -> None:
    digest = image_digests["token"][(APP, "v1")]
    kid_a, kid_b = key_id(bytes.fromhex(KEY_A)), key_id(bytes.fromhex(KEY_B))
    p = make_proxy(ops_config(upstreams, secretkeys=[KEY_A]), env=ops_env(upstreams))
    puller = Puller(p.url, "tok/app", digest).start()
    puller_box.append(puller)
    puller.wait_pulls(3)
    held = token_for(p, "tok/app")
    assert footer_kid(held) == kid_a
    assert pull(p, "tok/app", tmp_path / "a") == digest

    # [B, A]: B issues, A still decrypts.
    rewrite_config(p, ops_config(upstreams, secretkeys=[KEY_B, KEY_A]))
    wait_count(p, RELOADED, 1)
    assert total(scrape(p.url)[1], "registryproxy_secret_keys") == 2
    assert manifest(p, "tok/app", held).status_code == 200
    fresh = token_for(p, "tok/app")
    assert footer_kid(fresh) == kid_b
    assert manifest(p, "tok/app", fresh).status_code == 200
    assert pull(p, "tok/app", tmp_path / "ba") == digest
    puller.wait_pulls(3)
    assert puller.refused == [None]  # only its first request, without a token
    assert puller.token is not None and footer_kid(puller.token) == kid_a

    # [B]: tokens of A are refused; the puller re-authenticates once and goes on.
    rewrite_config(p, ops_config(upstreams, secretkeys=[KEY_B]))
    wait_count(p, RELOADED, 2)
    old = manifest(p, "tok/app", held)
    assert old.status_code == 401 and 'error="invalid_token"' in old.headers["www-authenticate"]
    assert manifest(p, "tok/app", fresh).status_code == 200
    wait_until(lambda: len(puller.refused) >= 2 or bool(puller.failures), 30, "the puller's re-authentication")
    puller.wait_pulls(3)
    assert pull(p, "tok/app", tmp_path / "b") == digest
    puller.stop()
    puller_box.clear()
    assert puller.failures == []
    assert puller.refused == [None, kid_a]
    assert puller.token is not None and footer_kid(puller.token) == kid_b
    _, s = scrape(p.url)
    assert total(s, "registryproxy_secret_keys") == 1
    assert total(s, "registryproxy_config_reloads_total", outcome="ok") == 2
    assert "refused" not in p.output()


# --- 5. live reload ----------------------------------------------------------------------------


def reload_config(up: dict[str, registry.Upstream], *, added: bool, changed: bool) -> dict[str, Any]:
    """keep/ (never changes), gone/ (removed when `changed`), moved/ (its remote changes when
    `changed`), and added/ (present when `added`)."""
    anon, basic = up["anonymous"], up["basic"]
    proxies: dict[str, Any] = {"keep/": {"registry": anon.url, "remote": "platform"}}
    if not changed:
        proxies["gone/"] = {"registry": anon.url, "remote": "platform"}
    proxies["moved/"] = {"registry": anon.url, "remote": "library" if changed else "platform"}
    if added:
        proxies["added/"] = {"registry": basic.url, "remote": "platform", **_creds(basic)}
    return {"secretkey": KEY_A, "proxies": proxies}


def bad_key_config(up: dict[str, registry.Upstream]) -> str:
    return yaml.safe_dump({**reload_config(up, added=True, changed=False), "secretkey": "not-a-hex-key"})


def check_tokens_after_reload(p: proxy.ProxyProc, old: str, digests: standard.Digests) -> None:
    """`old` was issued for keep/app, gone/app and moved/app before gone/ went and moved/ changed."""
    r = manifest(p, "keep/app", old)
    assert r.status_code == 200 and r.headers["docker-content-digest"] == digests[(APP, "v1")]
    gone = manifest(p, "gone/app", old)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    moved = manifest(p, "moved/app", old)
    assert moved.status_code == 401 and 'error="invalid_token"' in moved.headers["www-authenticate"]
    # A new token for the changed mapping leads to its new remote.
    solo = manifest(p, "moved/solo", token_for(p, "moved/solo"), "latest")
    assert solo.status_code == 200 and solo.headers["docker-content-digest"] == digests[(standard.SOLO, "latest")]


def test_live_reload_on_file_change(
    make_proxy: ProxyFactory, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    p = make_proxy(reload_config(upstreams, added=False, changed=False))
    old = token_for(p, "keep/app", "gone/app", "moved/app")
    for name in ("keep/app", "gone/app", "moved/app"):
        assert manifest(p, name, old).status_code == 200, name
    assert token_for(p, "added/app")  # a name no mapping serves yet still gets a (useless) token
    assert manifest(p, "added/app", token_for(p, "added/app")).status_code == 404

    # A new mapping is served within a bound (the file is polled every second).
    started = time.monotonic()
    rewrite_config(p, reload_config(upstreams, added=True, changed=False))
    wait_count(p, RELOADED, 1, timeout=5)
    added_tok = token_for(p, "added/app")
    r = manifest(p, "added/app", added_tok)
    assert r.status_code == 200 and r.headers["docker-content-digest"] == image_digests["basic"][(APP, "v1")]
    assert time.monotonic() - started < 8

    # An invalid file: one refusal line, and the configuration in use keeps serving.
    rewrite_config(p, bad_key_config(upstreams))
    p.wait_for_output(REFUSED, timeout=5)
    assert "not-a-hex-key" not in p.output()
    assert manifest(p, "added/app", added_tok).status_code == 200
    assert manifest(p, "gone/app", old).status_code == 200

    rewrite_config(p, reload_config(upstreams, added=True, changed=True))
    wait_count(p, RELOADED, 2, timeout=5)
    # The refusal was logged once, though the watcher polled the invalid file until it changed.
    assert len(REFUSED.findall(p.output())) == 1
    check_tokens_after_reload(p, old, image_digests["anonymous"])
    assert manifest(p, "added/app", added_tok).status_code == 200

    _, s = scrape(p.url)
    assert total(s, "registryproxy_config_reloads_total", outcome="ok") == 2
    assert total(s, "registryproxy_config_reloads_total", outcome="failed") == 1
    assert total(s, "registryproxy_mappings") == 3


def test_sighup_reloads_when_watching_is_off(
    make_proxy: ProxyFactory, upstreams: dict[str, registry.Upstream], image_digests: dict[str, standard.Digests]
) -> None:
    p = make_proxy(reload_config(upstreams, added=False, changed=False), ["--set", "registryproxy_watch_config=false"])
    old = token_for(p, "keep/app", "gone/app", "moved/app")
    rewrite_config(p, reload_config(upstreams, added=False, changed=True))
    # Not polled: three poll intervals pass without a reload, and the old mappings still serve.
    with pytest.raises(RigError):
        p.wait_for_output(RELOADED, timeout=3)
    assert manifest(p, "gone/app", old).status_code == 200

    os.kill(p.proc.pid, signal.SIGHUP)
    p.wait_for_output(r"configuration reloaded \(SIGHUP\)", timeout=10)
    check_tokens_after_reload(p, old, image_digests["anonymous"])

    rewrite_config(p, bad_key_config(upstreams))
    os.kill(p.proc.pid, signal.SIGHUP)
    p.wait_for_output(REFUSED, timeout=10)
    assert len(REFUSED.findall(p.output())) == 1
    assert manifest(p, "keep/app", old).status_code == 200
    assert manifest(p, "gone/app", old).status_code == 404  # still the configuration loaded by the first SIGHUP
    assert p.running()

    _, s = scrape(p.url)
    assert total(s, "registryproxy_config_reloads_total", outcome="ok") == 1
    assert total(s, "registryproxy_config_reloads_total", outcome="failed") == 1
    assert total(s, "registryproxy_mappings") == 2
