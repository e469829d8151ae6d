"""Who the client is: its address, or the address a trusted front end reports.

`X-Forwarded-For` and `Forwarded` (RFC 7239) are believed only from a peer in `trusted_proxies`,
and only as far as the chain of trusted hops goes: walking the list from the right (the hop
nearest to the proxy), the first address that is not a trusted proxy is the client. A malformed
or obfuscated entry ends the walk at the last address known. `Forwarded` wins when both are sent.
IPv6 clients are counted by their /64 (one host usually holds a whole /64 to rotate through);
IPv4-mapped IPv6 addresses are IPv4. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .settings import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str | None) -> Address | None:
    """An address as a peer or a forwarding header names it (`[v6]:port` and `v4:port` accepted)."""
    if not text:
        return None
    value = text.strip().strip('"')
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forwarded_for(values: Sequence[str]) -> list[str]:
    """The `for=` of each element of `Forwarded` header lines, in order (`""` for an element without)."""
    hops: list[str] = []
    for line in values:
        for element in line.split(","):
            found = ""
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    found = value.strip()
            hops.append(found)
    return hops


def x_forwarded_for(values: Sequence[str]) -> list[str]:
    return [hop.strip() for line in values for hop in line.split(",")]


def client_address(
    peer: str | None, forwarded: Sequence[str], xff: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's address: the peer's, or from a trusted peer the first untrusted forwarded hop."""
    addr = parse_ip(peer)
    if addr is None or not _trusted(addr, trusted):
        return addr
    hops = forwarded_for(forwarded) if forwarded else x_forwarded_for(xff)
    for hop in reversed(hops):
        ip = parse_ip(hop)
        if ip is None:
            return addr
        addr = ip
        if not _trusted(ip, trusted):
            return ip
    return addr


def client_key(addr: Address | None) -> str:
    """The name a client's budgets are kept under: an IPv4 address, an IPv6 /64, or `unknown`."""
    if addr is None:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _trusted(ip: Address, trusted: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)
