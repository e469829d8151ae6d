"""Loading and validating the configuration (config/)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from regproxy.config import (
    DOCKER_HUB_API_HOST,
    SECRET_KEY_ENV,
    ConfigError,
    Upstream,
    load_file,
    loads,
    parse,
    parse_registry,
)
from regproxy.transport import trust
from regproxy.transport.egress import Egress, ProxySpec
from rig import badcerts
from rig.keys import CAP as UUID

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY2 = "ff" * 32
ONE_LINE_BUG = "BUG: a key with a newline is echoed raw, so the ConfigError message is not one line"


def base(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "secretkey": KEY,
        "proxies": {"bp/": {"registry": "index.docker.io", "remote": "backplane"}},
    }
    data.update(extra)
    return data


def with_mapping(key: str = "bp/", **fields: Any) -> dict[str, Any]:
    return base(proxies={key: fields})


def config_error(data: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, environ or {})
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- formats ---


def test_original_format() -> None:
    text = f"""
listen_addr: 127.0.0.1
port: 5000
secretkey: {KEY}
proxies:
  "bp/":
    registry: index.docker.io
    remote: backplane
    auth: "Basic dXNlcjpwYXNz"
"""
    config = loads(text, environ={})
    assert (config.listen_addr, config.port) == ("127.0.0.1", 5000)
    assert config.secretkeys == (bytes.fromhex(KEY),)
    assert not config.generated_key
    assert config.public_url is None
    (m,) = config.mappings
    assert (m.key, m.prefix, m.namespace, m.remote) == ("bp/", ("bp",), True, "backplane")
    assert m.upstream == Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)
    assert m.auth == "Basic dXNlcjpwYXNz"


def test_later_spellings() -> None:
    data = base(listen_port=6000, secret_key=KEY, proxy_fqdn="reg.example.com")
    del data["secretkey"]
    config = parse(data, {})
    assert config.port == 6000
    assert config.secretkeys == (bytes.fromhex(KEY),)
    assert config.public_url == "https://reg.example.com"


def test_defaults() -> None:
    config = parse(base(), {})
    assert (config.listen_addr, config.port, config.token_ttl, config.upstream_timeout) == ("0.0.0.0", 5000, 300, 30.0)


def test_port_as_string_is_accepted() -> None:
    assert parse(base(port="5001"), {}).port == 5001


def test_proxy_fqdn_with_scheme_is_kept() -> None:
    assert parse(base(proxy_fqdn="http://reg.example.com:8080"), {}).public_url == "http://reg.example.com:8080"


def test_public_url_is_normalised() -> None:
    assert parse(base(public_url="https://Reg.Example.com/"), {}).public_url == "https://reg.example.com"


def test_domains_include_public_url_and_hosts() -> None:
    data = base(public_url="https://reg.example.com:8443")
    data["proxies"]["x/"] = {"registry": "ghcr.io", "hosts": ["A.example.com", "b.example.com:5000"]}
    assert parse(data, {}).domains == {"reg.example.com:8443", "a.example.com", "b.example.com:5000"}


# --- secret keys ---


def test_secretkeys_list_first_encrypts() -> None:
    data = base()
    del data["secretkey"]
    data["secretkeys"] = [KEY2, KEY]
    config = parse(data, {})
    assert config.secretkeys == (bytes.fromhex(KEY2), bytes.fromhex(KEY))


def test_secret_key_from_environment() -> None:
    data = base()
    del data["secretkey"]
    assert parse(data, {SECRET_KEY_ENV: KEY2}).secretkeys == (bytes.fromhex(KEY2),)


def test_configured_key_beats_environment() -> None:
    assert parse(base(), {SECRET_KEY_ENV: KEY2}).secretkeys == (bytes.fromhex(KEY),)


def test_generated_key_when_none_given() -> None:
    data = base()
    del data["secretkey"]
    config = parse(data, {})
    assert config.generated_key
    assert len(config.secretkeys) == 1 and len(config.secretkeys[0]) == 32


def test_empty_secretkey_falls_back_to_generated() -> None:
    config = parse(base(secretkey=""), {})
    assert config.generated_key


def test_secret_key_is_not_in_repr() -> None:
    config = parse(base(), {})
    assert KEY not in repr(config) and repr(bytes.fromhex(KEY)) not in repr(config)


@pytest.mark.parametrize(
    "value",
    ["zz" + KEY[2:], KEY[:-2], KEY + "00", "nothex secret value", 12345, "0x" + KEY[2:]],
)
def test_bad_secretkey_is_refused_without_echo(value: object) -> None:
    message = config_error(base(secretkey=value))
    assert message.startswith("secretkey:")
    assert str(value) not in message
    assert KEY[2:10] not in message


def test_bad_environment_key_is_refused_without_echo() -> None:
    data = base()
    del data["secretkey"]
    secret = "deadbeef" * 7  # 28 bytes
    message = config_error(data, {SECRET_KEY_ENV: secret})
    assert message.startswith(SECRET_KEY_ENV)
    assert secret not in message


def test_bad_entry_in_secretkeys_is_named_by_index() -> None:
    data = base()
    del data["secretkey"]
    data["secretkeys"] = [KEY, "secretsecret"]
    message = config_error(data)
    assert message.startswith("secretkeys[1]:")
    assert "secretsecret" not in message


@pytest.mark.parametrize("value", [[], KEY, None])
def test_secretkeys_must_be_a_non_empty_list(value: object) -> None:
    data = base()
    del data["secretkey"]
    data["secretkeys"] = value
    assert config_error(data).startswith("secretkeys:")


# --- credentials ---


def test_username_and_password_become_basic_auth() -> None:
    config = parse(with_mapping(registry="ghcr.io", remote="org", username="bob", password="s3cret"), {})
    assert config.mappings[0].auth == "Basic " + base64.b64encode(b"bob:s3cret").decode()


def test_username_and_password_env_become_basic_auth() -> None:
    data = with_mapping(registry="ghcr.io", remote="org", username="bob", password_env="GHCR_PW")
    config = parse(data, {"GHCR_PW": "p:w"})
    assert config.mappings[0].auth == "Basic " + base64.b64encode(b"bob:p:w").decode()


def test_auth_scheme_is_normalised() -> None:
    config = parse(with_mapping(registry="ghcr.io", remote="org", auth="bearer  abc.def "), {})
    assert config.mappings[0].auth == "Bearer abc.def"


def test_auth_is_not_in_repr() -> None:
    config = parse(with_mapping(registry="ghcr.io", remote="org", username="bob", password="s3cret"), {})
    auth = config.mappings[0].auth
    assert auth is not None
    assert "s3cret" not in repr(config) and auth not in repr(config)


def test_no_auth_is_none() -> None:
    assert parse(with_mapping(registry="ghcr.io", remote="org"), {}).mappings[0].auth is None


@pytest.mark.parametrize(
    "auth",
    [
        "Basic !!notbase64!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Digest abcdef",
        "Basic",
        "s3cretvalue",
        "Basic " + base64.b64encode(b"u:p").decode() + "\nX-Injected: 1",
    ],
)
def test_bad_auth_is_refused_without_echo(auth: str) -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="org", auth=auth))
    assert message.startswith("proxies.bp/.auth:")
    credential = auth.partition(" ")[2].split("\n")[0] if " " in auth else auth
    if credential != "Basic":
        assert credential not in message


def test_auth_and_username_conflict() -> None:
    data = with_mapping(registry="ghcr.io", remote="org", auth="Basic dXNlcjpwYXNz", username="u", password="p")
    assert config_error(data).startswith("proxies.bp/.username:")


def test_username_without_password_is_refused() -> None:
    assert config_error(with_mapping(registry="ghcr.io", remote="org", username="bob")).startswith(
        "proxies.bp/.username:"
    )


def test_username_with_both_password_and_env_is_refused() -> None:
    data = with_mapping(registry="ghcr.io", remote="org", username="bob", password="pw1secret", password_env="PW")
    message = config_error(data, {"PW": "x"})
    assert message.startswith("proxies.bp/.username:")
    assert "pw1secret" not in message


@pytest.mark.parametrize("key", ["password", "password_env"])
def test_password_without_username_is_refused(key: str) -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="org", **{key: "hunter2secret"}))
    assert message.startswith(f"proxies.bp/.{key}:")
    assert "hunter2secret" not in message


def test_password_env_naming_unset_variable() -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="org", username="bob", password_env="NOPE"))
    assert message.startswith("proxies.bp/.password_env:")
    assert "NOPE" in message


def test_password_env_naming_empty_variable() -> None:
    data = with_mapping(registry="ghcr.io", remote="org", username="bob", password_env="EMPTY")
    assert config_error(data, {"EMPTY": ""}).startswith("proxies.bp/.password_env:")


@pytest.mark.parametrize("password", [12345, "", None])
def test_bad_password_is_refused_without_echo(password: object) -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="org", username="bob", password=password))
    assert message.startswith("proxies.bp/.password:")
    assert "12345" not in message


@pytest.mark.parametrize("username", ["", "a:b", "bob\r\n", 7])
def test_bad_username_is_refused(username: object) -> None:
    data = with_mapping(registry="ghcr.io", remote="org", username=username, password="pw")
    assert config_error(data).startswith("proxies.bp/.username:")


# --- registries ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ghcr.io", Upstream("https", "ghcr.io", 443)),
        ("GHCR.io", Upstream("https", "ghcr.io", 443)),
        ("registry.example.com:5000", Upstream("https", "registry.example.com", 5000)),
        ("http://127.0.0.1:5000", Upstream("http", "127.0.0.1", 5000)),
        ("http://reg.local", Upstream("http", "reg.local", 80)),
        ("https://reg.example.com:8443/", Upstream("https", "reg.example.com", 8443)),
        ("https://[::1]:5000", Upstream("https", "::1", 5000)),
        ("docker.io", Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)),
        ("index.docker.io", Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)),
        ("registry-1.docker.io", Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)),
        ("https://index.docker.io/", Upstream("https", DOCKER_HUB_API_HOST, 443, dockerhub=True)),
    ],
)
def test_registry_forms(value: str, expected: Upstream) -> None:
    assert parse_registry(value, "r") == expected


@pytest.mark.parametrize(
    ("upstream", "netloc"),
    [
        (Upstream("https", "a.io", 443), "a.io"),
        (Upstream("https", "a.io", 5000), "a.io:5000"),
        (Upstream("http", "a.io", 80), "a.io"),
        (Upstream("http", "::1", 5000), "[::1]:5000"),
    ],
)
def test_upstream_netloc(upstream: Upstream, netloc: str) -> None:
    assert upstream.netloc == netloc
    assert upstream.origin == f"{upstream.scheme}://{netloc}"


@pytest.mark.parametrize(
    "value",
    [
        "https://reg.example.com/v2",
        "reg.example.com/path",
        "https://user:pw5ecret@reg.example.com",
        "ftp://reg.example.com",
        "reg.example.com:99999",
        "reg.example.com:abc",
        "https://reg.example.com?x=1",
        "https://reg.example.com#frag",
        "bad_host.example",
        "",
        "   ",
        5000,
        None,
    ],
)
def test_bad_registry_is_refused(value: object) -> None:
    message = config_error(with_mapping(registry=value, remote="x"))
    assert message.startswith("proxies.bp/.registry:")
    assert "pw5ecret" not in message


def test_registry_port_zero_is_refused() -> None:
    config_error(with_mapping(registry="reg.example.com:0", remote="x"))


def test_missing_registry() -> None:
    assert config_error(with_mapping(remote="x")).startswith("proxies.bp/.registry:")


# --- mappings ---


def test_repository_key_needs_remote() -> None:
    assert config_error(with_mapping("team/app", registry="ghcr.io")).startswith("proxies.team/app.remote:")


def test_namespace_key_may_have_empty_remote() -> None:
    config = parse(with_mapping("hub/", registry="docker.io", remote=""), {})
    assert config.mappings[0].remote == ""


def test_remote_slashes_are_stripped() -> None:
    assert parse(with_mapping(registry="ghcr.io", remote="/org/sub/"), {}).mappings[0].remote == "org/sub"


@pytest.mark.parametrize("remote", ["Org", "a/../b", "a//b", 5])
def test_bad_remote_is_refused(remote: object) -> None:
    assert config_error(with_mapping(registry="ghcr.io", remote=remote)).startswith("proxies.bp/.remote:")


def test_capability_detected_from_key() -> None:
    config = parse(with_mapping(f"{UUID}/nginx", registry="docker.io", remote="library/nginx"), {})
    assert config.mappings[0].capability
    assert config.mappings[0].label.startswith("cap:") and UUID not in config.mappings[0].label


def test_capability_can_be_set_explicitly() -> None:
    config = parse(with_mapping("team/app", registry="ghcr.io", remote="x", capability=True), {})
    assert config.mappings[0].capability


def test_ordinary_key_is_not_capability() -> None:
    assert parse(base(), {}).mappings[0].label == "bp/"


def test_hosts_are_normalised() -> None:
    config = parse(with_mapping(registry="ghcr.io", remote="x", hosts=[" A.Example.com ", "b.example.com:5000"]), {})
    assert config.mappings[0].hosts == ("a.example.com", "b.example.com:5000")


@pytest.mark.parametrize("hosts", ["a.example.com", {"a": 1}, [1], ["bad host"], ["a.example.com:0"], ["a.com:x"]])
def test_bad_hosts_are_refused(hosts: object) -> None:
    assert config_error(with_mapping(registry="ghcr.io", remote="x", hosts=hosts)).startswith("proxies.bp/.hosts:")


@pytest.mark.parametrize("key", ["Bp/", "a..b/", "a//b", "/a", "-a/", "a/-b", "", "/", "a b"])
def test_malformed_mapping_keys(key: str) -> None:
    message = config_error(with_mapping(key, registry="ghcr.io", remote="x"))
    assert message.startswith("proxies.")
    assert "not a valid repository name" in message


def test_non_string_mapping_key() -> None:
    assert config_error(base(proxies={5: {"registry": "ghcr.io", "remote": "x"}})).startswith("proxies.5:")


def test_namespace_and_repository_of_same_name_collide() -> None:
    data = base(proxies={"bp": {"registry": "ghcr.io", "remote": "x"}, "bp/": {"registry": "ghcr.io", "remote": "y"}})
    message = config_error(data)
    assert message.startswith("proxies.bp/:") and "collides" in message


def test_unknown_mapping_key() -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="x", remote_name="y"))
    assert message.startswith("proxies.bp/.remote_name:")


def test_mapping_value_must_be_a_mapping() -> None:
    assert config_error(base(proxies={"bp/": "ghcr.io"})).startswith("proxies.bp/:")


@pytest.mark.parametrize("proxies", [None, {}, [], "bp/"])
def test_proxies_must_be_non_empty_mapping(proxies: object) -> None:
    assert config_error(base(proxies=proxies)).startswith("proxies:")


def test_capability_key_is_hidden_in_errors() -> None:
    message = config_error(with_mapping(f"{UUID}/nginx", registry="ftp://x", remote="library/nginx"))
    assert UUID not in message
    assert message.startswith("proxies.<capability>/nginx.registry:")


def test_capability_key_is_hidden_in_unknown_key_errors() -> None:
    message = config_error(with_mapping(f"team/{UUID}", registry="ghcr.io", remote="x", bogus=1))
    assert UUID not in message


def test_capability_key_is_hidden_in_collision_errors() -> None:
    proxies = {f"{UUID}": {"registry": "ghcr.io", "remote": "x"}, f"{UUID}/": {"registry": "ghcr.io", "remote": "y"}}
    message = config_error(base(proxies=proxies))
    assert UUID not in message and "<capability>" in message


def test_upper_case_capability_key_is_hidden_in_errors() -> None:
    message = config_error(with_mapping(f"{UUID.upper()}/nginx", registry="docker.io", remote="library/nginx"))
    assert UUID.upper() not in message


# --- top level ---


def test_unknown_top_level_key() -> None:
    message = config_error(base(listen_adr="0.0.0.0"))
    assert message.startswith("listen_adr: unknown key")


@pytest.mark.parametrize(
    ("extra", "second"),
    [
        ({"port": 5000, "listen_port": 5001}, "listen_port"),
        ({"secret_key": KEY}, "secret_key"),
        ({"secretkeys": [KEY]}, "secretkeys"),
    ],
)
def test_conflicting_spellings(extra: dict[str, Any], second: str) -> None:
    message = config_error(base(**extra))
    assert message.startswith(f"{second}: conflicts with")
    assert KEY not in message


def test_public_url_and_proxy_fqdn_conflict() -> None:
    assert config_error(base(public_url="https://a.example.com", proxy_fqdn="b.example.com")).startswith("proxy_fqdn:")


@pytest.mark.parametrize("port", [-1, 65536, "abc", True, 5.5, None])
def test_bad_port(port: object) -> None:
    assert config_error(base(port=port)).startswith("port:")


def test_bad_listen_port_names_its_spelling() -> None:
    assert config_error(base(listen_port=70000)).startswith("listen_port:")


@pytest.mark.parametrize("addr", ["not an address", 5, "-bad-"])
def test_bad_listen_addr(addr: object) -> None:
    assert config_error(base(listen_addr=addr)).startswith("listen_addr:")


@pytest.mark.parametrize(
    "url", ["ftp://a.example.com", "https://", "https://a.example.com/path", "https://u:p@a.example.com", 5]
)
def test_bad_public_url(url: object) -> None:
    assert config_error(base(public_url=url)).startswith("public_url:")


@pytest.mark.parametrize("fqdn", ["", "a.example.com/path", 5])
def test_bad_proxy_fqdn(fqdn: object) -> None:
    assert config_error(base(proxy_fqdn=fqdn)).startswith("proxy_fqdn:")


@pytest.mark.parametrize(
    ("key", "value"),
    [("token_ttl", 10), ("token_ttl", True), ("refresh_ttl", 0), ("upstream_timeout", 0), ("upstream_timeout", "5")],
)
def test_bad_durations(key: str, value: object) -> None:
    assert config_error(base(**{key: value})).startswith(f"{key}:")


@pytest.mark.parametrize("data", [None, [], "text", 5])
def test_top_level_must_be_a_mapping(data: object) -> None:
    assert config_error(data).startswith("config:")


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        loads("proxies: [unclosed\n  secretkey: " + KEY, environ={})
    message = str(info.value)
    assert message.startswith("config: not valid YAML")
    assert "\n" not in message and KEY not in message


def test_empty_text_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="^config: the top level"):
        loads("", environ={})


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base()), encoding="utf-8")
    assert load_file(path, environ={}).mappings[0].key == "bp/"


def test_load_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "missing.yaml", environ={})


def test_load_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_file(path, environ={})


def test_loads_uses_environ_argument() -> None:
    text = yaml.safe_dump(with_mapping(registry="ghcr.io", remote="o", username="u", password_env="P"))
    config = loads(text, environ={"P": "pw"})
    assert config.mappings[0].auth == "Basic " + base64.b64encode(b"u:pw").decode()


def test_unknown_top_level_key_with_newline_is_one_line() -> None:
    config_error(base(**{"bad\nkey": 1}))


def test_malformed_mapping_key_with_newline_is_one_line() -> None:
    config_error(with_mapping("a\nb/", registry="ghcr.io", remote="x"))


# --- properties ---

_secretish = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!@#$%^&*", min_size=12, max_size=30)


@given(_secretish)
def test_password_never_appears_in_errors(password: str) -> None:
    # A mapping that fails on a later field must not show its password.
    data = with_mapping(registry="ghcr.io", remote="x", username="u", password=password, hosts=["bad host"])
    assert password not in config_error(data)


@given(_secretish)
def test_bad_secretkey_never_appears_in_errors(value: str) -> None:
    assert value not in config_error(base(secretkey=value))


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=80).filter(lambda s: len(s) != 64))
def test_wrong_length_hex_key_is_refused(value: str) -> None:
    message = config_error(base(secretkey=value))
    assert message.startswith("secretkey:")
    if len(value) >= 8:
        assert value not in message


@given(st.uuids().map(str), st.sampled_from(["ftp://x", "", "https://a/b"]))
def test_uuid_keys_never_appear_in_errors(uuid: str, registry: str) -> None:
    assert uuid not in config_error(with_mapping(f"{uuid}/app", registry=registry, remote="x"))


# --- upstream trust: ca_file, tls_verify ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> badcerts.Pki:
    return badcerts.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return badcerts.make_pki(tmp_path_factory.mktemp("other-pki"), "another CA").ca_cert


def two(a: dict[str, Any], b: dict[str, Any], **top: Any) -> dict[str, Any]:
    return base(proxies={"a/": a, "b/": b}, **top)


def test_default_trust_is_the_system_store() -> None:
    config = parse(base(), {})
    (m,) = config.mappings
    assert m.trust.verify and m.trust.ca_file is None and m.trust.ca_pem == b""
    assert m.trust.store is config.trust_store
    assert config.trust_store is not None and config.trust_store.source in ("system", "certifi")


def test_top_level_ca_file_applies_to_every_https_mapping(pki: badcerts.Pki) -> None:
    data = two(
        {"registry": "https://reg.example.com:5443", "remote": "x"},
        {"registry": "http://plain.example.com", "remote": "y"},
        ca_file=str(pki.ca_cert),
    )
    a, b = parse(data, {}).mappings
    assert a.trust.ca_file == str(pki.ca_cert)
    assert a.trust.ca_pem == trust.read_ca_file(pki.ca_cert)
    assert b.trust.verify  # plain http: the top-level file is simply not used


def test_mapping_ca_file_replaces_the_top_level_one(pki: badcerts.Pki, other_ca: Path) -> None:
    data = two(
        {"registry": "https://a.example.com", "remote": "x", "ca_file": str(other_ca)},
        {"registry": "https://b.example.com", "remote": "y"},
        ca_file=str(pki.ca_cert),
    )
    a, b = parse(data, {}).mappings
    assert a.trust.ca_file == str(other_ca)
    assert b.trust.ca_file == str(pki.ca_cert)


def test_relative_ca_file_is_relative_to_the_config_file(pki: badcerts.Pki, tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(pki.ca_cert.read_bytes())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(with_mapping(registry="https://r.example.com", remote="x", ca_file="certs/ca.pem")))
    (m,) = load_file(path, environ={}).mappings
    assert m.trust.ca_file == str(tmp_path / "certs" / "ca.pem")


def test_tls_verify_false() -> None:
    (m,) = parse(with_mapping(registry="https://lab.example.com", remote="x", tls_verify=False), {}).mappings
    assert not m.trust.verify


def test_tls_verify_false_ignores_the_top_level_ca_file(pki: badcerts.Pki) -> None:
    data = with_mapping(registry="https://lab.example.com", remote="x", tls_verify=False)
    data["ca_file"] = str(pki.ca_cert)
    (m,) = parse(data, {}).mappings
    assert not m.trust.verify and m.trust.ca_pem == b""


@pytest.mark.parametrize("value", [5, True, "", "  ", ["a.pem"], {"x": 1}, "a\nb.pem"])
def test_ca_file_of_the_wrong_type(value: object) -> None:
    assert config_error(base(ca_file=value)) == "ca_file: must be the path of a PEM file of CA certificates"
    message = config_error(with_mapping(registry="https://r.example.com", remote="x", ca_file=value))
    assert message.startswith("proxies.bp/.ca_file: must be the path of a PEM file")


def test_ca_file_missing_unreadable_or_without_certificate(tmp_path: Path) -> None:
    assert config_error(base(ca_file=str(tmp_path / "nope.pem"))) == f"ca_file: {tmp_path / 'nope.pem'}: no such file"
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate")
    message = config_error(with_mapping(registry="https://r.example.com", remote="x", ca_file=str(empty)))
    assert message.startswith(f"proxies.bp/.ca_file: {empty}: no PEM certificate in it")
    assert config_error(base(ca_file=str(tmp_path))).endswith("is a directory, not a PEM file")


@pytest.mark.parametrize("value", ["no", "false", 0, None, [False]])
def test_tls_verify_must_be_a_boolean(value: object) -> None:
    message = config_error(with_mapping(registry="https://r.example.com", remote="x", tls_verify=value))
    assert message == "proxies.bp/.tls_verify: must be true or false"


def test_ca_file_with_tls_verify_false_is_refused(pki: badcerts.Pki) -> None:
    data = with_mapping(registry="https://r.example.com", remote="x", ca_file=str(pki.ca_cert), tls_verify=False)
    assert config_error(data) == "proxies.bp/.ca_file: conflicts with tls_verify: false (nothing would be verified)"


def test_trust_settings_on_a_plain_http_registry_are_refused(pki: badcerts.Pki) -> None:
    message = config_error(with_mapping(registry="http://r.example.com", remote="x", ca_file=str(pki.ca_cert)))
    assert message.startswith("proxies.bp/.ca_file: the registry is plain http")
    message = config_error(with_mapping(registry="http://r.example.com", remote="x", tls_verify=False))
    assert message.startswith("proxies.bp/.tls_verify: the registry is plain http")
    (m,) = parse(with_mapping(registry="http://r.example.com", remote="x", tls_verify=True), {}).mappings
    assert m.trust.verify


def test_mappings_of_one_upstream_must_trust_it_alike(pki: badcerts.Pki) -> None:
    up = "https://reg.example.com:5443"
    message = config_error(two({"registry": up, "remote": "x"}, {"registry": up, "remote": "y", "tls_verify": False}))
    assert message.startswith(
        "proxies.b/.tls_verify: trusts https://reg.example.com:5443 differently from proxies.a/ (default store)"
    )
    message = config_error(
        two({"registry": up, "remote": "x", "ca_file": str(pki.ca_cert)}, {"registry": up, "remote": "y"})
    )
    assert message.startswith(
        "proxies.b/ (default store): trusts https://reg.example.com:5443 differently from proxies.a/.ca_file"
    )


def test_inherited_ca_file_is_named_as_such(pki: badcerts.Pki, other_ca: Path) -> None:
    up = "https://reg.example.com"
    data = two({"registry": up, "remote": "x"}, {"registry": up, "remote": "y", "ca_file": str(other_ca)})
    data["ca_file"] = str(pki.ca_cert)
    message = config_error(data)
    assert message.startswith(
        "proxies.b/.ca_file: trusts https://reg.example.com differently from proxies.a/ (top-level ca_file)"
    )


def test_docker_hub_aliases_are_one_upstream(pki: badcerts.Pki) -> None:
    data = two(
        {"registry": "docker.io", "remote": "x"}, {"registry": "index.docker.io", "remote": "y", "tls_verify": False}
    )
    assert "https://registry-1.docker.io differently" in config_error(data)


def test_same_certificates_from_two_paths_agree(pki: badcerts.Pki, tmp_path: Path) -> None:
    copy = tmp_path / "copy.pem"
    copy.write_bytes(pki.ca_cert.read_bytes())
    up = "https://reg.example.com"
    data = two(
        {"registry": up, "remote": "x", "ca_file": str(pki.ca_cert)},
        {"registry": up, "remote": "y", "ca_file": str(copy)},
    )
    a, b = parse(data, {}).mappings
    assert a.trust.same_as(b.trust)


def test_other_ports_and_plain_http_are_other_upstreams() -> None:
    data = two(
        {"registry": "https://r.example.com", "remote": "x"},
        {"registry": "https://r.example.com:5443", "remote": "y", "tls_verify": False},
    )
    parse(data, {})
    data = two(
        {"registry": "https://r.example.com", "remote": "x", "tls_verify": False},
        {"registry": "http://r.example.com", "remote": "y"},
    )
    parse(data, {})


def test_conflict_errors_hide_capability_keys(pki: badcerts.Pki) -> None:
    up = "https://reg.example.com"
    data = base(
        proxies={
            f"{UUID}/app": {"registry": up, "remote": "x"},
            "b/": {"registry": up, "remote": "y", "tls_verify": False},
        }
    )
    message = config_error(data)
    data = base(
        proxies={
            "b/": {"registry": up, "remote": "y", "tls_verify": False},
            f"{UUID}/app": {"registry": up, "remote": "x"},
        }
    )
    message += config_error(data)
    assert UUID not in message and "<capability>" in message


def test_trust_does_not_change_a_mappings_identity(pki: badcerts.Pki) -> None:
    """Tokens survive a reload that only changes how the upstream is verified."""
    plain = parse(with_mapping(registry="https://r.example.com", remote="x"), {}).mappings[0]
    with_ca = parse(with_mapping(registry="https://r.example.com", remote="x", ca_file=str(pki.ca_cert)), {}).mappings[
        0
    ]
    assert plain.identity == with_ca.identity and plain != with_ca


def test_bad_system_store_variable_is_refused(tmp_path: Path) -> None:
    assert config_error(base(), {"SSL_CERT_FILE": str(tmp_path / "gone.pem")}).startswith("SSL_CERT_FILE: ")


# --- egress (forward proxy from the environment) ---


def test_egress_is_read_from_the_environment() -> None:
    config = parse(base(), {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "internal.example"})
    assert config.egress == Egress(ProxySpec("http", "proxy.corp", 3128), None, ("internal.example",))
    assert parse(base(), {}).egress == Egress()


def test_bad_egress_variable_is_refused_without_its_credentials() -> None:
    message = config_error(base(), {"https_proxy": "socks5://robot:hunter2@proxy:1080"})
    assert message.startswith("https_proxy: SOCKS proxies are not supported")
    assert "hunter2" not in message


def test_token_realms_are_origins_normalised() -> None:
    from regproxy.config import loads

    config = loads(
        'proxies:\n  "a/":\n    registry: https://reg.corp.example\n'
        "    token_realms: [https://10.0.0.7, 'HTTP://Auth.Corp.Example:8080/', https://10.0.0.7:443]\n",
        environ={},
    )
    assert config.mappings[0].token_realms == ("https://10.0.0.7:443", "http://auth.corp.example:8080")


@pytest.mark.parametrize("realms", ["https://10.0.0.7/token", "ftp://x", "https://u:p@x", "x", "'https://x/?y=1'", "7"])
def test_token_realms_refuse_what_is_not_an_origin(realms: str) -> None:
    from regproxy.config import ConfigError, loads

    with pytest.raises(ConfigError, match=r"proxies\.a/\.token_realms"):
        loads(f'proxies:\n  "a/":\n    registry: https://reg.corp.example\n    token_realms: [{realms}]\n', environ={})


# --- cache ---


def test_no_cache_by_default_and_every_mapping_cached_when_set() -> None:
    config = parse(base(), {})
    assert config.cache is None and config.mappings[0].cache is True
    config = parse(base(cache={"store": "cache", "max_size": "1GB"}), {}, base_dir="/etc/rp")
    assert config.cache is not None and config.cache.path == Path("/etc/rp/cache")
    assert config.cache.max_size == 10**9


def test_a_mapping_opts_out_of_the_cache() -> None:
    data = with_mapping(registry="ghcr.io", remote="org", cache=False)
    data["cache"] = {"store": "/var/cache/rp"}
    assert parse(data, {}).mappings[0].cache is False
    assert parse(with_mapping(registry="ghcr.io", remote="org", cache=True), {}).mappings[0].cache is True


@pytest.mark.parametrize("value", ["no", 0, None, "false", []])
def test_a_mapping_cache_must_be_a_bool(value: object) -> None:
    message = config_error(with_mapping(registry="ghcr.io", remote="org", cache=value))
    assert message.startswith("proxies.bp/.cache: must be true or false")


def test_cache_section_errors_are_config_errors() -> None:
    assert config_error(base(cache={"store": "/c", "max_size": "1KB"})).startswith("cache.max_size: ")
    message = config_error(
        base(
            cache={
                "store": "s3://bucket",
                "s3": {"access_key_id_env": "KEY_ID", "secret_access_key_env": "SECRET_KEY"},
            }
        ),
        {"KEY_ID": "AKIAIOSFODNN7EXAMPLE"},
    )
    assert message == "cache.s3.secret_access_key_env: environment variable SECRET_KEY is not set or empty"
    assert "AKIAIOSFODNN7EXAMPLE" not in message


# --- policy (allow, deny, digests) ---


def test_a_policy_is_parsed_onto_the_mapping() -> None:
    cfg = parse(with_mapping("hub/", registry="docker.io", allow=["library/*", "grafana/**:v*"], deny=["x"]), {})
    policy = cfg.mappings[0].policy
    assert policy.allow is not None and [p.text for p in policy.allow] == ["library/*", "grafana/**:v*"]
    assert [p.text for p in policy.deny] == ["x"] and not policy.digests_resolved
    assert parse(base(), {}).mappings[0].policy.restricts is False


def test_a_bad_pattern_is_one_line_naming_it() -> None:
    message = config_error(with_mapping("hub/", registry="docker.io", deny=["library/*", "Library/x"]))
    assert message.startswith("proxies.hub/.deny: 'Library/x'")
    assert "must be a list" in config_error(with_mapping("hub/", registry="docker.io", allow="library/*"))


def test_a_policy_is_refused_on_exact_and_capability_mappings() -> None:
    assert "only a namespace mapping" in config_error(
        with_mapping("bp/true", registry="docker.io", remote="x", deny=["a"])
    )
    message = config_error(with_mapping(f"{UUID}/", registry="docker.io", allow=["a"]))
    assert "only a namespace mapping" in message and UUID not in message


def test_digests_resolved_needs_the_cache(tmp_path: Path) -> None:
    no_cache = with_mapping("hub/", registry="docker.io", digests="resolved")
    assert "digests: resolved needs the cache" in config_error(no_cache)
    cached = {**no_cache, "cache": {"store": str(tmp_path)}}
    assert parse(cached, {}).mappings[0].policy.digests_resolved
    opted_out = {
        **with_mapping("hub/", registry="docker.io", digests="resolved", cache=False),
        "cache": cached["cache"],
    }
    assert "needs the cache" in config_error(opted_out)
    assert "must be resolved or any" in config_error(with_mapping("hub/", registry="docker.io", digests="all"))
