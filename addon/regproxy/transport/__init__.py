"""How the proxy's own connections to upstreams are made: trust (certificate authorities), egress (a
forward proxy), the connection pool, and the pooled streams lent to mitmproxy's upstream connections.
Pure: no mitmproxy import.
"""
