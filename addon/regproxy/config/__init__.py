"""The configuration: what the rest of the proxy imports about it, from one place.

`load` reads the YAML file's top level (listen address, keys, public URL, lifetimes, default trust,
limits); `model` is what it returns; `mappings` reads the `proxies:` entries and the checks across
them; `registry` reads how each mapping reaches its upstream (address, credentials, trust).
Validation is strict: any problem raises `ConfigError` with one line that names the key and never
echoes a secret. Pure: no mitmproxy import.
"""

from .load import SECRET_KEY_ENV, SECRET_KEY_FILE_ENV, load_file, loads, parse, parse_secret_key
from .mappings import MAPPING_KEYS
from .model import (
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_API_HOST,
    DOCKER_HUB_NS,
    ROOT_KEY,
    Config,
    ConfigError,
    Mapping,
    Upstream,
)
from .registry import mirror_host, parse_registry, realm_origin

__all__ = [
    "DOCKER_HUB_ALIASES",
    "DOCKER_HUB_API_HOST",
    "DOCKER_HUB_NS",
    "MAPPING_KEYS",
    "ROOT_KEY",
    "SECRET_KEY_ENV",
    "SECRET_KEY_FILE_ENV",
    "Config",
    "ConfigError",
    "Mapping",
    "Upstream",
    "load_file",
    "loads",
    "mirror_host",
    "parse",
    "parse_registry",
    "parse_secret_key",
    "realm_origin",
]
