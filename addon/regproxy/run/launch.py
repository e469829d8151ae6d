"""How a proxy process is started: the mitmproxy arguments that make it registryproxy, and a port for it.

`./run.sh` (run/cli.py), its worker supervisor (run/workers.py) and the demo all start mitmdump, mitmweb or
the lean master (run/serve.py) with the same arguments; they take them from here, so none of them needs
another's module to start a proxy. `new_capability` is the key of a capability mapping to give a new
proxy (`./run.sh capability`, the demo).
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

ADDON_DIR = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def mitm_args(config_path: str, listen_addr: str, port: int, script: bool = True) -> list[str]:
    """The mitmproxy arguments that make it registryproxy, listening where the config says.

    `script` loads the addon with `-s` (stock mitmdump/mitmweb); the lean master has it built in.
    """
    listen = f"[{listen_addr}]:{port}" if ":" in listen_addr else f"{listen_addr}:{port}"
    return [
        *(["-s", str(ADDON_DIR / "registryproxy.py")] if script else []),
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


def free_port() -> int:
    """A loopback port nothing listens on right now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def new_capability() -> str:
    """128 bits from a CSPRNG, written in the familiar 8-4-4-4-12 hex form."""
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
