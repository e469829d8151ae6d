"""The proxy's own tokens: the PASETO codec and the issuer behind the token endpoint. Pure: no mitmproxy
import.
"""
