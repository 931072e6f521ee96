"""The listening sockets of `listen.host`: one address or several, IPv4 and IPv6.

asyncio's `create_server` sets IPV6_V6ONLY on every IPv6 socket, so `"::"`
would never take IPv4 clients; the sockets are made here instead. `"::"`
listed without an IPv4 address is dual stack (IPV6_V6ONLY off, as an
operator expects from Postfix's `inet_interfaces = all` on a dual-stack
host); beside one (`[0.0.0.0, "::"]`) it is IPv6 only, since the IPv4
address has its own socket and both could not bind the port. With port 0
every address gets the port the first one was given: one relay, one port.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence


def dual_stack(host: str, hosts: Sequence[str]) -> bool:
    """Whether `host`'s socket also takes IPv4 clients (as IPv4-mapped addresses)."""
    return host == "::" and not any(ipaddress.ip_address(h).version == 4 for h in hosts)


def listening_sockets(hosts: Sequence[str], port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets, one per address, in the order given."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # worker processes share the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                only = 0 if dual_stack(host, hosts) else 1
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, only)
            sock.bind((host, port))
            port = port or sock.getsockname()[1]
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def client_address(peer: str) -> str:
    """The client's IP as the relay names it: an IPv4-mapped IPv6 address (an IPv4
    client on a dual-stack socket) is the IPv4 address, as Postfix reports it."""
    if ":" not in peer:  # an IPv4 address as the kernel gives it: nothing to map
        return peer
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return peer


def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3 address literal: `[192.0.2.1]`, `[IPv6:2001:db8::1]`."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
