"""A real DNS server on loopback for tests: dnslib, one zone, UDP and TCP.

UDP answers over 512 octets are truncated (TC bit), as a classic server does,
so a client that cannot fall back to TCP fails visibly. `queries` counts the
questions asked, by (name, type), to see what a cache saved. Names in `silent`
(and every name below them) are never answered, like a dead authoritative server.
"""

from __future__ import annotations

import collections
import socket
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RCODE, DNSError, DNSHeader, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer
from dnslib.zoneresolver import ZoneResolver


class _Handler(DNSHandler):
    """Truncates a UDP answer over 512 octets (RFC 1035 §4.2.1) the way servers do:
    the question kept, no records, TC set (dnslib's own drops the question, which
    clients rightly refuse as an answer to another question)."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".").lower()
        if any(name == s or name.endswith("." + s) for s in self.server.resolver.silent):
            self.server.resolver.queries[(name, QTYPE[request.q.qtype])] += 1
            raise DNSError(f"{name}: silent")  # dnslib's handler then sends nothing
        reply = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > 512:
            cut = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1),
                            q=request.q)  # fmt: skip
            packed = cut.pack()
        return packed


class _Counting(ZoneResolver):
    def __init__(self, zone: str, silent: tuple[str, ...] = ()) -> None:
        super().__init__(zone, glob=False)
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.silent = tuple(s.lower() for s in silent)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        """The zone's answer; a name that exists without records of the type asked
        for is NODATA (NOERROR, no answer), where dnslib would say NXDOMAIN."""
        q = request.q
        self.queries[(str(q.qname).rstrip(".").lower(), QTYPE[q.qtype])] += 1
        reply: DNSRecord = super().resolve(request, handler)
        if reply.header.rcode == RCODE.NXDOMAIN and any(q.qname == n for n, _, _ in self.zone):
            reply.header.rcode = RCODE.NOERROR
        return reply


class LoopbackDNS:
    """`with LoopbackDNS(zone_text) as dns:` serves the zone on 127.0.0.1:`dns.port`."""

    def __init__(self, zone: str, silent: tuple[str, ...] = ()) -> None:
        self.resolver = _Counting(zone, silent)
        self.port = 0
        self._servers: list[DNSServer] = []

    @property
    def queries(self) -> collections.Counter[tuple[str, str]]:
        return self.resolver.queries

    def start(self) -> LoopbackDNS:
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        for _ in range(20):  # a UDP port whose TCP twin is free too
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            servers: list[DNSServer] = []
            try:
                for tcp in (False, True):
                    servers.append(DNSServer(self.resolver, port=port, address="127.0.0.1",
                                             tcp=tcp, logger=quiet, handler=_Handler))  # fmt: skip
            except OSError:
                for server in servers:
                    server.server.server_close()
                continue
            self.port, self._servers = port, servers
            for server in servers:
                server.start_thread()
            return self
        raise RuntimeError("no free port for the loopback DNS server")

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()
