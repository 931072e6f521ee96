"""Who may send what through this relay, and the log line for every refusal.

`Connections` caps the open sessions, `RelayPolicy` decides MAIL, RCPT and
DATA (size, spool room, the relay check, recipient resolution, forward
networks), `Rejections` writes the `rejected` event. Each decision is a
(reply, reason for the log) pair, or None to go on.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from relay.config import RelaySettings
from relay.ingress.protocol import RelaySMTP
from relay.ingress.replies import Reply
from relay.log import DeliveryLog
from relay.routing import resolve_recipient
from relay.spool import Spool

Refusal = tuple[str, str]  # (reply, reason for the `rejected` event)


class Rejections:
    """The `rejected` log event: one per refused connection, command or message."""

    def __init__(self, log: DeliveryLog):
        self.log = log

    def refuse(self, client_ip: str, stage: str, reply: str, reason: str) -> str:
        """Log the refusal; the reply to send."""
        code, enhanced, _ = reply.split(" ", 2)
        self.log.emit(
            "rejected", client_ip=client_ip, stage=stage, smtp_code=int(code),
            enhanced_code=enhanced, reason=reason,
        )  # fmt: skip
        return reply


class Connections:
    """Open sessions, total and per client IP (STARTTLS does not count twice)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set[RelaySMTP] = set()

    def refusal(self, client_ip: str) -> Refusal | None:
        if self.total >= self.max_total:
            return Reply.TOO_MANY_CONN, "connection limit"
        if self.per_ip[client_ip] >= self.max_per_ip:
            return Reply.TOO_MANY_CONN_IP, "connection limit"
        return None

    def add(self, server: RelaySMTP) -> None:
        self.total += 1
        self.per_ip[server.client_ip] += 1
        self.sessions.add(server)

    def remove(self, server: RelaySMTP) -> None:
        self.total -= 1
        self.per_ip[server.client_ip] -= 1
        if self.per_ip[server.client_ip] <= 0:
            del self.per_ip[server.client_ip]
        self.sessions.discard(server)


class RelayPolicy:
    """Which senders, recipients and messages the relay takes (SPEC "Replies")."""

    def __init__(self, settings: RelaySettings, spool: Spool):
        self.settings = settings
        self.limits = settings.limits
        self.spool = spool
        self.forward_nets = [
            ipaddress.ip_network(n, strict=False) for n in settings.forward_networks
        ]

    async def mail_refusal(self, options: list[str]) -> Refusal | None:
        size = next((o[5:] for o in options if o.startswith("SIZE=")), "")
        if size.isdigit() and int(size) > self.limits.max_message_size:
            return Reply.TOO_BIG, "declared size too big"
        return await self.room_refusal()

    def rcpt_refusal(self, address: str, rcpts_so_far: int, client_ip: str) -> Refusal | None:
        """The relay check: only listed domains; forward domains only from forward_networks."""
        if address == "<>" or ("@" not in address and address.lower() != "postmaster"):
            return Reply.BAD_ADDRESS, "malformed address"
        if rcpts_so_far >= self.limits.max_recipients:
            return Reply.TOO_MANY_RCPTS, "too many recipients"
        resolved = resolve_recipient(address, self.settings)
        if resolved is None:
            return Reply.RELAY_DENIED, "relay denied"
        if resolved[1] and self.forward_nets and not self._from_forward_net(client_ip):
            return Reply.RELAY_DENIED, "forward domain from outside forward_networks"
        return None

    async def room_refusal(self) -> Refusal | None:
        """Too little free space for the spool: refused at MAIL and again at DATA."""
        if not await self.spool.has_room(self.limits.min_free_space):
            return Reply.NO_SPACE, "spool full"
        return None

    def _from_forward_net(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.forward_nets)
