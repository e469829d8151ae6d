"""The client-matrix proxy configuration: every upstream kind through a namespace and a capability.

For upstream kind K (anonymous, basic, token, redirect):
- namespace `NS[K]/` -> upstream `platform/` (so `NS[K]/app:v1` is `platform/app:v1`);
- capability `CAPS[K]/app` -> upstream `platform/app` (with the upstream's credentials, which only
  the proxy has: a client pulls it with no credentials at all).
"""

from __future__ import annotations

from typing import Any

from .registry import Upstream

SECRET_KEY = "4f" * 16 + "c3" * 16
NS = {"anonymous": "anon", "basic": "basic", "token": "tok", "redirect": "redir"}
CAPS = {
    "anonymous": "0a9f3c5e-7b21-4d8e-9c6a-1f2e3d4c5b6a",
    "basic": "1b8e4d6f-8c32-4e9f-8d7b-2a3f4e5d6c7b",
    "token": "2c7d5e8a-9d43-4fa0-9e8c-3b4a5f6e7d8c",
    "redirect": "3d6c6f9b-ae54-4ab1-8f9d-4c5b6a7f8e9d",
}


def _mapping(up: Upstream, remote: str) -> dict[str, Any]:
    m: dict[str, Any] = {"registry": up.url, "remote": remote}
    if up.username:
        m.update(username=up.username, password=up.password)
    return m


def matrix_config(upstreams: dict[str, Upstream], **extra: Any) -> dict[str, Any]:
    proxies: dict[str, Any] = {}
    for kind, up in upstreams.items():
        proxies[f"{NS[kind]}/"] = _mapping(up, "platform")
        proxies[f"{CAPS[kind]}/app"] = _mapping(up, "platform/app")
    return {"secretkey": SECRET_KEY, "proxies": proxies, **extra}


def local_name(kind: str, mapping: str) -> str:
    """The local repository of `platform/app` on upstream `kind` via "namespace" or "capability"."""
    return f"{NS[kind]}/app" if mapping == "namespace" else f"{CAPS[kind]}/app"
