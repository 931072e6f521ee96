"""The listening socket, and the handler that wires each session to the policy.

`Ingress` listens, makes one `RelaySMTP` per connection and drains on
shutdown. `IngressHandler` is the engine's handler (the `handle_*` hooks) and
each session's `SessionPolicy`: it asks `RelayPolicy` and `Connections`,
logs refusals through `Rejections`, and hands messages to the `Intake`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay.auth import Verifier
from relay.config import RelaySettings
from relay.ingress.engine import Envelope, Session
from relay.ingress.policy import Connections, Rejections, RelayPolicy
from relay.ingress.protocol import RelaySMTP, SessionLimits, capabilities
from relay.ingress.receiving import Intake, Receiving
from relay.ingress.replies import Reply
from relay.ingress.sockets import listening_sockets
from relay.log import DeliveryLog, oplog
from relay.records import Envelope as Record
from relay.routing import PilotTable
from relay.spool import Spool
from relay.verify import RecipientCheck


class IngressHandler:
    """Answers every SMTP command and session question; the one place that decides replies."""

    def __init__(
        self,
        settings: RelaySettings,
        spool: Spool,
        log: DeliveryLog,
        pilots: Callable[[], PilotTable],
        on_queued: Callable[[str, Record], object] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        auth_verifier: Verifier | None = None,
        recipients: RecipientCheck | None = None,
    ):
        limits = settings.limits
        self.settings = settings
        self.recipients = recipients  # `recipients:` and `verify_recipients` (relay/verify/)
        self.rejections = Rejections(log)
        self.policy = RelayPolicy(settings, spool)
        self.conns = Connections(limits.max_connections, limits.max_connections_per_ip)
        self.intake = Intake(
            settings, spool, log, self.rejections, pilots, on_queued, clock, auth_verifier
        )
        self.shutting_down = False

    def _refuse(self, server: RelaySMTP, stage: str, reply: str, reason: str, **known: str) -> str:
        return self.rejections.refuse(server, stage, reply, reason, **known)

    # -- the session's questions (SessionPolicy) --------------------------------------

    def admit(self, server: RelaySMTP) -> str | None:
        if self.shutting_down:
            return self._refuse(server, "connect", Reply.SHUTDOWN, "shutting down")
        refusal = self.conns.refusal(server.client_ip)
        if refusal:
            return self._refuse(server, "connect", *refusal)
        self.conns.add(server)
        return None

    def release(self, server: RelaySMTP) -> None:
        self.conns.remove(server)
        self.rejections.session_end(server)

    async def data_refusal(self, server: RelaySMTP) -> str | None:
        refusal = await self.policy.room_refusal()
        return self._refuse(server, "data", *refusal) if refusal else None

    def begin_message(self, server: RelaySMTP) -> Receiving:
        return self.intake.begin(server)

    async def internal_error(self, server: RelaySMTP, error: Exception) -> str:
        """A fault while taking a message: the client gets a 4xx and tries again later."""
        oplog.error("error while receiving a message", error=repr(error), exc_info=error)
        return self._refuse(server, "data", Reply.INTERNAL, "internal error")

    def log_reject(self, server: RelaySMTP, stage: str, reply: str, reason: str) -> None:
        self.rejections.refuse(server, stage, reply, reason)

    # -- the engine's hooks ------------------------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return capabilities(responses, self.settings.limits.max_message_size)

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        refusal = await self.policy.mail_refusal(address, options)
        if refusal:
            return self._refuse(server, "mail", *refusal, mail_from=address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply.OK_MAIL

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        refusal = self.policy.rcpt_refusal(
            address, envelope.smtp_utf8, len(envelope.rcpt_tos), server.client_ip
        )
        if refusal is None and self.recipients is not None:
            unknown = await self.recipients.refusal(address)
            if unknown is not None:
                kind, reason = unknown
                refusal = (
                    Reply.UNKNOWN_USER if kind == "unknown" else Reply.VERIFY_PENDING,
                    reason,
                )
        if refusal:
            return self._refuse(server, "rcpt", *refusal, rcpt=address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply.OK_RCPT

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        oplog.error("smtp session error", error=repr(error), exc_info=error)
        return Reply.INTERNAL


def tls_context(settings: RelaySettings) -> ssl.SSLContext | None:
    cert, key = settings.listen.tls_cert, settings.listen.tls_key
    if not (cert and key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Ingress:
    """The listening socket and its sessions; drains on shutdown."""

    def __init__(self, handler: IngressHandler, sock: Any = None):
        self.handler = handler
        self.settings = handler.settings
        self.limits = SessionLimits.of(self.settings)
        self.tls = tls_context(self.settings)
        self.servers: list[asyncio.Server] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # set by `start`
        self.sock = sock

    def _factory(self) -> RelaySMTP:
        s = self.settings
        assert self.loop is not None
        return RelaySMTP(
            self.handler,
            self.limits,
            hostname=s.listen.hostname,
            ident="ESMTP relay",
            tls_context=self.tls,
            timeout=s.limits.idle_timeout,
            loop=self.loop,
        )

    async def start(self, reuse_port: bool = False) -> int:
        """Listen on every `listen.host` address; `reuse_port`: worker processes share
        the port (SO_REUSEPORT). Returns the port."""
        self.loop = loop = asyncio.get_running_loop()  # for each session (one getpid less)
        listen = self.settings.listen
        socks = [self.sock] if self.sock is not None else (
            listening_sockets(listen.hosts, listen.port, reuse_port)
        )  # fmt: skip
        for sock in socks:
            self.servers.append(await loop.create_server(self._factory, sock=sock))
        return int(socks[0].getsockname()[1])

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; let transactions finish up to `timeout`; 421 the rest."""
        self.handler.shutting_down = True
        for server in self.servers:
            server.close()
        sessions = self.handler.conns.sessions
        for s in list(sessions):
            if not s.in_transaction:
                s.close_with(Reply.SHUTDOWN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.in_transaction for s in sessions) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for s in list(sessions):
            s.close_with(Reply.SHUTDOWN)
        # A commit under way when its session closed still finishes and is scheduled.
        await self.handler.intake.settle(max(0.5, timeout))
