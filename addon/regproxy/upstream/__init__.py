"""The upstream registry: the client that asks it, and what its authentication answers mean. Pure: no
mitmproxy import.
"""
