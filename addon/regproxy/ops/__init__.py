"""Operations: Prometheus metrics and the listener of their own for `/healthz`, `/readyz`, `/metrics`.
Pure: no mitmproxy import.
"""
