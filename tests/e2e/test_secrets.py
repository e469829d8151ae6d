"""Secrets stay secret: a whole session through the proxy leaves no secret in its output or saved flows.

The same session runs under stock mitmdump (the addon loaded with -s, every default addon, the flow
dump at flow_detail=4, debug logging, mitmproxy's connection lines) and under the lean master
(`python -O -m regproxy.serve`), both saving flows with -w. The session: skopeo pulls from every kind
of upstream (anonymous, Basic, token, token with blobs redirected to storage) and through a capability
mapping over the token upstream whose password comes from the environment; token requests by GET (with
client credentials and offline_token), POST password grant and POST refresh_token grant; a bad token,
client credentials on a registry route, a challenge naming the capability, tags lists; and pulls, token
requests (GET and POST), challenges, tags lists and a revoked answer through share links of a namespace
and of the capability mapping, and probes with links that are not genuine. Then the proxy
is stopped and everything it printed, the raw bytes of the flow file and every flow read back with
mitmproxy's FlowReader are searched for each secret. The pulls' digests are checked too: hiding the
secrets must not change what clients are sent.
"""

from __future__ import annotations

import base64
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from regproxy.links import mint
from rig import clients, proxy, registry, standard
from rig.flowfiles import DEBUG_ARGS, flow_texts
from rig.keys import CAP
from rig.procs import LOOPBACK, Proc, clean_env
from rig.standard import APP

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
KEY_HEX = "6d" * 16 + "19" * 16
CAP_ENV = "RP_SECRETS_CAP_PASSWORD"
CLIENT_USER = "client-robot"
CLIENT_PASSWORD = "client-password-7Qx2"  # what a client sends the token endpoint (`docker login`)
FORGED = "v4.local.Zm9yZ2VkLXRva2VuLXRoYXQtbmV2ZXItZGVjcnlwdHM"
NS = {"anonymous": "anon", "basic": "basic", "token": "tok", "redirect": "redir"}
PASETO_RE = re.compile(rb"v4\.local\.")
JWT_RE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
MANIFEST_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
]
SESSION_ARGS = DEBUG_ARGS
# Share links of the session (links/): a namespace's and the capability mapping's, one revoked, and a link of
# another key and a tampered one (not genuine: answered as unknown names, and hidden as links are).
LINKS: dict[str, str] = {
    kind: mint(bytes.fromhex(key), mapping, int(time.time()) + 7200)[0]
    for kind, key, mapping in (
        ("namespace", KEY_HEX, "tok/"),
        ("capability", KEY_HEX, f"{CAP}/app"),
        ("revoked", KEY_HEX, "basic/"),
        ("foreign", "77" * 32, "tok/"),
    )
}
LINKS["tampered"] = LINKS["namespace"][:-3] + ("a" if LINKS["namespace"][-3] != "a" else "b") + LINKS["namespace"][-2:]
REVOKED_ID = LINKS["revoked"][4:20]  # the id: the 16 characters after the marker (links/codec.py)


def session_config(up: dict[str, registry.Upstream]) -> dict[str, Any]:
    proxies: dict[str, Any] = {}
    for kind, prefix in NS.items():
        u = up[kind]
        m: dict[str, Any] = {"registry": u.url, "remote": "platform"}
        if u.username:
            m.update(username=u.username, password=u.password)
        proxies[f"{prefix}/"] = m
    tok = up["token"]
    proxies[f"{CAP}/app"] = {"registry": tok.url, "remote": APP, "username": tok.username, "password_env": CAP_ENV}
    return {"secretkey": KEY_HEX, "revoked_links": [REVOKED_ID], "proxies": proxies}


def start_master(
    master: str, config: Mapping[str, Any], tmp_dir: Path, extra_args: tuple[str, ...], env: Mapping[str, str]
) -> proxy.ProxyProc:
    """The proxy under `master`: "stock" is `mitmdump -s addon/registryproxy.py`, "lean" is the lean
    master as ./run.sh starts it (`python -O -m regproxy.serve`); both with mitmdump's arguments.

    Not rig.proxy.start_proxy: it sets flow_detail=0 itself, and mitmdump refuses a second value.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "registryproxy.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    conf = tmp_dir / "mitmproxy-conf"
    conf.mkdir(exist_ok=True)
    if master == "stock":
        head = [str(proxy.mitmdump_binary()), "-s", str(proxy.ADDON_SCRIPT)]
    else:
        head = [sys.executable, "-O", "-m", "regproxy.run.serve"]
    argv = [
        *head,
        "--mode",
        f"reverse:{proxy.DEAD_TARGET}@{LOOPBACK}:0",
        "--set",
        f"registryproxy_config={config_path}",
        "--set",
        f"confdir={conf}",
        *extra_args,
    ]
    proc = Proc(master).start(argv, env=clean_env({**env, "PYTHONPATH": str(REPO / "addon")}), cwd=tmp_dir)
    try:
        m = proc.wait_for_output(proxy.LISTENING, 30)
    except BaseException:
        proc.stop()
        raise
    return proxy.ProxyProc(proc, int(m.group("port")), config_path, dict(env))


@pytest.fixture
def started_procs() -> Iterator[list[proxy.ProxyProc]]:
    """Proxies a test started; stopped at its end (their output printed, shown when the test failed)."""
    started: list[proxy.ProxyProc] = []
    yield started
    for p in started:
        p.stop()
        sys.stdout.write(f"--- {p.proc.name} output ({p.host}):\n{p.output()}\n")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def run_session(
    p: proxy.ProxyProc, up: dict[str, registry.Upstream], digests: dict[str, standard.Digests], tmp: Path
) -> list[str]:
    """Everything a busy day brings; returns every PASETO the client side received."""
    # skopeo pulls through every kind of upstream and the capability mapping.
    pulls = [(f"{prefix}/app", kind) for kind, prefix in NS.items()] + [(f"{CAP}/app", "token")]
    for name, kind in pulls:
        res = clients.skopeo_copy(f"{p.host}/{name}:v1", tmp / name.replace("/", "_"), tag="v1").check()
        assert res.digest == digests[kind][(APP, "v1")], name

    received: list[str] = []
    scopes = [f"repository:{n}:pull" for n in ("tok/app", f"{CAP}/app", "redir/app", "basic/app", "tok/many")]
    with httpx.Client(base_url=p.url, timeout=30) as c:
        # GET with client credentials and offline_token (as `docker login` does), then both POST grants.
        got = c.get(
            "/token",
            params=(
                ("service", p.host),
                ("account", CLIENT_USER),
                ("offline_token", "true"),
                *(("scope", s) for s in scopes),
            ),
            headers={"Authorization": _basic(CLIENT_USER, CLIENT_PASSWORD)},
        )
        assert got.status_code == 200, got.text
        received += [got.json()["token"], got.json()["refresh_token"]]
        pw = c.post(
            "/token",
            data={
                "grant_type": "password",
                "username": CLIENT_USER,
                "password": CLIENT_PASSWORD,
                "service": p.host,
                "scope": " ".join(scopes),
            },
        )
        assert pw.status_code == 200, pw.text
        received += [pw.json()["access_token"], pw.json()["refresh_token"]]
        refreshed = c.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": got.json()["refresh_token"], "scope": scopes[1]},
        )
        assert refreshed.status_code == 200, refreshed.text
        received.append(refreshed.json()["token"])
        assert all(t.startswith("v4.local.") for t in received)

        def get(path: str, auth: str | None) -> httpx.Response:
            headers = list(MANIFEST_ACCEPT) + ([("Authorization", auth)] if auth else [])
            return c.get(path, headers=headers)

        tok = received[0]
        for name, kind in (("tok/app", "token"), (f"{CAP}/app", "token"), ("basic/app", "basic")):
            r = get(f"/v2/{name}/manifests/v1", f"Bearer {tok}")
            assert r.status_code == 200 and r.headers["docker-content-digest"] == digests[kind][(APP, "v1")]
        cap_manifest = get(f"/v2/{CAP}/app/manifests/v1", f"Bearer {received[-1]}")
        assert cap_manifest.status_code == 200
        # A blob redirected to storage reaches the client with its Location.
        layer = get("/v2/redir/app/manifests/v1", f"Bearer {tok}").json()["layers"][0]["digest"]
        blob = get(f"/v2/redir/app/blobs/{layer}", f"Bearer {tok}")
        assert blob.status_code == 307 and blob.headers["location"].startswith("http://")

        # Refusals: a forged token, client credentials on a registry route, no token on the capability.
        assert get("/v2/tok/app/manifests/v1", f"Bearer {FORGED}").status_code == 401
        assert get("/v2/tok/app/manifests/v1", _basic(CLIENT_USER, CLIENT_PASSWORD)).status_code == 401
        challenge = get(f"/v2/{CAP}/app/manifests/v1", None)
        assert challenge.status_code == 401 and CAP in challenge.headers["www-authenticate"]  # delivered intact
        bad_refresh = c.post("/token", data={"grant_type": "refresh_token", "refresh_token": FORGED})
        assert bad_refresh.status_code == 401

        # Tags lists (the body names the local repository; the capability one names the key).
        many = get("/v2/tok/many/tags/list?n=50", f"Bearer {tok}")
        assert many.status_code == 200 and many.json()["name"] == "tok/many" and "link" in many.headers
        cap_tags = get(f"/v2/{CAP}/app/tags/list", f"Bearer {tok}")
        assert cap_tags.status_code == 200 and cap_tags.json()["name"] == f"{CAP}/app"

        # Share links: pulls, token requests by GET and POST, a challenge, tags lists, a revoked link, fakes.
        through = {kind: f"{LINKS[kind]}/app" for kind in LINKS}
        link_scopes = [f"repository:{n}:pull" for n in through.values()]
        got = c.get("/token", params=(("service", p.host), *(("scope", s) for s in link_scopes)))
        assert got.status_code == 200, got.text
        link_tok = got.json()["token"]
        pw = c.post("/token", data={"grant_type": "password", "username": CLIENT_USER, "password": CLIENT_PASSWORD,
                                    "service": p.host, "scope": " ".join(link_scopes)})  # fmt: skip
        assert pw.status_code == 200, pw.text
        received += [link_tok, pw.json()["access_token"], pw.json()["refresh_token"]]
        for kind in ("namespace", "capability"):
            r = get(f"/v2/{through[kind]}/manifests/v1", f"Bearer {link_tok}")
            assert r.status_code == 200 and r.headers["docker-content-digest"] == digests["token"][(APP, "v1")]
            tags = get(f"/v2/{through[kind]}/tags/list?n=1", f"Bearer {link_tok}")
            assert tags.status_code == 200 and tags.json()["name"] == through[kind]  # delivered intact
        challenge = get(f"/v2/{through['namespace']}/manifests/v1", None)
        assert challenge.status_code == 401 and LINKS["namespace"] in challenge.headers["www-authenticate"]
        revoked = get(f"/v2/{through['revoked']}/manifests/v1", f"Bearer {link_tok}")
        assert revoked.status_code == 403 and "this link was revoked" in revoked.text
        for kind in ("foreign", "tampered"):
            assert get(f"/v2/{through[kind]}/manifests/v1", f"Bearer {link_tok}").status_code == 404
    for kind in ("namespace", "capability"):
        res = clients.skopeo_copy(f"{p.host}/{LINKS[kind]}/app:v1", tmp / f"link-{kind}", tag="v1").check()
        assert res.digest == digests["token"][(APP, "v1")], kind
    return received


@pytest.mark.parametrize("master", ["stock", "lean"])
def test_a_whole_session_leaves_no_secret_in_output_or_saved_flows(
    master: str,
    started_procs: list[proxy.ProxyProc],
    upstreams: dict[str, registry.Upstream],
    image_digests: dict[str, standard.Digests],
    issued_upstream_tokens: Callable[[], list[str]],
    tmp_path: Path,
) -> None:
    flows_file = tmp_path / "flows.mitm"
    env = {CAP_ENV: upstreams["token"].password or ""}
    args = (*SESSION_ARGS, "-w", str(flows_file))
    config = session_config(upstreams)
    p = start_master(master, config, tmp_path / master, args, env)
    started_procs.append(p)

    received = run_session(p, upstreams, image_digests, tmp_path)
    p.stop()  # -w is complete once the proxy has shut down
    assert not p.running()

    output = p.output()
    raw = flows_file.read_bytes()
    texts = flow_texts(flows_file)
    # The session really was logged, dumped and saved.
    assert output.count("GET tok/app/manifests/v1") >= 1 and "POST /token" in output
    assert f"link={LINKS['namespace'][4:20]}" in output and f"link={REVOKED_ID}" in output
    assert len(texts) >= 30, len(texts)
    assert any("[redacted]" in t for t in texts)
    if master == "stock":
        assert "<< 200 OK" in output  # mitmdump's flow dump at flow_detail=4
    assert issued_upstream_tokens(), "the proxy fetched no upstream token"

    secrets: dict[str, str] = {
        "the secret key": KEY_HEX,
        "the capability key": CAP,
        "the client's password": CLIENT_PASSWORD,
        "the client's Basic credentials": _basic(CLIENT_USER, CLIENT_PASSWORD).split()[1],
        "the forged token": FORGED,
    }
    for u in upstreams.values():
        if u.password:
            secrets[f"the {u.kind} upstream's password"] = u.password
            secrets[f"the {u.kind} upstream's Basic credentials"] = (u.basic_auth_header() or "").split()[1]
    secrets |= {f"upstream token #{i}": t for i, t in enumerate(issued_upstream_tokens())}
    secrets |= {f"client token #{i}": t for i, t in enumerate(received)}
    secrets |= {f"the {kind} share link": link for kind, link in LINKS.items()}
    places = {"the proxy's output": output.encode(), "the flow file": raw}
    places |= {f"saved flow #{i}": t.encode() for i, t in enumerate(texts)}
    for where, data in places.items():
        for what, secret in secrets.items():
            assert secret.encode() not in data, f"{what} appears in {where}"
        assert not PASETO_RE.search(data), f"a PASETO appears in {where}"
        assert not JWT_RE.search(data), f"a JWT appears in {where}"
