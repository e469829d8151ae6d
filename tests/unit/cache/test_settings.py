"""The `cache:` section (cache/settings.py): every key good and bad, one line naming the key, no secret in
any message; `limits.settings.parse_size`/`parse_duration`, which it shares with `limits:`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from regproxy.cache.settings import CacheSettings, CacheSettingsError, S3Settings, parse_cache
from regproxy.limits.settings import LimitsError, parse_duration, parse_size

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
ENV = {"CACHE_S3_KEY_ID": KEY_ID, "CACHE_S3_SECRET": SECRET, "EMPTY": ""}


def error(raw: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(CacheSettingsError) as info:
        parse_cache(raw, ENV if environ is None else environ, Path("/etc/rp"))
    message = str(info.value)
    assert "\n" not in message and SECRET not in message and KEY_ID not in message
    return message


def s3(**keys: Any) -> dict[str, Any]:
    return {"store": "s3://cache/rp", "s3": keys}


def test_absent_is_no_cache() -> None:
    assert parse_cache(None, {}, None) is None


def test_a_directory_with_the_defaults() -> None:
    c = parse_cache({"store": "/var/cache/registryproxy"}, {}, None)
    assert c == CacheSettings(store="/var/cache/registryproxy", path=Path("/var/cache/registryproxy"))
    assert (c.max_size, c.tag_ttl, c.stale_if_error, c.s3) == (50 * 1000**3, 0.0, 7 * 86400.0, None)


def test_a_relative_directory_is_relative_to_the_config_file() -> None:
    c = parse_cache({"store": "cache"}, {}, Path("/etc/rp"))
    assert c is not None and c.path == Path("/etc/rp/cache") and c.store == "cache"
    c = parse_cache({"store": "cache"}, {}, None)
    assert c is not None and c.path == Path("cache")


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        ("yes", "cache: must be a mapping"),
        ([1], "cache: must be a mapping"),
        ({}, "cache.store: missing"),
        ({"store": ""}, "cache.store: must be"),
        ({"store": 5}, "cache.store: must be"),
        ({"store": "/a\nb"}, "cache.store: must be"),
        ({"store": "gs://bucket/x"}, "cache.store: only s3://"),
        ({"store": "/c", "size": "1GB"}, "cache.size: unknown key (known: store, max_size, tag_ttl,"),
        ({"store": "/c", "s3": {}}, "cache.s3: only with an s3:// store"),
    ],
)
def test_bad_sections(raw: Any, start: str) -> None:
    assert error(raw).startswith(start)


@pytest.mark.parametrize(
    ("value", "size"), [("50GB", 50 * 1000**3), ("500MiB", 500 * 1024**2), ("1MB", 1000**2), ("1.5gib", 3 << 29)]
)
def test_max_size(value: str, size: int) -> None:
    c = parse_cache({"store": "/c", "max_size": value}, {}, None)
    assert c is not None and c.max_size == size


@pytest.mark.parametrize("value", ["999KB", "0", 1000, "lots", "5 parsecs", True, None, "-1GB"])
def test_bad_max_size(value: object) -> None:
    assert error({"store": "/c", "max_size": value}).startswith("cache.max_size: ")


@pytest.mark.parametrize("key", ["tag_ttl", "stale_if_error"])
@pytest.mark.parametrize(("value", "seconds"), [("0s", 0), ("5m", 300), ("6h", 21600), ("7d", 604800), (90, 90)])
def test_durations(key: str, value: object, seconds: int) -> None:
    c = parse_cache({"store": "/c", key: value}, {}, None)
    assert c is not None and getattr(c, key) == float(seconds)


@pytest.mark.parametrize("key", ["tag_ttl", "stale_if_error"])
@pytest.mark.parametrize("value", ["5", "5w", "1.5h", "-1s", True, None, [], "400d"])
def test_bad_durations(key: str, value: object) -> None:
    assert error({"store": "/c", key: value}).startswith(f"cache.{key}: ")


@pytest.mark.parametrize(
    ("store", "bucket", "prefix"),
    [
        ("s3://cache", "cache", ""),
        ("s3://cache/", "cache", ""),
        ("s3://my.cache-1/rp", "my.cache-1", "rp/"),
        ("s3://abc/a/b/", "abc", "a/b/"),
        ("S3://abc/x", "abc", "x/"),
    ],
)
def test_s3_store_urls(store: str, bucket: str, prefix: str) -> None:
    c = parse_cache({"store": store}, {}, None)
    assert c is not None and c.path is None and c.s3 == S3Settings(bucket=bucket, prefix=prefix)


@pytest.mark.parametrize(
    "store",
    [
        "s3://",
        "s3:///prefix",
        "s3://ab",
        "s3://" + "a" * 64,
        "s3://Upper",
        "s3://under_score",
        "s3://-abc",
        "s3://abc-",
        "s3://a..b",
        "s3://a.-b",
        "s3://192.168.1.1",
        "s3://xn--abc",
        "s3://sthree-abc",
        "s3://abc-s3alias",
        "s3://abc--ol-s3",
    ],
)
def test_bad_bucket_names(store: str) -> None:
    assert error({"store": store}).startswith("cache.store: ")


@pytest.mark.parametrize("store", ["s3://abc//x", "s3://abc/a//b", "s3://abc/../x", "s3://abc/a b", "s3://abc/./x"])
def test_bad_prefixes(store: str) -> None:
    assert error({"store": store}).startswith("cache.store: the prefix")


def test_every_s3_key() -> None:
    c = parse_cache(
        s3(
            endpoint_url="https://s3.example.com:8443/",
            region="eu-west-1",
            access_key_id_env="CACHE_S3_KEY_ID",
            secret_access_key_env="CACHE_S3_SECRET",
            redirect=True,
            url_expiry="1h",
        ),
        ENV,
        None,
    )
    assert c is not None and c.s3 == S3Settings(
        bucket="cache",
        prefix="rp/",
        endpoint_url="https://s3.example.com:8443",
        region="eu-west-1",
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        redirect=True,
        url_expiry=3600,
    )
    assert SECRET not in repr(c) and KEY_ID not in repr(c)
    d = parse_cache(s3(), {}, None)
    assert d is not None and d.s3 == S3Settings(bucket="cache", prefix="rp/", redirect=False, url_expiry=600)


@pytest.mark.parametrize(
    ("keys", "start"),
    [
        ({"endpoint": "x"}, "cache.s3.endpoint: unknown key (known: endpoint_url, region,"),
        ({"endpoint_url": "s3.example.com"}, "cache.s3.endpoint_url: must be an http(s) URL"),
        ({"endpoint_url": "ftp://s3.example.com"}, "cache.s3.endpoint_url: must be an http(s) URL"),
        ({"endpoint_url": "https://s3.example.com?x=1"}, "cache.s3.endpoint_url: must be an http(s) URL"),
        ({"endpoint_url": "https://s3.example.com:99999"}, "cache.s3.endpoint_url: has an invalid port"),
        ({"endpoint_url": 5}, "cache.s3.endpoint_url: must be"),
        ({"region": "US East"}, "cache.s3.region: "),
        ({"region": 1}, "cache.s3.region: "),
        ({"redirect": "yes"}, "cache.s3.redirect: must be true or false"),
        ({"url_expiry": "0s"}, "cache.s3.url_expiry: must be from 1s to 7d"),
        ({"url_expiry": "8d"}, "cache.s3.url_expiry: must be from"),
        ({"url_expiry": "soon"}, "cache.s3.url_expiry: must be a duration"),
        ({"access_key_id_env": "CACHE_S3_KEY_ID"}, "cache.s3.access_key_id_env: needs secret_access_key_env"),
        ({"secret_access_key_env": "CACHE_S3_SECRET"}, "cache.s3.secret_access_key_env: needs access_key_id_env"),
        (
            {"access_key_id_env": "NOPE", "secret_access_key_env": "CACHE_S3_SECRET"},
            "cache.s3.access_key_id_env: environment variable NOPE is not set or empty",
        ),
        (
            {"access_key_id_env": "CACHE_S3_KEY_ID", "secret_access_key_env": "EMPTY"},
            "cache.s3.secret_access_key_env: environment variable EMPTY is not set or empty",
        ),
        (
            {"access_key_id_env": "CACHE_S3_KEY_ID", "secret_access_key_env": SECRET},
            "cache.s3.secret_access_key_env: must name an environment variable",
        ),
        (
            {"access_key_id_env": "CACHE_S3_KEY_ID", "secret_access_key_env": 7},
            "cache.s3.secret_access_key_env: must name an environment variable",
        ),
    ],
)
def test_bad_s3_keys(keys: dict[str, Any], start: str) -> None:
    assert error(s3(**keys)).startswith(start)


def test_bad_s3_section() -> None:
    assert error({"store": "s3://cache", "s3": "yes"}).startswith("cache.s3: must be a mapping")


def test_credentials_in_the_endpoint_are_refused_without_echo() -> None:
    message = error(s3(endpoint_url=f"https://{KEY_ID}:{SECRET}@s3.example.com"))
    assert message.startswith("cache.s3.endpoint_url: must not hold credentials")


def test_a_secret_given_as_a_value_is_never_echoed() -> None:
    # A value where a name goes: the message says the variable is unset, without showing what was written.
    message = error(s3(access_key_id_env=KEY_ID, secret_access_key_env="CACHE_S3_SECRET"))
    assert message.startswith("cache.s3.access_key_id_env: the environment variable it names is not set")
    message = error(s3(access_key_id_env="CACHE_S3_KEY_ID", secret_access_key_env="wJalrXUtnFEMIK7MDENG"))
    assert message.startswith("cache.s3.secret_access_key_env: the environment variable it names")
    assert "wJalrXUtnFEMIK7MDENG" not in message


@pytest.mark.parametrize(("value", "n"), [("50GB", 50 * 10**9), ("500MiB", 500 << 20), (1234, 1234), ("7b", 7)])
def test_parse_size(value: object, n: int) -> None:
    assert parse_size(value, "k") == n


@pytest.mark.parametrize("value", ["", "GB", "5 GQ", "-5", True, 1.5, -3])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(LimitsError, match="^k: "):
        parse_size(value, "k")


@pytest.mark.parametrize(("value", "n"), [("0s", 0), ("90s", 90), ("5m", 300), ("2h", 7200), ("7d", 604800), (3, 3)])
def test_parse_duration(value: object, n: int) -> None:
    assert parse_duration(value, "k") == n


@pytest.mark.parametrize("value", ["", "5", "m", "1.5m", "5w", True, -1, 2.5])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(LimitsError, match="^k: "):
        parse_duration(value, "k")
