"""Egress through a real forward proxy (README "Egress through a forward proxy"): with HTTPS_PROXY,
HTTP_PROXY and NO_PROXY in the proxy's environment, both the token client (httpx) and mitmproxy's pooled
upstream connections go through tinyproxy, or directly where NO_PROXY says so.

(This file is not called test_egress.py: tests/unit/test_egress.py has that name, and pytest, which
imports test files by their base name here, refuses two modules of the same name in one run.)

The rig (rig/netns.py, rig/forward_proxy.py, rig/remote_upstream.py):

    skopeo -> registryproxy 127.0.0.1 ==veth==> tinyproxy LINK:3128 (BasicAuth) ---+ in the namespace
                                                                                     v
                               https://REMOTE:P1 (registry)   https://REMOTE:P2/token (its token service)

REMOTE is an address only the namespace has: from the proxy's side its route is `prohibit`, so a
connection the proxy made directly would fail at once (and the pull with it). Every connection the two
relays in front of the upstream accepted therefore came through tinyproxy, and the tests match them
one to one with the CONNECT lines in tinyproxy's own log, and tinyproxy's clients with the proxy's
address. NO_PROXY tests route REMOTE over the veth (`net.direct(True)`) and check what tinyproxy saw.
The upstream serves the `https_rig` token upstream's images with its token service (another port of the
same host: the proxy sends the mapping's credentials to a private-address realm only on the upstream's
own host); the proxy trusts its CA with `ca_file`. A second one has host names that only the namespace
resolves, its token service on another host.
"""

from __future__ import annotations

import base64
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rig import clients, https_upstream, images, proxy, tls
from rig.forward_proxy import PORT, ForwardProxy, ProxyLog
from rig.netns import Netns
from rig.procs import wait_quiet, wait_until
from rig.remote_upstream import RemoteUpstream, start_remote_upstream
from rig.standard import APP

pytestmark = pytest.mark.e2e

SECRET_KEY = "e9" * 32
CREDS = ("egress-user", "Fwd-pa55.w0rd_9")
WRONG = ("egress-user", "not-the-pa55word")
SOURCE = "https-token"  # the https_rig upstream whose images and token service the remote ones serve
REGISTRY_NAME, REALM_NAME = "registry.egress.test", "auth.egress.test"  # resolved only inside the namespace
DEBUG = ["--set", "termlog_verbosity=debug", "--set", "registryproxy_connection_logs=true"]
MakeProxy = Callable[..., proxy.ProxyProc]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> Iterator[Netns]:
    n = Netns.create(hostnames=(REGISTRY_NAME, REALM_NAME))
    yield n
    n.close()


@pytest.fixture(scope="module")
def fwd(net: Netns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    f = ForwardProxy(net, tmp_path_factory.mktemp("tinyproxy"), credentials=CREDS).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def remotes(
    net: Netns, https_rig: https_upstream.HttpsRig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RemoteUpstream]]:
    """ "address": the upstream at REMOTE (registry and realm on two ports); "names": the same under host
    names, the token service on another host (REALM_NAME), as registry-1.docker.io and auth.docker.io."""
    started: dict[str, RemoteUpstream] = {}
    hosts = {"address": {}, "names": {"registry_host": REGISTRY_NAME, "realm_host": REALM_NAME}}
    try:
        for key, names in hosts.items():
            started[key] = start_remote_upstream(net, https_rig[SOURCE], tmp_path_factory.mktemp(key), **names)
        yield started
    finally:
        for r in started.values():
            r.stop()


@dataclass
class Rig:
    net: Netns
    fwd: ForwardProxy
    remote: RemoteUpstream  # at REMOTE
    named: RemoteUpstream  # under REGISTRY_NAME and REALM_NAME
    digests: dict[tuple[str, str], str]  # the source upstream's
    mark: int  # tinyproxy's log at the start of the test

    def digest(self, tag: str) -> str:
        return self.digests[(APP, tag)]

    def static_bearer(self) -> str:
        """A fresh upstream token, as a mapping's static `auth`: such a mapping needs no upstream token,
        so only mitmproxy's pooled connections reach the upstream."""
        return "Bearer " + self.remote.source.token([f"repository:{APP}:pull"])

    def log(self) -> ProxyLog:
        wait_quiet(lambda: len(self.fwd.log_text()), 0.3)  # lines of a request that just ended
        return self.fwd.log(self.mark)

    def assert_every_connection_tunnelled(self, remote: RemoteUpstream) -> dict[str, int]:
        """Each connection `remote`'s relays accepted is one CONNECT tunnel to it, from the proxy's address
        (once tinyproxy's log shows as many established tunnels); returns the relays' counts."""
        conns = remote.connections()
        log = self.fwd.wait_established(self.mark, sum(conns.values()))
        expected = [remote.registry_netloc] * conns["registry"] + [remote.realm_netloc] * conns["token"]
        assert sorted(log.connects) == sorted(expected), (log.connects, conns)
        assert log.established == sum(conns.values()), log.text
        assert log.clients == {self.net.host_addr}, log.text
        return conns


@pytest.fixture
def rig(
    net: Netns, fwd: ForwardProxy, remotes: dict[str, RemoteUpstream], https_rig: https_upstream.HttpsRig
) -> Iterator[Rig]:
    """Per test: REMOTE reachable only through tinyproxy, counters cleared, a mark in tinyproxy's log."""
    net.direct(False)
    for r in remotes.values():
        r.clear()
    issuer = https_rig[SOURCE].token_issuer
    assert issuer is not None
    issuer.clear()
    yield Rig(net, fwd, remotes["address"], remotes["names"], https_rig.digests[SOURCE], fwd.mark())
    net.direct(False)


# --- helpers --------------------------------------------------------------------------------------


def config(remote: RemoteUpstream, static_bearer: str | None = None, **top: Any) -> dict[str, Any]:
    """far/ -> the remote upstream with its credentials (token client and pool); farstatic/ -> the same
    with `static_bearer` (the pool only)."""
    up = remote.source
    proxies: dict[str, Any] = {
        "far/": {"registry": remote.url, "remote": "platform", "username": up.username, "password": up.password}
    }
    if static_bearer is not None:
        proxies["farstatic/"] = {"registry": remote.url, "remote": "platform", "auth": static_bearer}
    return {"secretkey": SECRET_KEY, "ca_file": str(remote.ca.ca_cert), "proxies": proxies, **top}


def secrets(remote: RemoteUpstream, *creds: tuple[str, str]) -> list[str]:
    found = [remote.source.password or "-"]
    for user, password in creds:
        found += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
    return found


def assert_no_secret(texts: list[str], secret_values: list[str]) -> None:
    for text in texts:
        for s in secret_values:
            assert s not in text, f"a secret ({s[:3]}…) in: {text[-2000:]}"


def assert_clean(texts: list[str], secret_values: list[str]) -> None:
    assert not [t for t in texts if "Traceback" in t], texts
    assert_no_secret(texts, secret_values)


def ask(p: proxy.ProxyProc, name: str) -> tuple[httpx.Response, float]:
    """What a client does first: `GET /token` for `name`, then, once granted, its manifest v1.
    Returns the last answer and how long that step took."""
    started = time.monotonic()
    r = httpx.get(f"{p.url}/token", params={"scope": f"repository:{name}:pull"}, timeout=60, trust_env=False)
    if r.status_code != 200:
        return r, time.monotonic() - started
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {r.json()['token']}", "Accept": images.OCI_MANIFEST}
    r = httpx.get(f"{p.url}/v2/{name}/manifests/v1", headers=headers, timeout=60, trust_env=False)
    return r, time.monotonic() - started


def assert_registry_error(r: httpx.Response, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"errors": [{"code": "UNAVAILABLE", "message": message}]}


def settled(p: proxy.ProxyProc) -> int:
    """A mark in the proxy's output once its start-up lines are out."""
    p.wait_for_output(r"upstream TLS trusts ")
    return len(p.output())


def new_lines(p: proxy.ProxyProc, since: int) -> list[str]:
    p.wait_quiet(0.3)  # a line logged right after the answer
    return [line for line in p.output()[since:].splitlines() if line.strip()]


def pull(p: proxy.ProxyProc, prefix: str, tag: str, dest: Path) -> str:
    """`skopeo copy --all` through the proxy; the digest skopeo recorded."""
    res = clients.skopeo_copy(f"{p.host}/{prefix}/app:{tag}", dest, all=True, tag=tag).check()
    assert res.digest is not None
    return res.digest


# --- through the forward proxy --------------------------------------------------------------------


def test_pull_goes_through_the_forward_proxy_only(rig: Rig, make_proxy: MakeProxy, tmp_layout: Path) -> None:
    """`skopeo copy --all` of the multi-arch index with HTTPS_PROXY=http://user:password@tinyproxy: the
    registry (token client's /v2/ probe and mitmproxy's pooled connections) and the token realm (token
    client) are each reached through a CONNECT tunnel, with the proxy credentials tinyproxy demands."""
    with pytest.raises(PermissionError):  # no direct way to the upstream from here
        socket.create_connection((rig.net.remote, rig.remote.registry.port), timeout=5).close()
    p = make_proxy(config(rig.remote), env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    assert pull(p, "far", "multi", tmp_layout) == rig.digest("multi")

    conns = rig.assert_every_connection_tunnelled(rig.remote)
    assert conns["registry"] >= 1 and conns["token"] >= 1, conns
    issuer = rig.remote.source.token_issuer
    assert issuer is not None and issuer.requests(), "no token was asked of the realm"
    assert all(r.user == rig.remote.source.username for r in issuer.requests())
    seen = rig.remote.access_log()
    assert seen and all(e.path == "/v2/" or e.path.startswith("/v2/platform/") for e in seen), seen
    assert all(e.had_authorization for e in seen if e.path != "/v2/"), seen
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_pooled_connections_go_through_the_forward_proxy(rig: Rig, make_proxy: MakeProxy, tmp_layout: Path) -> None:
    """A mapping with a static credential needs no upstream token: /token is answered without the
    upstream, and every upstream connection is mitmproxy's (pooled, reused across the client's
    connections): all of them tunnelled, none to the realm."""
    p = make_proxy(config(rig.remote, rig.static_bearer()), env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    assert pull(p, "farstatic", "multi", tmp_layout) == rig.digest("multi")
    conns = rig.assert_every_connection_tunnelled(rig.remote)
    assert conns["registry"] >= 1 and conns["token"] == 0, conns
    manifests_and_blobs = [e for e in rig.remote.access_log() if e.path != "/v2/"]
    assert len(manifests_and_blobs) > conns["registry"], "pooled connections were not reused"
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_names_only_the_forward_proxy_can_resolve(rig: Rig, make_proxy: MakeProxy, tmp_layout: Path) -> None:
    """As in production behind a corporate proxy: the registry (registry.egress.test) and its token
    service on another host (auth.egress.test) have names that resolve only where tinyproxy runs. The
    proxy never resolves them itself: it asks for `CONNECT name:port`, for the registry and the realm."""
    p = make_proxy(config(rig.named), env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    assert pull(p, "far", "multi", tmp_layout) == rig.digest("multi")
    conns = rig.assert_every_connection_tunnelled(rig.named)
    assert conns["registry"] >= 1 and conns["token"] >= 1, conns
    assert {c.rsplit(":", 1)[0] for c in rig.log().connects} == {REGISTRY_NAME, REALM_NAME}
    assert_clean([p.output()], secrets(rig.named, CREDS))


NO_PROXY_CASES: dict[str, tuple[Callable[[Rig], dict[str, str]], bool]] = {
    # case: (the environment, whether the realm still goes through tinyproxy)
    "address": (lambda r: {"HTTPS_PROXY": r.fwd.url(CREDS), "NO_PROXY": f"example.org,{r.net.remote}"}, False),
    "cidr": (lambda r: {"HTTPS_PROXY": r.fwd.url(CREDS), "NO_PROXY": "198.19.0.0/16"}, False),
    "lower-case": (lambda r: {"https_proxy": r.fwd.url(CREDS), "no_proxy": r.net.remote}, False),
    "registry-port-only": (lambda r: {"HTTPS_PROXY": r.fwd.url(CREDS), "NO_PROXY": r.remote.registry_netloc}, True),
    "http-proxy-only": (lambda r: {"HTTP_PROXY": r.fwd.url(CREDS)}, False),  # for http:// upstreams only
}


@pytest.mark.parametrize("case", list(NO_PROXY_CASES))
def test_no_proxy_sends_the_upstream_direct(rig: Rig, make_proxy: MakeProxy, tmp_layout: Path, case: str) -> None:
    """With REMOTE routed over the veth, NO_PROXY naming it (address, CIDR range, lower-case variables)
    sends every connection direct: tinyproxy sees none. Naming only the registry's host:port leaves
    the realm (another port) to tinyproxy. HTTP_PROXY alone does not apply to an https upstream."""
    env, realm_tunnelled = NO_PROXY_CASES[case]
    rig.net.direct(True)
    p = make_proxy(config(rig.remote), env=env(rig))
    assert pull(p, "far", "v1", tmp_layout) == rig.digest("v1")
    conns = rig.remote.connections()
    assert conns["registry"] >= 1 and conns["token"] >= 1, conns
    log = rig.log()
    assert log.connects == ([rig.remote.realm_netloc] * conns["token"] if realm_tunnelled else []), log.text
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_loopback_upstreams_are_never_proxied(
    rig: Rig, https_rig: https_upstream.HttpsRig, make_proxy: MakeProxy, tmp_layout: Path
) -> None:
    """HTTPS_PROXY names a forward proxy that is down, yet the rig's token upstream on `localhost` (registry
    and realm) is pulled from: loopback never goes through a forward proxy, whatever NO_PROXY says."""
    up = https_rig[SOURCE]
    mapping = {"registry": up.url, "remote": "platform", "username": up.username, "password": up.password}
    cfg = {"secretkey": SECRET_KEY, "ca_file": str(https_rig.ca.ca_cert), "proxies": {"local/": mapping}}
    p = make_proxy(cfg, env={"HTTPS_PROXY": f"http://{rig.net.link_addr}:{PORT + 1}"})
    assert up.token_realm is not None and up.token_realm.startswith("https://localhost:")
    assert pull(p, "local", "v1", tmp_layout) == rig.digest("v1")
    assert up.token_issuer is not None and up.token_issuer.requests()
    assert not rig.log().requests


# --- a forward proxy that fails -------------------------------------------------------------------


def test_forward_proxy_down_answers_502_at_once(rig: Rig, make_proxy: MakeProxy, tmp_layout: Path) -> None:
    """HTTPS_PROXY names a port where nothing listens: the token client's request (`/token`) and a
    pooled connection (a manifest through a static-credential mapping) are answered a registry JSON
    502 at once, logged as one line each (and the pooled connection's failure as one more, saying why);
    skopeo fails fast; no credential anywhere."""
    down = f"http://{CREDS[0]}:{CREDS[1]}@{rig.net.link_addr}:{PORT + 1}"
    p = make_proxy(config(rig.remote, rig.static_bearer(), upstream_timeout=10), env={"HTTPS_PROXY": down})
    since = settled(p)
    r, took = ask(p, "far/app")
    assert took < 5
    assert_registry_error(r, 502, "upstream registry unreachable (ConnectError)")
    (line,) = new_lines(p, since)
    assert re.search(r"GET /token \(far/\) mapping=- status=502 .*unreachable \(ConnectError\)$", line), line

    since = len(p.output())
    r, took = ask(p, "farstatic/app")
    assert took < 5
    assert_registry_error(r, 502, "upstream registry unreachable or failed to answer")
    token_line, why, line = new_lines(p, since)
    assert "GET /token (farstatic/) mapping=- status=200 " in token_line  # answered without the upstream
    # The pool says why, naming the mappings of that upstream and the forward proxy by its address only.
    via = f" via {rig.net.link_addr}:{PORT + 1} for mappings far/, farstatic/ failed: ConnectionRefusedError"
    assert "registryproxy: upstream connection to https://" in why and why.endswith(via), why
    assert re.search(r"GET farstatic/app/manifests/v1 mapping=farstatic/ status=error upstream=failed ", line), line

    started = time.monotonic()
    res = clients.skopeo_copy(f"{p.host}/far/app:v1", tmp_layout, tag="v1", timeout=60)
    assert not res.ok and time.monotonic() - started < 30, res.describe()
    assert "502" in res.stderr, res.describe()
    assert rig.remote.connections() == {"registry": 0, "token": 0}
    assert_clean([p.output(), res.stderr, r.text], secrets(rig.remote, CREDS))


def test_forward_proxy_that_never_answers_is_cut_at_upstream_timeout(rig: Rig, make_proxy: MakeProxy) -> None:
    """A forward proxy that accepts the connection and never answers the CONNECT: `/token` answers 504
    and the pooled connection 502, each after `upstream_timeout` (2 s), not later."""
    with socket.socket() as silent:  # the kernel completes the handshakes; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {"HTTPS_PROXY": f"http://{CREDS[0]}:{CREDS[1]}@127.0.0.1:{silent.getsockname()[1]}"}
        p = make_proxy(config(rig.remote, rig.static_bearer(), upstream_timeout=2), env=env)
        r, took = ask(p, "far/app")
        assert 1.9 < took < 5, took
        assert_registry_error(r, 504, "upstream registry timed out")
        r, took = ask(p, "farstatic/app")
        assert 1.9 < took < 5, took
        assert_registry_error(r, 502, "upstream registry unreachable or failed to answer")
    assert p.running()
    assert_clean([p.output()], secrets(rig.remote, CREDS))


@pytest.mark.parametrize("given", ["wrong-password", "none"])
def test_forward_proxy_credentials_are_required_and_never_shown(rig: Rig, make_proxy: MakeProxy, given: str) -> None:
    """tinyproxy answers 407 to a CONNECT without the right credentials: both connection kinds get a
    registry JSON 502 (the tunnel never opens), and neither the credentials given nor the right ones
    appear in the proxy's output, at debug level with connection logs, or in an answer."""
    creds = WRONG if given == "wrong-password" else None
    p = make_proxy(config(rig.remote, rig.static_bearer()), extra_args=DEBUG, env={"HTTPS_PROXY": rig.fwd.url(creds)})
    token_answer, _ = ask(p, "far/app")
    assert_registry_error(token_answer, 502, "upstream registry unreachable (ProxyError)")
    manifest_answer, _ = ask(p, "farstatic/app")
    assert_registry_error(manifest_answer, 502, "upstream registry unreachable or failed to answer")
    log = rig.log()
    assert log.connects and log.established == 0, log.text  # asked, refused
    assert rig.remote.connections() == {"registry": 0, "token": 0}
    texts = [p.output(), token_answer.text, manifest_answer.text]
    assert_clean(texts, secrets(rig.remote, CREDS, WRONG))


def test_right_credentials_at_debug_level_stay_out_of_the_output(
    rig: Rig, make_proxy: MakeProxy, tmp_layout: Path
) -> None:
    p = make_proxy(config(rig.remote), extra_args=DEBUG, env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    assert pull(p, "far", "v2s2", tmp_layout) == rig.digest("v2s2")
    assert rig.log().connects
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_pooled_tunnels_through_a_restarted_forward_proxy_are_not_reused(
    rig: Rig, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """Idle pooled connections are tunnels through the forward proxy: when it restarts they are dead,
    and the next pull opens new ones through the new process instead of failing on a stale one."""
    url = f"http://{CREDS[0]}:{CREDS[1]}@{rig.net.link_addr}:{PORT + 2}"
    p = make_proxy(config(rig.remote, rig.static_bearer()), env={"HTTPS_PROXY": url})
    for tag in ("v1", "v2s2"):
        one = ForwardProxy(rig.net, tmp_path / tag, CREDS, port=PORT + 2).start()
        try:
            assert pull(p, "farstatic", tag, tmp_path / f"copy-{tag}") == rig.digest(tag)
            assert one.log().connects
        finally:
            one.stop()
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_pool_off_with_a_forward_proxy_is_refused_at_start(rig: Rig, make_proxy: MakeProxy) -> None:
    """mitmproxy's own (unpooled) upstream connections cannot use a forward proxy: start-up is refused,
    naming the mapping and never the proxy's credentials (stock mitmdump prints an option error of a
    script with its traceback); with NO_PROXY covering the upstream it starts."""
    off = ["--set", "registryproxy_upstream_pool=false"]
    p = make_proxy(config(rig.remote), extra_args=off, env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    p.wait_for_output(r"(?s)cannot go through the forward proxy set for mapping far/ .*exiting", timeout=15)
    assert_no_secret([p.output()], secrets(rig.remote, CREDS))
    env = {"HTTPS_PROXY": rig.fwd.url(CREDS), "NO_PROXY": rig.net.remote}
    p = make_proxy(config(rig.remote), extra_args=off, env=env)
    r = httpx.get(f"{p.url}/readyz", timeout=10, trust_env=False)
    assert r.status_code == 200, p.output()


BAD_SETTINGS = {
    "two-spellings": (
        {"HTTPS_PROXY": "http://u:{pw}@{addr}", "https_proxy": "http://u:{pw}x@{addr}"},
        "https_proxy: differs",
    ),
    "socks": ({"HTTPS_PROXY": "socks5://u:{pw}@{addr}"}, "HTTPS_PROXY: SOCKS proxies are not supported"),
    "path": ({"HTTP_PROXY": "http://u:{pw}@{addr}/{pw}"}, "HTTP_PROXY: a proxy URL has no path or query"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_unusable_proxy_settings_refuse_start_up_without_echoing_them(
    rig: Rig, make_proxy: MakeProxy, case: str
) -> None:
    template, message = BAD_SETTINGS[case]
    env = {k: v.format(pw=CREDS[1], addr=rig.fwd.address) for k, v in template.items()}
    p = make_proxy(config(rig.remote), env=env)
    p.wait_for_output(rf"(?s){re.escape(message)}.*exiting", timeout=15)
    assert_no_secret([p.output()], secrets(rig.remote, CREDS))


# --- other forward proxy settings -----------------------------------------------------------------


def test_plain_http_upstream_goes_through_http_proxy(
    rig: Rig, https_rig: https_upstream.HttpsRig, make_proxy: MakeProxy, tmp_layout: Path
) -> None:
    """A plain-http upstream (the rig's Basic registry behind its TLS front, exposed at REMOTE) with only
    HTTP_PROXY set: the token client's probe is forwarded by tinyproxy (`GET http://…`), mitmproxy's pooled
    connections are CONNECT tunnels; every connection to the upstream is one of them."""
    basic = https_rig["https-basic"]
    relay = rig.net.relay("remote-plain-basic").start(("127.0.0.1", basic.tap.port))
    mapping = {"registry": f"http://{relay.hostport}", "remote": "platform"}
    mapping.update(username=basic.username or "", password=basic.password or "")
    p = make_proxy({"secretkey": SECRET_KEY, "proxies": {"plain/": mapping}}, env={"HTTP_PROXY": rig.fwd.url(CREDS)})
    assert pull(p, "plain", "v1", tmp_layout) == https_rig.digests["https-basic"][(APP, "v1")]
    log = rig.fwd.wait_established(rig.mark, relay.connections())
    assert relay.connections() >= 1 and log.established == relay.connections(), log.text
    assert {m for m, _ in log.requests} == {"CONNECT", "GET"}, log.requests
    upstream = f"http://{relay.hostport}/"
    assert all(t == relay.hostport if m == "CONNECT" else t.startswith(upstream) for m, t in log.requests)
    assert_clean([p.output()], [CREDS[1], basic.password or "-"])


def test_https_forward_proxy(rig: Rig, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """HTTPS_PROXY=https://…: TLS to the forward proxy itself (a TLS front before tinyproxy, its CA in the
    system store named by SSL_CERT_FILE), then the CONNECT tunnel and TLS to the upstream inside it."""
    ca = tls.make_ca(tmp_path / "fwd-ca", hosts=(rig.net.link_addr,))
    front = rig.net.relay("tinyproxy-tls", host=rig.net.link_addr, server_tls=https_upstream.server_context(ca))
    front.start((rig.net.link_addr, PORT))
    url = f"https://{CREDS[0]}:{CREDS[1]}@{front.hostport}"
    p = make_proxy(config(rig.remote), env={"HTTPS_PROXY": url, "SSL_CERT_FILE": str(ca.ca_cert)})
    assert pull(p, "far", "multi", tmp_path / "copy") == rig.digest("multi")
    conns = rig.assert_every_connection_tunnelled(rig.remote)
    assert conns["registry"] >= 1 and conns["token"] >= 1, conns
    assert front.connections() == len(rig.log().connects)
    assert_clean([p.output()], secrets(rig.remote, CREDS))


def test_untrusted_upstream_through_the_forward_proxy_fails_naming_the_upstream(
    rig: Rig, make_proxy: MakeProxy
) -> None:
    """Without `ca_file` the upstream's certificate is unknown, also inside a tunnel: both connection kinds
    answer 502 at once and log the usual line naming the upstream (not the forward proxy), the mapping
    and the reason."""
    cfg = config(rig.named, rig.static_bearer())
    del cfg["ca_file"]
    p = make_proxy(cfg, env={"HTTPS_PROXY": rig.fwd.url(CREDS)})
    r, took = ask(p, "far/app")
    assert took < 5
    assert_registry_error(r, 502, "upstream registry unreachable (TLS: unknown CA)")
    r, took = ask(p, "farstatic/app")
    assert took < 5
    assert_registry_error(r, 502, "upstream registry unreachable or failed to answer")

    def tls_lines() -> list[str]:
        return re.findall(r"^.*upstream TLS to .*$", p.output(), re.MULTILINE)

    wait_until(lambda: len(tls_lines()) >= 2, 10, "two 'upstream TLS to' lines", p.output)
    p.wait_quiet(0.3)  # and no third one
    lines = tls_lines()
    # The token client's line names the request's mapping; the pool's, every mapping of that upstream.
    labels = ["mapping far/", "mappings far/, farstatic/"]
    assert len(lines) == 2, p.output()
    for line, label in zip(lines, labels, strict=True):
        assert f"upstream TLS to {rig.named.registry_netloc} failed for {label}: unknown CA (" in line
    assert rig.log().connects
    assert_clean([p.output()], secrets(rig.named, CREDS))
