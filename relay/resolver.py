"""The resolver for every lookup the relay makes (`dns:` in relay.yaml).

dnspython's asyncio resolver with a small TTL-respecting cache, so a busy
queue asks for a provider's MX records once per TTL, not once per message.
With no `nameservers` the system's resolver decides: MX records through the
servers of /etc/resolv.conf, host addresses through getaddrinfo (which also
reads /etc/hosts, as every other program on the machine does).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from relay.config import DnsSettings

CACHE_SIZE = 1000  # names; more than a relay's few providers ever need


class DnsFailure(Exception):
    """A lookup that failed for a reason other than "no such records" (timeout, SERVFAIL)."""


@dataclass(frozen=True)
class MX:
    preference: int
    host: str  # without the trailing dot; "" for a null MX (RFC 7505)


class Resolver:
    """MX and address lookups, as `DnsSettings` says."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self._system = not settings.nameservers
        if self._system:
            try:
                self._dns = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:  # none: MX lookups fail, deferred
                self._dns = dns.asyncresolver.Resolver(configure=False)
        else:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = list(settings.nameservers)
            self._dns.port = settings.port
        self._dns.lifetime = settings.timeout
        self._dns.cache = dns.resolver.LRUCache(CACHE_SIZE)

    async def mx(self, domain: str) -> list[MX]:
        """The MX records of `domain`, unsorted; [] when it has none (RFC 5321 §5.1:
        the domain itself is then the host, which the caller decides)."""
        answer = await self.records(domain, "MX")
        return [
            MX(r.preference, r.exchange.to_text(omit_final_dot=True).rstrip(".").lower())
            for r in answer
        ]

    async def addresses(self, name: str) -> list[str]:
        """The addresses of host `name`: its A, then its AAAA records (from the
        system's resolver: getaddrinfo's order); an IP literal is itself; [] when
        it has none."""
        try:
            ipaddress.ip_address(name)
            return [name]
        except ValueError:
            pass
        if self._system:
            return await self._getaddrinfo(name)
        found = []
        for rdtype in ("A", "AAAA"):
            found += [r.address for r in await self.records(name, rdtype)]
        return found

    async def records(self, name: str, rdtype: str) -> list[Any]:
        """The records (dnspython rdata) of `name`; [] for NXDOMAIN or no such records
        (MX, A, AAAA here; TXT, PTR for relay/auth/)."""
        try:
            answer = await self._dns.resolve(dns.name.from_text(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"DNS lookup of {rdtype} {name} failed: {exc}") from exc
        return list(answer)

    @staticmethod
    async def _getaddrinfo(name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []
            raise DnsFailure(f"lookup of {name} failed: {exc.strerror}") from exc
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
