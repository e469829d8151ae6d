"""Upstream trust end to end: real docker-registry instances serving TLS with certificates from a private
test CA (right, for another host, expired), the proxy under a real mitmdump, real clients.

Two sides of the proxy connect to an upstream, and both are tested:
- the token client (httpx): `/token` asks the upstream's `/v2/` (and its realm) first, so a mapping
  whose upstream cannot be verified answers `/token` 502;
- mitmproxy's own connection (steps/upstream_tls.py): a mapping with a static `Bearer` credential needs no
  upstream token, so `/token` answers without contacting the upstream and the manifest request is
  the first connection to it.
Each failure must answer a registry JSON 502 in bounded time, with one log line naming the mapping
and the reason.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rig import badcerts, clients, images, proxy
from rig.https_upstream import HTTPS_KINDS

pytestmark = pytest.mark.e2e

SECRET_KEY = "5a" * 32
USER, PASSWORD = "tls-user", "tls-password-7"
REPO, TAG = "platform/app", "v1"
STATIC_BEARER = "Bearer static-upstream-credential-xyz"


@dataclass
class TlsRig:
    pki: badcerts.Pki
    good: badcerts.TlsRegistry
    wrong_host: badcerts.TlsRegistry
    expired: badcerts.TlsRegistry
    token: badcerts.TlsRegistry  # token auth, realm https://localhost:P2/token on the same host name
    digest: str


@pytest.fixture(scope="module")
def tls_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRig]:
    base = tmp_path_factory.mktemp("tls-upstreams")
    pki = badcerts.make_pki(base / "pki")
    storage = base / "storage"
    started: list[badcerts.TlsRegistry] = []
    try:
        for name, cert, users in (
            ("good", pki.good(), None),
            ("wrong-host", pki.wrong_host(), None),
            ("expired", pki.expired(), None),
            ("token", pki.good(), {USER: PASSWORD}),
        ):
            started.append(badcerts.start_tls_registry(base / name, cert, storage, users=users))
        good, wrong_host, expired, token = started
        layout = base / "layout"
        images.build_image(layout, TAG, layers=(1024, 3000), seed="upstream-tls")
        digest = badcerts.push(layout, TAG, good, REPO, TAG, badcerts.cert_dir(pki, base / "certs.d"))
        yield TlsRig(pki, good, wrong_host, expired, token, digest)
    finally:
        for r in started:
            r.stop()
        shutil.rmtree(base, ignore_errors=True)


def config(proxies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"secretkey": SECRET_KEY, "proxies": proxies}


def token_for(p: proxy.ProxyProc, name: str) -> httpx.Response:
    return httpx.get(f"{p.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=30, trust_env=False)


def manifest(p: proxy.ProxyProc, name: str, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.oci.image.manifest.v1+json"}
    return httpx.get(f"{p.url}/v2/{name}/manifests/{TAG}", headers=headers, timeout=30, trust_env=False)


def failure_lines(p: proxy.ProxyProc, label: str) -> list[str]:
    return re.findall(rf"^.*upstream TLS to \S+ failed for mapping {re.escape(label)}: .*$", p.output(), re.MULTILINE)


def wait_for_failure_line(p: proxy.ProxyProc, label: str) -> str:
    p.wait_for_output(rf"upstream TLS to \S+ failed for mapping {re.escape(label)}: ", timeout=10)
    p.wait_quiet(0.3)  # anything else it would print about this failure comes right after
    (line,) = failure_lines(p, label)
    return line


def assert_registry_502(r: httpx.Response, message: str) -> None:
    assert r.status_code == 502, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"errors": [{"code": "UNAVAILABLE", "message": message}]}


def assert_clean(p: proxy.ProxyProc) -> None:
    out = p.output()
    assert "Traceback" not in out
    for secret in (PASSWORD, STATIC_BEARER.split()[1]):
        assert secret not in out


# --- it works with the CA ---


def test_pull_through_a_private_ca_upstream_with_ca_file(tls_rig: TlsRig, make_proxy: Any, tmp_path: Path) -> None:
    ca = str(tls_rig.pki.ca_cert)
    p = make_proxy(
        config(
            {
                "tls/": {"registry": tls_rig.good.url, "remote": "platform", "ca_file": ca},
                # The same registry by address: the certificate's IP SAN is checked.
                "tlsip/": {"registry": f"https://127.0.0.1:{tls_rig.good.port}", "remote": "platform", "ca_file": ca},
            }
        )
    )
    for prefix in ("tls", "tlsip"):
        res = clients.skopeo_copy(f"{p.host}/{prefix}/app:{TAG}", tmp_path / f"copy-{prefix}", tag=TAG).check()
        assert res.digest == tls_rig.digest
    assert "upstream TLS to" not in p.output()
    assert_clean(p)


def test_token_auth_upstream_with_its_realm_on_the_same_tls_host(
    tls_rig: TlsRig, make_proxy: Any, tmp_layout: Path
) -> None:
    issuer = tls_rig.token.issuer
    assert issuer is not None and issuer.realm.startswith("https://localhost:")
    issuer.clear()
    p = make_proxy(
        config(
            {
                "tok/": {
                    "registry": tls_rig.token.url,
                    "remote": "platform",
                    "username": USER,
                    "password": PASSWORD,
                    "ca_file": str(tls_rig.pki.ca_cert),
                }
            }
        )
    )
    res = clients.skopeo_copy(f"{p.host}/tok/app:{TAG}", tmp_layout, tag=TAG).check()
    assert res.digest == tls_rig.digest
    asked = issuer.requests()
    assert asked and all(r.user == USER for r in asked), asked
    assert "upstream TLS to" not in p.output()
    assert_clean(p)


def test_every_https_rig_upstream_through_a_top_level_ca_file(https_rig: Any, make_proxy: Any, tmp_path: Path) -> None:
    """The shared HTTPS rig (token service and blob store on servers of their own): one top-level
    ca_file makes every kind trusted, the realm (`https://localhost:P2/token`) included; blobs of
    the redirecting kind go to the client, never through the proxy."""
    proxies: dict[str, dict[str, Any]] = {}
    for kind in HTTPS_KINDS:
        u = https_rig[kind]
        proxies[f"{kind}/"] = {"registry": u.url, "remote": "platform"}
        if u.username:
            proxies[f"{kind}/"].update(username=u.username, password=u.password)
    p = make_proxy({"secretkey": SECRET_KEY, "ca_file": str(https_rig.ca.ca_cert), "proxies": proxies})
    for kind in HTTPS_KINDS:
        res = clients.skopeo_copy(f"{p.host}/{kind}/app:v1", tmp_path / kind, tag="v1").check()
        assert res.digest == https_rig.digests[kind][("platform/app", "v1")]
    assert "upstream TLS to" not in p.output()
    assert_clean(p)


# --- it fails, at once, saying why ---

PROBLEMS = {
    # problem: (registry attribute, with ca_file, category)
    "unknown CA": ("good", False, "unknown CA"),
    "wrong host name": ("wrong_host", True, "host name mismatch"),
    "expired": ("expired", True, "expired certificate"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_certificate_problems_answer_502_with_one_log_line(tls_rig: TlsRig, make_proxy: Any, problem: str) -> None:
    attr, with_ca, category = PROBLEMS[problem]
    reg: badcerts.TlsRegistry = getattr(tls_rig, attr)
    trust = {"ca_file": str(tls_rig.pki.ca_cert)} if with_ca else {}
    p = make_proxy(
        config(
            {
                # mitmproxy's connection: a static credential, so /token never contacts the upstream.
                "viaproxy/": {"registry": reg.url, "remote": "platform", "auth": STATIC_BEARER, **trust},
                # the token client's connection (by address, a separate upstream).
                "viatoken/": {"registry": f"https://127.0.0.1:{reg.port}", "remote": "platform", **trust},
            }
        )
    )

    started = time.monotonic()
    r = token_for(p, "viaproxy/app")
    assert r.status_code == 200, r.text
    m = manifest(p, "viaproxy/app", r.json()["token"])
    assert time.monotonic() - started < 10
    assert_registry_502(m, "upstream registry unreachable or failed to answer")
    line = wait_for_failure_line(p, "viaproxy/")
    assert f"upstream TLS to localhost:{reg.port} failed for mapping viaproxy/: {category} (" in line

    started = time.monotonic()
    t = token_for(p, "viatoken/app")
    assert time.monotonic() - started < 10
    assert_registry_502(t, f"upstream registry unreachable (TLS: {category})")
    line = wait_for_failure_line(p, "viatoken/")
    assert f"upstream TLS to 127.0.0.1:{reg.port} failed for mapping viatoken/: {category} (" in line

    assert p.running()
    assert_clean(p)


def test_skopeo_pull_fails_cleanly_without_ca_file(tls_rig: TlsRig, make_proxy: Any, tmp_layout: Path) -> None:
    p = make_proxy(config({"tls/": {"registry": tls_rig.good.url, "remote": "platform"}}))
    res = clients.skopeo_copy(f"{p.host}/tls/app:{TAG}", tmp_layout, tag=TAG, timeout=60)
    assert not res.ok
    assert "502" in res.stderr or "unreachable" in res.stderr, res.describe()
    assert failure_lines(p, "tls/")
    assert_clean(p)


def test_adding_ca_file_on_reload_makes_the_upstream_trusted(tls_rig: TlsRig, make_proxy: Any) -> None:
    cfg = config({"viaproxy/": {"registry": tls_rig.good.url, "remote": "platform", "auth": STATIC_BEARER}})
    p = make_proxy(cfg)
    token = token_for(p, "viaproxy/app").json()["token"]
    assert manifest(p, "viaproxy/app", token).status_code == 502
    cfg["proxies"]["viaproxy/"]["ca_file"] = str(tls_rig.pki.ca_cert)
    p.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    p.wait_for_output("configuration reloaded", timeout=10)
    r = manifest(p, "viaproxy/app", token)  # trust is not part of a mapping's identity: the token still works
    assert r.status_code == 200, r.text
    assert r.headers["docker-content-digest"] == tls_rig.digest
    assert_clean(p)


# --- tls_verify: false ---


def test_tls_verify_false_pulls_and_warns_once(tls_rig: TlsRig, make_proxy: Any, tmp_path: Path) -> None:
    p = make_proxy(
        config(
            {
                "lab/": {
                    "registry": tls_rig.wrong_host.url,
                    "remote": "platform",
                    "tls_verify": False,
                    "auth": STATIC_BEARER,
                },
                "lab2/": {
                    "registry": f"https://127.0.0.1:{tls_rig.expired.port}",
                    "remote": "platform",
                    "tls_verify": False,
                },
            }
        )
    )
    for prefix in ("lab", "lab2"):
        res = clients.skopeo_copy(f"{p.host}/{prefix}/app:{TAG}", tmp_path / f"copy-{prefix}", tag=TAG).check()
        assert res.digest == tls_rig.digest
    out = p.output()
    for label, netloc in (("lab/", tls_rig.wrong_host.netloc), ("lab2/", f"127.0.0.1:{tls_rig.expired.port}")):
        warnings = re.findall(rf"^.*mapping {re.escape(label)} does not verify.*$", out, re.MULTILINE)
        assert len(warnings) == 1, out
        assert netloc in warnings[0] and "tls_verify: false" in warnings[0]
    assert "upstream TLS to" not in out
    assert_clean(p)


def test_config_with_a_missing_ca_file_is_refused_at_start(tls_rig: TlsRig, make_proxy: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    p = make_proxy(config({"tls/": {"registry": tls_rig.good.url, "remote": "platform", "ca_file": str(missing)}}))
    p.wait_for_output("exiting", timeout=15)
    assert f"proxies.tls/.ca_file: {missing}: no such file" in p.output()
    deadline = time.monotonic() + 10
    while p.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not p.running()
