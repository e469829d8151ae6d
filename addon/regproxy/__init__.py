"""registryproxy: a reverse proxy for Docker/OCI registries, built as a mitmproxy addon.

The package keeps the protocol logic in small modules without any mitmproxy import
(config, names, scopes, challenges, tokens, errors, redaction); `addon` is the thin
layer of mitmproxy hooks over them, and `addon/registryproxy.py` the entry script.
"""
