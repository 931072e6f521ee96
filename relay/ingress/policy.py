"""Who may send what through this relay, and the log line for every refusal.

`Connections` caps the open sessions, `RelayPolicy` decides MAIL, RCPT and
DATA (address octets, size, spool room, the relay check, recipient
resolution, forward networks), `Rejections` writes the `rejected` event.
Each decision is a (reply, reason for the log) pair, or None to go on.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

from relay.config import RelaySettings
from relay.ingress.clienttext import address_refusal, printable
from relay.ingress.protocol import RelaySMTP
from relay.ingress.replies import Reply
from relay.log import DeliveryLog
from relay.routing import resolve_recipient
from relay.spool import Spool

Refusal = tuple[str, str]  # (reply, reason for the `rejected` event)
# `rejected` events one by one per session; the rest become one summary at its end. Equal
# to the default `hard_error_limit`: at the defaults a session is closed before it needs one.
LOGGED_PER_SESSION = 20


@dataclass
class _Unlogged:
    count: int = 0  # refusals past LOGGED_PER_SESSION
    last: dict[str, Any] | None = None  # the last of them, as it would have been logged


class Rejections:
    """The `rejected` log event: one per refused connection, command or message.

    Each carries what is known of the transaction (`helo`, `mail_from`,
    `rcpt`, escaped by `printable`), as Postfix's `NOQUEUE: reject:` line.
    After LOGGED_PER_SESSION in one session the rest are counted, and the
    session's end writes one more event: the last of them with `count`.
    """

    def __init__(self, log: DeliveryLog):
        self.log = log
        self._logged: weakref.WeakKeyDictionary[RelaySMTP, int] = weakref.WeakKeyDictionary()
        self._unlogged: weakref.WeakKeyDictionary[RelaySMTP, _Unlogged] = (
            weakref.WeakKeyDictionary()
        )

    def refuse(
        self, server: RelaySMTP, stage: str, reply: str, reason: str, *,
        mail_from: str | None = None, rcpt: str | None = None,
    ) -> str:  # fmt: skip
        """Log the refusal (`mail_from`, `rcpt`: the address refused); the reply to send."""
        code, enhanced, _ = reply.split(" ", 2)
        fields = {
            "client_ip": server.client_ip, "stage": stage, "smtp_code": int(code),
            "enhanced_code": enhanced, "reason": reason,
            **_transaction(server, stage, mail_from, rcpt),
        }  # fmt: skip
        logged = self._logged.get(server, 0)
        if logged < LOGGED_PER_SESSION:
            self._logged[server] = logged + 1
            self.log.emit("rejected", **fields)
        else:
            unlogged = self._unlogged.setdefault(server, _Unlogged())
            unlogged.count += 1
            unlogged.last = fields
        return reply

    def session_end(self, server: RelaySMTP) -> None:
        """The summary of what was not logged one by one; a later refusal is logged again."""
        self._logged.pop(server, None)
        unlogged = self._unlogged.pop(server, None)
        if unlogged is not None and unlogged.last is not None:
            self.log.emit("rejected", **unlogged.last, count=unlogged.count)


def _transaction(
    server: RelaySMTP, stage: str, mail_from: str | None, rcpt: str | None
) -> dict[str, Any]:
    """`helo`, `mail_from`, `rcpt` (at DATA the first recipient, `rcpts` when several)."""
    known: dict[str, Any] = {}
    session, envelope = server.session, server.envelope
    if session is not None and session.host_name:
        known["helo"] = printable(session.host_name)
    if mail_from is None and envelope is not None:
        mail_from = envelope.mail_from
    if mail_from:
        known["mail_from"] = "" if mail_from == "<>" else printable(mail_from)
    rcpts = [rcpt] if rcpt is not None else []
    if not rcpts and stage == "data" and envelope is not None:
        rcpts = envelope.rcpt_tos
    if rcpts:
        known["rcpt"] = printable(rcpts[0])
    if len(rcpts) > 1:
        known["rcpts"] = [printable(r) for r in rcpts]
    return known


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

    async def mail_refusal(self, address: str, options: list[str]) -> Refusal | None:
        refusal = address_refusal(address, smtputf8="SMTPUTF8" in options)
        if refusal:
            return refusal
        size = next((o[5:] for o in options if o.startswith("SIZE=")), "")
        if size.isdigit() and int(size) > self.limits.max_message_size:
            return Reply.TOO_BIG, "declared size too big"
        return await self.room_refusal()

    def rcpt_refusal(
        self, address: str, smtputf8: bool, rcpts_so_far: int, client_ip: str
    ) -> Refusal | None:
        """The relay check: only listed domains; forward domains only from forward_networks."""
        refusal = address_refusal(address, smtputf8)
        if refusal:
            return refusal
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
