"""Local names and upstream names: which mapping serves a repository, and the upstream's answers said in
the proxy's names. Pure: no mitmproxy import.
"""
