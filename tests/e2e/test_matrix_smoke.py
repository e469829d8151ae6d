"""The shared client-matrix proxies answer over plain HTTP and over TLS with the test CA."""

from __future__ import annotations

import ssl

import httpx
import pytest
from rig import proxy, tls

pytestmark = pytest.mark.e2e


def test_matrix_proxy_over_http_and_tls(
    matrix_proxy: proxy.ProxyProc, matrix_tls_proxy: proxy.ProxyProc, test_ca: tls.TestCA
) -> None:
    r = httpx.get(f"{matrix_proxy.url}/v2/", timeout=10)
    assert r.status_code == 401 and 'realm="http://' in r.headers["www-authenticate"]
    ctx = ssl.create_default_context(cafile=str(test_ca.ca_cert))
    r = httpx.get(f"https://{matrix_tls_proxy.host}/v2/", verify=ctx, timeout=10)
    assert r.status_code == 401
    assert f'realm="https://{matrix_tls_proxy.host}/token"' in r.headers["www-authenticate"]
