"""Rate limits and the bandwidth breaker: settings, bucket arithmetic, the stores (memory, Redis) and who
the client is. Pure: no mitmproxy import.
"""
