"""Rate limits and the bandwidth breaker: settings, bucket arithmetic, the stores (memory, Redis) and the
keeper that opens, replaces and closes them, the checks admitting a request asks for, and who the client
is. Pure: no mitmproxy import.
"""
