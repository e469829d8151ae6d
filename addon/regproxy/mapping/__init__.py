"""Local names and upstream names: which mapping serves a repository, whether a client's token lets it
pull there, and the upstream's answers said in the proxy's names. Pure: no mitmproxy import.
"""
