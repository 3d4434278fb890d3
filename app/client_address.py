"""Who is on the other end of a request: the peer, or the client a trusted proxy says it forwarded for.

X-Forwarded-For is a list anyone can write; only the entries our own proxies appended can be believed. As uvicorn's
ProxyHeadersMiddleware (uvicorn/middleware/proxy_headers.py, 0.30) and werkzeug's ProxyFix do, the list is read
from the right: past every address of RETRO_TRUSTED_PROXIES, the first one that is not a trusted proxy is the
client. With no trusted proxies (the default) the header is ignored. `retrotest serve` turns uvicorn's own proxy
handling off, which would otherwise trust 127.0.0.1 (its forwarded_allow_ips default).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """Addresses and CIDRs (10.0.0.0/8, 127.0.0.1, ::1) as networks; ValueError names a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"RETRO_TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR network") from exc
    return networks


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(host: str, trusted: list[Network]) -> bool:
    address = _address(host)
    return address is not None and any(address in network for network in trusted)


def client_host(*, peer: str, forwarded_for: str | None, trusted: list[Network]) -> str:
    """The client's address: the peer unless it is a trusted proxy, else the rightmost untrusted forwarded hop."""
    if not trusted or not forwarded_for or not _trusted(peer, trusted):
        return peer
    nearest = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if _address(hop) is None:
            return nearest  # not an address: whatever is further left is not worth believing either
        if not _trusted(hop, trusted):
            return hop
        nearest = hop
    return nearest  # every hop a trusted proxy: the leftmost is as far as we can tell


class TrustedProxies:
    """ASGI middleware: scope["client"] becomes the address client_host finds, so every reader sees one answer."""

    def __init__(self, app: ASGIApp, *, trusted: list[str]) -> None:
        self.app = app
        self.trusted = parse_networks(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted and scope.get("client"):
            peer = scope["client"][0]
            forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1")
            host = client_host(peer=peer, forwarded_for=forwarded, trusted=self.trusted)
            if host != peer:
                scope = {**scope, "client": (host, 0)}
        await self.app(scope, receive, send)
