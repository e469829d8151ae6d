"""The registry protocol (OCI distribution spec): names and routes, the JSON error format, token scopes
and WWW-Authenticate challenges. Pure: no mitmproxy import.
"""
