"""How many WebSockets this process holds, and how many of them one peer
address holds (issue 26): past ``CODEX_MAX_CONNECTIONS`` an upgrade is
refused with 503, past ``CODEX_MAX_CONNECTIONS_PER_PEER`` for its address
with 429, before any token or row is looked at. Upgrades still in progress
count, so a burst cannot slip past the check all at once.

A peer whose connection was closed for never saying who it is (initialize
refused again and again) is refused with 429 for COOL_OFF_SECONDS: each of
its reconnects cost an upgrade and two row writes, and a client doing that
in a loop took a fifth of the database thread from the others."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

from django.conf import settings

from codexserver.loop_local import LoopLocal

TOO_MANY_REQUESTS = 429
SERVICE_UNAVAILABLE = 503
COOL_OFF_SECONDS = 1.0
MAX_COOLING_PEERS = 100_000  # past this, the oldest cool-offs are forgotten early


class ConnectionLimits:
    def __init__(self) -> None:
        self.total = 0
        self.by_peer: Counter[str | None] = Counter()
        self.cooling: dict[str, float] = {}  # peer key → until when (monotonic), oldest first

    def admit(self, peer: str | None) -> int | None:
        """Count one more connection of ``peer``, or the status to refuse it with."""
        if self.total >= settings.CODEX_MAX_CONNECTIONS:
            return SERVICE_UNAVAILABLE
        per_peer, key = settings.CODEX_MAX_CONNECTIONS_PER_PEER, peer_key(peer)
        if per_peer and key is not None and self.by_peer[key] >= per_peer:
            return TOO_MANY_REQUESTS
        if key is not None and key in self.cooling:
            if time.monotonic() < self.cooling[key]:
                return TOO_MANY_REQUESTS
            del self.cooling[key]
        self.total += 1
        self.by_peer[key] += 1
        return None

    def cool_off(self, peer: str | None) -> None:
        """Refuse ``peer``'s upgrades for a while: it was closed for never initializing."""
        key = peer_key(peer)
        if key is None:
            return
        self.cooling.pop(key, None)  # kept in order of expiry
        self.cooling[key] = time.monotonic() + COOL_OFF_SECONDS
        while len(self.cooling) > MAX_COOLING_PEERS:
            del self.cooling[next(iter(self.cooling))]

    def release(self, peer: str | None) -> None:
        key = peer_key(peer)
        self.total -= 1
        self.by_peer[key] -= 1
        if not self.by_peer[key]:
            del self.by_peer[key]


def peer_key(peer: str | None) -> str | None:
    """Whose connections count together: an IPv4 address, or an IPv6 /64
    (one host is given a whole /64, and could otherwise be 2^64 peers)."""
    if peer is None or ":" not in peer:
        return peer
    address = ipaddress.ip_address(peer)
    if address.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


_limits: LoopLocal[ConnectionLimits] = LoopLocal(ConnectionLimits)


def connection_limits() -> ConnectionLimits:
    """This process's (this event loop's) count."""
    return _limits.get()
