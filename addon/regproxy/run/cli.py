"""Command line of ./run.sh: start mitmdump/mitmweb with the addon, make keys, capabilities and share links."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from ..config import ConfigError, load_file
from .launch import ADDON_DIR, mitm_args, new_capability
from .link_command import run_link
from .workers import run_workers

REPO = ADDON_DIR.parent
CONFIG_ENV = "REGISTRYPROXY_CONFIG"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--web", action="store_true", help="run under mitmweb")
    run.add_argument(
        "--stock", action="store_true", help="run under stock mitmdump (all default addons) instead of the lean master"
    )
    run.add_argument(
        "--workers", type=int, default=1, metavar="N", help="N proxy processes behind HAProxy (one per core)"
    )
    run.add_argument("extra", nargs=argparse.REMAINDER, help="further mitmproxy arguments")
    sub.add_parser("keygen", help="print a new secret key")
    sub.add_parser("capability", help="print a new capability prefix and config lines")
    link = sub.add_parser("link", help="mint a share link for a mapping: expiring, revocable (docs/links.md)")
    link.add_argument("key", metavar="KEY", help="the mapping's key in the configuration (bp/, <key>/nginx)")
    link.add_argument("--expires", required=True, metavar="DURATION", help="how long it works: 14d, 12h, 30m")
    link.add_argument("--note", metavar="TEXT", help="a note to keep with the link's id (printed, not stored)")
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
    if args.cmd == "link":
        return run_link(config_path, args.key, args.expires, args.note)
    try:
        config = load_file(config_path)
    except ConfigError as e:
        print(f"registryproxy: {e}", file=sys.stderr)
        return 1
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    bindir = Path(sys.executable).parent
    if args.web:
        argv_out = [str(bindir / "mitmweb"), *mitm_args(config_path, config.listen_addr, config.port)]
        os.execv(argv_out[0], [*argv_out, "--set", "web_open_browser=false", *extra])
    if args.stock:
        # Stock mitmdump: its own flow printing would repeat the addon's line per request.
        worker = [str(bindir / "mitmdump"), "--set", "flow_detail=0"]
    else:
        # The lean master (regproxy.run.serve): only the addons a reverse registry proxy needs; -O drops
        # mitmproxy's per-message debug type checks (the addon's asserts only narrow types).
        worker = [sys.executable, "-O", "-m", "regproxy.run.serve"]
    if args.workers > 1:
        return run_workers(args.workers, config, config_path, worker, extra, script=args.stock)
    if args.workers < 1:
        print("registryproxy: --workers must be at least 1", file=sys.stderr)
        return 2
    argv_out = [*worker, *mitm_args(config_path, config.listen_addr, config.port, script=args.stock), *extra]
    os.execv(argv_out[0], argv_out)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
