"""How the proxy's own connections to upstreams are made: trust (certificate authorities), egress (a
forward proxy) and the connection pool. Pure: no mitmproxy import.
"""
