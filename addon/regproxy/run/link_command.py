"""`./run.sh link KEY --expires DURATION [--note TEXT]`: mint a share link for a mapping (links/).

It reads the configuration the proxy would (`$REGISTRYPROXY_CONFIG`, else config.yaml) for the secret key
(or `$REGISTRYPROXY_SECRETKEY` / `$REGISTRYPROXY_SECRETKEY_FILE`), the mapping's key, `link_max_age` and
`public_url`, and nothing else (`config.load.link_settings`: no credential of the proxy's environment is
needed); it writes nothing and keeps no list: the link is good on every replica that shares the key. Every
refusal is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import ROOT_KEY, ConfigError
from ..config.load import LinkSettings, link_settings
from ..config.model import show_key
from ..limits.settings import format_duration
from ..links import DurationError, mint, parse_duration
from ..links.book import utc
from ..protocol.names import looks_like_capability

EXIT_REFUSED = 2


class LinkRefused(Exception):
    """Why no link was minted: one line for stderr."""


@dataclass(frozen=True)
class Minted:
    link: str
    id: str
    expires_at: int
    reference: str  # what a client pulls: HOST/LINK/<repository> or HOST/LINK/<name>


def mint_link(config: LinkSettings, key: str, expires: str, clock: Callable[[], float] = time.time) -> Minted:
    """A new link for the mapping `key`, good for `expires`. Raises `LinkRefused`."""
    if config.generated_key:
        raise LinkRefused(
            "link: no secret key configured (secretkey in the config file, or $REGISTRYPROXY_SECRETKEY): "
            "a link is sealed with it"
        )
    if key not in config.mapping_keys:
        raise LinkRefused(f"link: {show_key(key)} is not a mapping key of the configuration (bp/, <key>/nginx, *)")
    if not _namespace(key) and looks_like_capability(key.rsplit("/", 1)[-1]):
        raise LinkRefused(f"link: {show_key(key)}: its last segment is secret, and a link's name would show it")
    try:
        seconds = parse_duration(expires, "--expires")
    except DurationError as e:
        raise LinkRefused(f"link: {e}") from None
    if seconds > config.link_max_age:
        raise LinkRefused(
            f"link: --expires {format_duration(seconds)} is over link_max_age ({format_duration(config.link_max_age)})"
        )
    link, made = mint(config.secretkeys[0], key, int(clock()) + seconds)
    return Minted(link, made.id, made.expires_at, f"{_host(config)}/{_name(key, link)}")


def _namespace(key: str) -> bool:
    return key == ROOT_KEY or key.endswith("/")


def _name(key: str, link: str) -> str:
    """The name a client pulls: below the link for a namespace, the key's last segment for a repository."""
    if _namespace(key):
        return f"{link}/<repository>"
    return f"{link}/{key.rsplit('/', 1)[-1]}"


def _host(config: LinkSettings) -> str:
    return urlsplit(config.public_url).netloc if config.public_url else "<proxy host>"


def run_link(config_path: str, key: str, expires: str, note: str | None) -> int:
    """The command: print the link, its id, expiry and a pull command; or one line and exit code 2."""
    try:
        minted = mint_link(link_settings(config_path), key, expires)
    except ConfigError as e:
        print(f"link: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except LinkRefused as e:
        print(e, file=sys.stderr)
        return EXIT_REFUSED
    print(f"link:    {minted.link}")
    print(f"id:      {minted.id}")
    print(f"expires: {utc(minted.expires_at)}")
    if note:
        print(f"note:    {note}")
    print(f"pull:    docker pull {minted.reference}:<tag>")
    print(
        f"# The link is the secret: send it like a password. To revoke it, add {minted.id} to revoked_links"
        + (f"  # {note}" if note else "")
    )
    return 0
