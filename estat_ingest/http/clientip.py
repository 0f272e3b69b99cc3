"""Client IP behind proxies, without trusting what the client can forge (v1 defect §9 l).

The TCP peer is the only address nobody can forge. If the peer is a trusted proxy
(TRUSTED_PROXIES: by default private ranges and loopback, so an ALB in a VPC is trusted), walk
X-Forwarded-For from the RIGHT — each proxy appends the address it saw — and take the first
address that is not itself a trusted proxy. `CloudFront-Viewer-Address` is used only when the hop
that sent it is trusted. Anything unparsable stops the walk: the last address we trust wins.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> IPAddress | None:
    s = text.strip()
    if s.startswith("[") and "]" in s:  # [v6]:port
        s = s[1 : s.index("]")]
    elif s.count(":") == 1:  # v4:port
        s = s.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _parse_cloudfront(text: str) -> IPAddress | None:
    # "198.51.100.10:46532" or "2001:db8::1:46532": the port follows the LAST colon
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return _parse(host.strip("[]")) if ":" in host else _parse(host)


class ClientIp:
    def __init__(self, trusted_cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_cidrs)
        self.trusted = lru_cache(maxsize=4096)(self._trusted)

    def _trusted(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)

    def __call__(self, peer: str | None, xff: str | None = None, cloudfront: str | None = None) -> str:
        peer_addr = _parse(peer) if peer else None
        if peer_addr is None:
            return ""
        if not self.trusted(peer_addr):
            return str(peer_addr)
        best = peer_addr
        if xff:
            for part in reversed(xff.split(",")):
                addr = _parse(part)
                if addr is None:
                    break
                best = addr
                if not self.trusted(addr):
                    return str(addr)
        if cloudfront and self.trusted(best):
            # every hop so far is ours, so the header was set by (or passed through) a trusted hop
            cf = _parse_cloudfront(cloudfront)
            if cf is not None:
                return str(cf)
        return str(best)
