"""Command line of ./run.sh: start mitmdump/mitmweb with the addon, make keys and capabilities."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from .config import ConfigError, load_file

ADDON_DIR = Path(__file__).resolve().parent.parent
REPO = ADDON_DIR.parent
CONFIG_ENV = "REGISTRYPROXY_CONFIG"


def mitm_args(config_path: str, listen_addr: str, port: int) -> list[str]:
    """The mitmproxy arguments that make it registryproxy, listening where the config says."""
    listen = f"[{listen_addr}]:{port}" if ":" in listen_addr else f"{listen_addr}:{port}"
    return [
        "-s",
        str(ADDON_DIR / "registryproxy.py"),
        # Reverse mode to a dead default target: the addon routes every request itself.
        "--mode",
        f"reverse:http://127.0.0.1:9@{listen}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "keep_host_header=true",
        "--set",
        f"registryproxy_config={config_path}",
    ]


def new_capability() -> str:
    """128 bits from a CSPRNG, written in the familiar 8-4-4-4-12 hex form."""
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--web", action="store_true", help="run under mitmweb")
    run.add_argument("extra", nargs=argparse.REMAINDER, help="further mitmproxy arguments")
    sub.add_parser("keygen", help="print a new secret key")
    sub.add_parser("capability", help="print a new capability prefix and config lines")
    args = parser.parse_args(argv)

    if args.cmd == "keygen":
        print(secrets.token_hex(32))
        return 0
    if args.cmd == "capability":
        cap = new_capability()
        print(cap)
        print(
            "\n# Add to config.yaml (the key is the secret: share the image as <your domain>/"
            f"{cap}/app):\n"
            "proxies:\n"
            f'  "{cap}/app":\n'
            "    registry: ghcr.io\n"
            "    remote: owner/repository\n"
            "    username: robot\n"
            "    password_env: REGISTRYPROXY_GHCR_TOKEN"
        )
        return 0

    config_path = os.environ.get(CONFIG_ENV) or str(REPO / "config.yaml")
    try:
        config = load_file(config_path)
    except ConfigError as e:
        print(f"registryproxy: {e}", file=sys.stderr)
        return 1
    extra = [a for a in args.extra if a != "--"] if args.extra[:1] == ["--"] else args.extra
    if args.extra[:1] == ["--"]:
        extra = args.extra[1:]
    tool = "mitmweb" if args.web else "mitmdump"
    argv_out = [str(Path(sys.executable).parent / tool), *mitm_args(config_path, config.listen_addr, config.port)]
    if not args.web:
        # The addon logs one line per request; mitmdump's own flow printing would repeat it.
        argv_out += ["--set", "flow_detail=0"]
    else:
        argv_out += ["--set", "web_open_browser=false"]
    argv_out += extra
    os.execv(argv_out[0], argv_out)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
