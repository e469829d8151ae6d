"""registryproxy: a reverse proxy for Docker/OCI registries, built as a mitmproxy addon.

`chain` declares the addon chain in order; each step is a module of `steps`. The steps share one
flow's state and the proxy's own answers (`flow`), and reach mitmproxy's internals only through
`mitm`. The logic beneath them is pure, with no mitmproxy import: `protocol`, `config`, `mapping`,
`transport`, `upstream`, `tokens`, `limits`, `ops`. `debug` serves a person reading a pull in
mitmweb, `run` starts the proxy, `demo` shows it. `addon/registryproxy.py` is the entry script.
"""
