"""The one seam into mitmproxy's internals: every patch, copied function and private attribute the proxy
relies on lives here, checked against the tested mitmproxy range when the chain loads.
"""
