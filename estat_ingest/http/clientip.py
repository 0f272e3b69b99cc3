"""Client IP behind proxies, without trusting what the client can forge (v1 defect §9 l).

The TCP peer is the only address nobody can forge. Rules, in order:

1. The peer is not a trusted proxy (TRUSTED_PROXIES; default private ranges and loopback, so an
   ALB in a VPC is trusted) → the peer is the client. Its headers are ignored.
2. The peer is trusted → walk X-Forwarded-For (every header line, joined) from the RIGHT: each
   proxy appends the address it saw, so the rightmost entries were written by our own proxies and
   the leftmost by whoever connected first — possibly the attacker. The first address that is
   not a trusted proxy is the client. An unparsable entry (or more than MAX_HOPS entries) stops
   the walk and the last address we could trust is recorded; it is never an address a client
   wrote.
3. `CloudFront-Viewer-Address` is used only when the walk met no untrusted hop at all — then
   every hop that could have set or passed on the header is trusted. As soon as one untrusted
   address is on the path, that hop could have forged it, so the header is ignored.

ALB + CloudFront: the ALB (trusted, private) sees CloudFront edge addresses, which are public.
Put CloudFront's origin-facing ranges in TRUSTED_PROXIES: the walk then skips the edge and stops
at the viewer address that CloudFront appended. Without them, the recorded ip is the edge
address — wrong, but never forgeable. A client that reaches the ALB directly and sends
`CloudFront-Viewer-Address` or a forged X-Forwarded-For gets its own address recorded: the ALB
appended it, and it is untrusted. See docs/security.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HOPS = 32  # X-Forwarded-For entries examined; real chains have a handful


@lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress | None:
    """An address from `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`, `::ffff:1.2.3.4` (→ 1.2.3.4)."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            return None
        s = s[1:end]
    elif s.count(":") == 1:  # v4:port
        s = s.split(":", 1)[0]
    if not s or len(s) > 64:
        return None
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id:
            return ipaddress.IPv6Address(s.split("%", 1)[0])
    return addr


def parse_cloudfront(text: str) -> IPAddress | None:
    """`198.51.100.10:46532` or `2001:db8::1:46532`: the port follows the LAST colon."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return addr.ipv4_mapped or addr
    return parse_ip(host)


class ClientIp:
    def __init__(self, trusted_cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_cidrs)
        self.trusted = lru_cache(maxsize=8192)(self._trusted)
        # whole decisions keyed by the header strings (their hashes are cached by str): the hot
        # path is one dict lookup (`lookup`, which /collect calls directly; calling the ClientIp is
        # the same); a client varying its headers only churns a bounded cache
        self.lookup = lru_cache(maxsize=16384)(self.resolve)

    def _trusted(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)

    def __call__(self, peer: str | None, xff: str | None = None, cloudfront: str | None = None) -> str:
        return self.lookup(peer, xff, cloudfront)

    def resolve(self, peer: str | None, xff: str | None = None, cloudfront: str | None = None) -> str:
        peer_addr = parse_ip(peer) if peer else None
        if peer_addr is None:
            return ""
        if not self.trusted(peer_addr):
            return str(peer_addr)
        best = peer_addr
        if xff:
            parts = xff.split(",")
            for n, part in enumerate(reversed(parts)):
                addr = parse_ip(part) if n < MAX_HOPS else None
                if addr is None:
                    return str(best)  # stop: a hop we trust wrote something we cannot read
                if not self.trusted(addr):
                    return str(addr)
                best = addr
        if cloudfront:
            # no untrusted hop on the path: whoever set the header is one of ours
            cf = parse_cloudfront(cloudfront)
            if cf is not None:
                return str(cf)
        return str(best)
