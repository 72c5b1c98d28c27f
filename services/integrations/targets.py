"""Where a webhook may connect: public addresses only, unless the operator lists a private target.

A webhook URL is a request the integrator makes needle send, and its outcome (status, connect error, the first
bytes of the answer) can be read back: without this check a webhook scans the internal network and reaches
the cloud metadata service (169.254.169.254). So a target is refused when its address is loopback, private,
link-local, multicast, reserved, unspecified, shared (100.64/10) or otherwise not globally routable (an
IPv4-mapped or 6to4/Teredo IPv6 address is judged by the IPv4 address inside it).

The check runs when the webhook is registered and again at every connect: the host is resolved **once**, every
address it resolves to must be allowed, and the connection goes to the address that was checked (never a
second lookup, which a rebinding DNS server could answer differently).

``NEEDLE_WEBHOOK_ALLOW_PRIVATE`` (comma-separated) lists what the operator allows anyway: host names
(``hooks.internal``, matched exactly, case-insensitive) and addresses or CIDR blocks (``10.1.2.0/24``,
``127.0.0.1``). ``allowed`` is pure; ``resolve_checked`` does the one lookup.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(Exception):
    """The webhook's target is not one needle may connect to."""


@dataclass(frozen=True, slots=True)
class AllowList:
    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        hosts: set[str] = set()
        networks: list[Network] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))


def _embedded_v4(ip: Address) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return None


def public(ip: Address) -> bool:
    """True for a globally routable unicast address."""
    inner = _embedded_v4(ip)
    if inner is not None:  # ::ffff:a.b.c.d, 6to4, Teredo: reaches the IPv4 address inside
        return public(inner)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


def allowed(host: str, ip: Address, allow: AllowList) -> bool:
    """May needle connect to ``ip``, which ``host`` resolved to? Pure."""
    if public(ip):
        return True
    if host.lower().rstrip(".") in allow.hosts:
        return True
    return any(ip in net for net in allow.networks if net.version == ip.version)


async def resolve_checked(host: str, port: int, allow: AllowList, *, must_resolve: bool = True) -> list[Address]:
    """Every address ``host`` resolves to, once; TargetRefused when one of them is not allowed (a name pointing
    at both a public and an internal address is refused) or when it does not resolve (``must_resolve``; at
    registration a name that does not resolve yet is accepted: every connect checks it again)."""
    try:
        literal: Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        found = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            if not must_resolve:
                return []
            raise TargetRefused(f"host {host!r} does not resolve ({exc})") from None
        found = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
        if not found:
            raise TargetRefused(f"host {host!r} does not resolve")
    for ip in found:
        if not allowed(host, ip, allow):
            # the address is not named: an internal name's internal address is no business of the caller's
            raise TargetRefused(f"host {host!r} is or resolves to an address that is not public (loopback, "
                                f"private, link-local, multicast or reserved); an operator may allow it with "
                                f"NEEDLE_WEBHOOK_ALLOW_PRIVATE")
    return found
