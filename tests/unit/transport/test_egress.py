"""Forward proxies for the proxy's own connections (transport/egress.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regproxy.transport import egress
from regproxy.transport.egress import Egress, EgressError, ProxySpec

SECRET = "s3cr%40t-pw"  # percent-encoded "s3cr@t-pw"


def env_egress(**environ: str) -> Egress:
    return Egress.from_environ(environ)


# --- proxy URLs ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://proxy.corp:3128", ProxySpec("http", "proxy.corp", 3128)),
        ("proxy.corp:3128", ProxySpec("http", "proxy.corp", 3128)),
        ("http://proxy.corp", ProxySpec("http", "proxy.corp", 80)),
        ("https://proxy.corp", ProxySpec("https", "proxy.corp", 443)),
        ("HTTP://Proxy.Corp:8080/", ProxySpec("http", "proxy.corp", 8080)),
        ("http://[fd00::1]:3128", ProxySpec("http", "fd00::1", 3128)),
        (" http://10.0.0.1:3128 ", ProxySpec("http", "10.0.0.1", 3128)),
    ],
)
def test_proxy_url_forms(value: str, expected: ProxySpec) -> None:
    assert egress.parse_proxy_url(value, "HTTPS_PROXY") == expected


def test_proxy_credentials_are_decoded_and_never_shown() -> None:
    spec = egress.parse_proxy_url(f"http://robot:{SECRET}@proxy.corp:3128", "HTTPS_PROXY")
    assert (spec.username, spec.password) == ("robot", "s3cr@t-pw")
    assert spec.authorization == "Basic cm9ib3Q6czNjckB0LXB3"
    for shown in (str(spec), repr(spec), spec.url):
        assert "s3cr" not in shown and "robot" not in shown
    assert spec.url == "http://proxy.corp:3128"
    assert spec.address == ("proxy.corp", 3128)


def test_no_credentials_no_authorization() -> None:
    assert ProxySpec("http", "p", 1).authorization is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"socks5://u:{SECRET}@proxy:1080", "SOCKS proxies are not supported"),
        (f"ftp://u:{SECRET}@proxy:21", "scheme must be http or https"),
        (f"http://u:{SECRET}@proxy:3128/path", "no path or query"),
        (f"http://u:{SECRET}@proxy:99999", "not a proxy URL"),
        (f"http://u:{SECRET}@proxy:0", "port 0"),
        (f"http://u:{SECRET}@:3128", "names no proxy host"),
        ("http://u:a%0Ab@proxy:3128", "control characters"),
    ],
)
def test_bad_proxy_urls_are_refused_without_echo(value: str, message: str) -> None:
    with pytest.raises(EgressError) as info:
        egress.parse_proxy_url(value, "HTTPS_PROXY")
    text = str(info.value)
    assert text.startswith("HTTPS_PROXY: ") and message in text
    assert "s3cr" not in text and "\n" not in text


# --- the environment ---


def test_scheme_picks_the_variable() -> None:
    e = env_egress(HTTPS_PROXY="http://secure:1", HTTP_PROXY="http://plain:2")
    assert e.proxy_for("https://registry.example.com/v2/") == ProxySpec("http", "secure", 1)
    assert e.proxy_for("http://registry.example.com:5000/v2/") == ProxySpec("http", "plain", 2)
    assert e.proxy_for("ftp://registry.example.com/") is None


def test_https_only_leaves_plain_http_direct() -> None:
    e = env_egress(https_proxy="http://secure:1")
    assert e.proxy_for("http://registry.example.com/v2/") is None
    assert e.proxy_for("https://registry.example.com/v2/") is not None


def test_lower_case_and_upper_case_spellings() -> None:
    assert env_egress(https_proxy="http://p:1").https == ProxySpec("http", "p", 1)
    assert env_egress(HTTPS_PROXY="http://p:1", https_proxy="http://p:1").https == ProxySpec("http", "p", 1)
    assert env_egress(no_proxy="a.example").no_proxy == ("a.example",)


def test_disagreeing_spellings_are_refused_naming_both() -> None:
    with pytest.raises(EgressError, match="^https_proxy: differs from HTTPS_PROXY"):
        env_egress(HTTPS_PROXY="http://p:1", https_proxy="http://q:1")
    with pytest.raises(EgressError, match="^no_proxy: differs from NO_PROXY"):
        env_egress(NO_PROXY="a", no_proxy="b")


def test_error_names_the_variable_that_was_set() -> None:
    with pytest.raises(EgressError, match="^http_proxy: "):
        env_egress(http_proxy="socks5://p:1")


def test_empty_variables_mean_no_proxy() -> None:
    assert env_egress(HTTPS_PROXY="", HTTP_PROXY="  ", NO_PROXY="") == Egress()
    assert not Egress().configured and env_egress(HTTP_PROXY="p:1").configured


@pytest.mark.parametrize("entry", ["a b", "host:port", "host:0", "-/-", "exa mple.com", "a/b"])
def test_bad_no_proxy_entries_are_refused(entry: str) -> None:
    with pytest.raises(EgressError, match="^NO_PROXY: "):
        env_egress(NO_PROXY=f"ok.example,{entry}")


# --- NO_PROXY and loopback ---

PROXY = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("*", "https://registry.example.com/", True),
        ("example.com", "https://example.com/", True),
        ("example.com", "https://registry.example.com/", True),
        ("example.com", "https://notexample.com/", False),
        (".example.com", "https://registry.example.com/", True),
        (".example.com", "https://example.com/", True),
        ("*.example.com", "https://registry.example.com/", True),
        ("EXAMPLE.com.", "https://Registry.Example.COM./v2/", True),
        ("registry.example.com:5000", "https://registry.example.com:5000/", True),
        ("registry.example.com:5000", "https://registry.example.com/", False),
        ("registry.example.com:443", "https://registry.example.com/", True),
        ("10.1.2.3", "https://10.1.2.3/", True),
        ("10.1.2.3", "https://10.1.2.4/", False),
        ("10.0.0.0/8", "https://10.200.0.1:5000/", True),
        ("10.0.0.0/8", "https://11.0.0.1/", False),
        ("10.0.0.0/8", "https://ten.example.com/", False),
        ("fd00::/8", "https://[fd12::1]:5000/", True),
        ("[fd12::1]", "https://[fd12::1]/", True),
        ("fd12::1", "https://[fd12::1]/", True),
        ("[fd12::1]:5000", "https://[fd12::1]:5000/", True),
        ("[fd12::1]:5000", "https://[fd12::1]/", False),
        ("other.example, example.com", "https://x.example.com/", True),
        ("", "https://registry.example.com/", False),
    ],
)
def test_no_proxy(no_proxy: str, url: str, direct: bool) -> None:
    e = env_egress(HTTPS_PROXY=PROXY, NO_PROXY=no_proxy)
    assert (e.proxy_for(url) is None) is direct


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:5000/",
        "https://registry.localhost/",
        "https://127.0.0.1/",
        "https://127.9.9.9/",
        "https://[::1]/",
    ],
)
def test_loopback_is_never_proxied(url: str) -> None:
    assert env_egress(HTTPS_PROXY=PROXY).proxy_for(url) is None


def test_unparseable_url_goes_nowhere() -> None:
    assert env_egress(HTTPS_PROXY=PROXY).proxy_for("https://host:99999/") is None


def test_module_proxy_for_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert egress.proxy_for("https://registry.example.com/") is None
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert egress.proxy_for("https://registry.example.com/") == ProxySpec("http", "proxy.corp", 3128)
    assert egress.proxy_for("https://r.internal.example/") is None
    assert egress.proxy_for("https://registry.example.com/", Egress()) is None


@given(st.text(max_size=40), st.text(max_size=40))
def test_decisions_never_raise(no_proxy: str, host: str) -> None:
    try:
        e = env_egress(HTTPS_PROXY=PROXY, NO_PROXY=no_proxy)
    except EgressError:
        return
    e.proxy_for(f"https://{host}/")
    egress.bypassed(host, 443, e.no_proxy)
