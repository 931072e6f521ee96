"""Where a provider's new connections go: its hosts in order, dead ones skipped.

As Postfix's smtp(8): `host:` names in the order given, or with `mx:` the
domain's MX hosts by preference (equal preferences shuffled, so the load
spreads as the domain's owner meant); each host's addresses (A, then AAAA) in
turn. A host (address and port) that failed to connect is skipped for the
provider's `dead_host_time` while another one is left, so a dead first MX
does not cost every message a connect timeout.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import ProviderSettings
from relay.delivery.reply import Failed, Reply
from relay.resolver import MX, DnsFailure, Resolver


@dataclass(frozen=True)
class Host:
    """One address to connect to, and the name its certificate must carry."""

    name: str
    address: str

    def __str__(self) -> str:
        return self.name if self.name == self.address else f"{self.name}[{self.address}]"


class Hosts:
    """The hosts to try for a provider, and which of them are dead for now."""

    def __init__(
        self,
        resolver: Resolver,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.clock = clock
        self._dead: dict[tuple[str, int], float] = {}  # (address, port) → until

    async def route(self, cfg: ProviderSettings) -> tuple[list[Host], int]:
        """The hosts to try in order, and how many were left out as dead.

        Raises `Failed` when no host has an address (a lookup failure or no
        records): a deferral, as for a provider that is down.
        """
        names = await self._names(cfg)
        hosts: list[Host] = []
        failures: list[str] = []
        for name in names:
            try:
                addresses = await self.resolver.addresses(name)
            except DnsFailure as exc:
                failures.append(str(exc))
                continue
            if not addresses:
                failures.append(f"{name}: no address (A or AAAA)")
            hosts += [Host(name, a) for a in addresses]
        if not hosts:
            raise Failed(Reply(None, "; ".join(failures), "connect"))
        now = self.clock()
        alive = [h for h in hosts if self._dead.get((h.address, cfg.port), 0.0) <= now]
        return (alive, len(hosts) - len(alive)) if alive else (hosts, 0)

    async def _names(self, cfg: ProviderSettings) -> list[str]:
        if cfg.mx is None:
            return list(cfg.hosts)
        try:
            records = await self.resolver.mx(cfg.mx)
        except DnsFailure as exc:
            raise Failed(Reply(None, str(exc), "connect")) from exc
        if not records:  # RFC 5321 §5.1: no MX, the domain is its own host
            return [cfg.mx]
        names = [r.host for r in self._ordered(records) if r.host]
        if not names:
            raise Failed(Reply(None, f"{cfg.mx}: null MX (RFC 7505), it takes no mail", "connect"))
        return names

    def _ordered(self, records: list[MX]) -> list[MX]:
        """By preference; records of equal preference in random order."""
        out: list[MX] = []
        ranked = sorted(records, key=lambda r: r.preference)
        for _, same in itertools.groupby(ranked, key=lambda r: r.preference):
            group = list(same)
            self.rng.shuffle(group)
            out += group
        return out

    def failed(self, cfg: ProviderSettings, host: Host) -> None:
        """`host` failed to connect: skip it for `dead_host_time`."""
        self._dead[(host.address, cfg.port)] = self.clock() + cfg.dead_host_time

    def connected(self, cfg: ProviderSettings, host: Host) -> None:
        self._dead.pop((host.address, cfg.port), None)
