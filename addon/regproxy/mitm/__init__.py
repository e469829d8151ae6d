"""The one seam into mitmproxy's internals: every patch, copied function and private attribute of mitmproxy
(and of pyOpenSSL) the proxy relies on lives here, and `compat` checks all of them, and the tested mitmproxy
range, before the chain is imported (regproxy.run.preflight) and again before any patch is installed.
"""
