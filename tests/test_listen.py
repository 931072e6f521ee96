"""Listening (SPEC Part 2 "Listening"): `listen.host` as one address or a list, dual
stack on `"::"`, and the client's IPv6 address as an RFC 5321 address literal.

Loopback only: ::1 and 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from relay import config
from tests.harness import RawClient
from tests.helpers_ingress import RelayFactory, relay_factory, spool_messages

__all__ = ["relay_factory"]

pytestmark = pytest.mark.timeout(30)

HAS_IPV6 = socket.has_ipv6
try:
    socket.socket(socket.AF_INET6).bind(("::1", 0))
except OSError:
    HAS_IPV6 = False
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this host")


async def client(address: str, port: int) -> RawClient:
    reader, writer = await asyncio.open_connection(address, port)
    c = RawClient(reader, writer)
    c.greeting = await c.reply()
    return c


async def deliver_one(address: str, port: int) -> None:
    c = await client(address, port)
    await c.ehlo()
    r = await c.transaction(["zed@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    assert r.code == 250, r
    await c.close()


def received_headers(queue: Path) -> list[bytes]:
    """The first line of each queued message's Received: header."""
    out = []
    for path in spool_messages(queue).values():
        m = re.search(rb"Received: from [^\r]*", path.read_bytes())
        assert m, path
        out.append(m.group(0))
    return out


def test_host_is_one_address_or_a_list() -> None:
    one = config.ListenSettings(host="127.0.0.1")
    several = config.ListenSettings.model_validate({"host": ["0.0.0.0", "::"], "port": 25})
    assert one.hosts == ("127.0.0.1",) and several.hosts == ("0.0.0.0", "::")
    assert several.shown == "0.0.0.0,[::]:25"
    for bad in ([], ["127.0.0.1", "127.0.0.1"], "relay.example.com"):
        with pytest.raises(ValueError):
            config.ListenSettings.model_validate({"host": bad})


@needs_ipv6
async def test_ipv6_client_appears_as_an_ipv6_address_literal(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(listen=', host: "::1"')
    await deliver_one("::1", env.port)
    [header] = received_headers(env.spool_queue)
    assert header == b"Received: from client.test ([IPv6:::1])"
    [event] = env.events("received")
    assert event["client_ip"] == "::1"


@needs_ipv6
async def test_a_list_listens_on_every_address_on_one_port(relay_factory: RelayFactory) -> None:
    env = await relay_factory(listen=', host: [127.0.0.1, "::1"]')
    await deliver_one("127.0.0.1", env.port)
    await deliver_one("::1", env.port)
    assert sorted(received_headers(env.spool_queue)) == [
        b"Received: from client.test ([127.0.0.1])",
        b"Received: from client.test ([IPv6:::1])",
    ]


@needs_ipv6
async def test_dual_stack_listener_takes_an_ipv4_client(relay_factory: RelayFactory) -> None:
    """`"::"` alone: IPV6_V6ONLY off. The IPv4 client is named by its IPv4 address (not
    `::ffff:127.0.0.1`), in the header, the log and the per-IP accounting."""
    env = await relay_factory(listen=', host: "::"')
    [sock] = [s for server in env.relay.ingress.servers for s in server.sockets]
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    await deliver_one("127.0.0.1", env.port)
    await deliver_one("::1", env.port)
    assert sorted(received_headers(env.spool_queue)) == [
        b"Received: from client.test ([127.0.0.1])",
        b"Received: from client.test ([IPv6:::1])",
    ]
    assert sorted(e["client_ip"] for e in env.events("received")) == ["127.0.0.1", "::1"]


@needs_ipv6
async def test_ipv6_wildcard_beside_an_ipv4_address_is_ipv6_only(
    relay_factory: RelayFactory,
) -> None:
    """`[127.0.0.1, "::"]` (as `[0.0.0.0, "::"]`): two sockets on one port, the IPv6 one
    V6ONLY (else the two could not bind together); both families are served."""
    env = await relay_factory(listen=', host: [127.0.0.1, "::"]')
    socks = [s for server in env.relay.ingress.servers for s in server.sockets]
    assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
    assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert len({s.getsockname()[1] for s in socks}) == 1
    await deliver_one("127.0.0.1", env.port)
    await deliver_one("::1", env.port)
    assert len(env.events("received")) == 2
