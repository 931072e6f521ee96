"""The verifier's DNS: relay/resolver.py (its cache shared with MX lookups) under
one message's deadline, `auth.timeout`.

pyspf and dkimpy are synchronous and run in a worker thread; their DNS hooks
call `Lookups.sync`, which runs the lookup on the event loop and waits for it.
A `Probe` watches the lookups of one check (SPF, one DKIM signature, the ARC
chain), so a DNS failure is told from "no such record": the first makes the
result `temperror`, the second is the domain's own answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import dkim

from relay.resolver import DnsFailure, Resolver


class Lookups:
    """Every lookup for one message, ending at `deadline` (time.monotonic())."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop, deadline: float):
        self.resolver = resolver
        self.loop = loop
        self.deadline = deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def records(self, name: str, rdtype: str) -> list[Any]:
        """The records of `name`; [] for none; DnsFailure for a failure or the deadline."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DnsFailure(f"auth.timeout passed before {rdtype} {name}")
        try:
            async with asyncio.timeout(remaining):
                return await self.resolver.records(name, rdtype)
        except TimeoutError:
            raise DnsFailure(f"auth.timeout passed during {rdtype} {name}") from None

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record of `name`, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(r.strings) for r in await self.records(name, "TXT")]

    def sync(self, name: str, rdtype: str) -> list[Any]:
        """`records` for a library in a worker thread (never call it on the loop)."""
        future = asyncio.run_coroutine_threadsafe(self.records(name, rdtype), self.loop)
        try:
            return future.result(timeout=max(self.remaining(), 0) + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DnsFailure(f"auth.timeout passed during {rdtype} {name}") from None

    def probe(self) -> Probe:
        return Probe(self)


class Probe:
    """One check's view of the lookups: did any fail, did a key record exist."""

    def __init__(self, lookups: Lookups):
        self.lookups = lookups
        self.failed = False  # a lookup failed (timeout, SERVFAIL, the deadline)
        self.missing = False  # a TXT lookup found no record

    def records(self, name: str, rdtype: str) -> list[Any]:
        try:
            return self.lookups.sync(name, rdtype)
        except DnsFailure:
            self.failed = True
            raise

    def dkim_txt(self, name: bytes, timeout: float = 0) -> bytes | None:
        """dkimpy's `dnsfunc`: the TXT record of a key name given as bytes (authheaders'
        DMARC hook takes str instead: the reason this adapter is ours)."""
        try:
            found = [] if not name.isascii() else self.records(name.decode(), "TXT")
        except DnsFailure as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        if not found:
            self.missing = True
            return None
        return b"".join(found[0].strings)
