"""One inbound message from the 354 to its reply, and how it is queued.

`Receiving` streams the message into the spool behind its Received: and
X-Relay-Trace: headers and checks the header section for mail loops. `Intake`
is what every message shares: the spool, this relay's names and hop limit,
the routing plan and the durable enqueue with its `received` event.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from relay.config import RelaySettings
from relay.ingress._aiosmtpd import Envelope, Session
from relay.ingress.dataread import DataError, DataParser
from relay.ingress.policy import Refusal, Rejections
from relay.ingress.protocol import RelaySMTP
from relay.ingress.replies import Reply
from relay.log import DeliveryLog, oplog, utc_ts
from relay.routing import PilotTable, resolve_recipient, route
from relay.spool import Spool, SpoolError, new_queue_id

HEADER_SCAN_LIMIT = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def scan_trace(header: bytes) -> tuple[int, set[str]]:
    """(number of Received: headers, node names in X-Relay-Trace headers)."""
    hops = len(re.findall(rb"(?im)^received:", header))
    nodes = {
        m.decode("utf-8", "replace")
        for m in re.findall(rb"(?im)^x-relay-trace:[ \t]*(\S+)", header)
    }
    return hops, nodes


class Receiving:
    """One message between 354 and the final reply."""

    def __init__(self, intake: Intake, server: RelaySMTP):
        self.intake = intake
        self.server = server
        assert server.envelope is not None and server.session is not None
        self.envelope: Envelope = server.envelope
        self.session: Session = server.session
        self.queue_id = new_queue_id()
        self.incoming = intake.spool.begin(self.queue_id)
        self.header = bytearray()
        self.header_done = False
        self.held = bytearray()  # the header section, held until we know its Message-ID
        self.added_message_id: str | None = None
        self.store_error: str | None = None
        self.started = False
        self.submitted = False  # handed to the spool's commit: no longer ours to abort

    def received_header(self) -> bytes:
        rcpts = self.envelope.rcpt_tos
        helo = _CONTROL.sub("?", self.session.host_name or "unknown")
        proto = (
            "ESMTPS" if self.session.ssl else ("ESMTP" if self.session.extended_smtp else "SMTP")
        )
        when = format_datetime(datetime.now(UTC))
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ([{self.server.client_ip}])\r\n"
            f"\tby {self.intake.hostname} (relay) with {proto} id {self.queue_id}{for_clause};"
            f" {when}\r\nX-Relay-Trace: {self.intake.node} {self.queue_id}\r\n"
            + (f"Message-ID: {self.added_message_id}\r\n" if self.added_message_id else "")
        ).encode("utf-8", "surrogateescape")

    async def write(self, data: bytes) -> None:
        if not self.header_done:
            self.header += data
            self.held += data
            if self.header.startswith(b"\r\n"):  # no header section at all
                self.header_done = True
                self.header.clear()
            else:
                end = self.header.find(b"\r\n\r\n")
                if end >= 0 or len(self.header) > HEADER_SCAN_LIMIT:
                    self.header_done = True
                    del self.header[end + 2 if end >= 0 else HEADER_SCAN_LIMIT :]
            if not self.header_done:
                return
            data, self.held = bytes(self.held), bytearray()
            self._add_message_id()
        if self.store_error:
            return
        spool = self.intake.spool
        try:
            if not self.started:
                self.started = True
                await spool.write(self.incoming, self.received_header())
            await spool.write(self.incoming, data)
        except SpoolError as exc:
            self.store_error = str(exc)

    async def abort(self) -> None:
        if not self.submitted:
            self.submitted = True  # once is enough
            await self.intake.spool.abort(self.incoming)

    async def finish(self, parser: DataParser) -> str:
        refusal = self._content_refusal(parser)
        if refusal:
            await self.abort()
            return self.intake.rejections.refuse(self.server.client_ip, "data", *refusal)
        if not self.header_done:  # all header, no body: what was held goes out now
            self.header_done = True
            data, self.held = bytes(self.held), bytearray()
            self._add_message_id()
            await self.write(data)
        if not self.started:  # an empty message still gets its trace headers
            await self.write(b"")
        return await self.intake.enqueue(self, parser.size)

    def _content_refusal(self, parser: DataParser) -> Refusal | None:
        """(reply, reason for the log) when the message must not be queued."""
        if parser.error is DataError.TOO_BIG:
            return Reply.TOO_BIG, "message too big"
        if parser.error is DataError.LINE_TOO_LONG:
            return Reply.LINE_TOO_LONG, "line too long"
        if parser.error is DataError.BARE_NEWLINE:
            return Reply.BARE_NEWLINE, "bare newline"
        if self.store_error:
            oplog.error("spool write failed", error=self.store_error)
            return Reply.NO_SPACE, "spool write failed"
        hops, traces = scan_trace(bytes(self.header))
        if self.intake.node in traces:
            return Reply.LOOP_TRACE, "own trace header"
        if hops > self.intake.max_hops:
            return Reply.LOOP, f"{hops} hops"
        return None

    def _add_message_id(self) -> None:
        """A message without Message-ID gets one (SPEC Part 2): the probe finds copies by it."""
        if self.message_id() is None:
            self.added_message_id = f"<{self.queue_id}.{self.intake.node}@{self.intake.hostname}>"

    def message_id(self) -> str | None:
        if self.added_message_id:
            return self.added_message_id
        m = re.search(
            rb"(?im)^message-id:[ \t]*((?:.|\r\n[ \t])*?)\r\n(?![ \t])", bytes(self.header)
        )
        return m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace") if m else None


class Intake:
    """From DATA to the spool: what every `Receiving` shares, and the durable enqueue."""

    def __init__(
        self,
        settings: RelaySettings,
        spool: Spool,
        log: DeliveryLog,
        rejections: Rejections,
        pilots: Callable[[], PilotTable],
        on_queued: Callable[[str, dict[str, Any]], object] | None,
        clock: Callable[[], datetime],
    ):
        self.settings = settings
        self.hostname = settings.listen.hostname
        self.max_hops = settings.limits.max_hops
        self.spool = spool
        self.log = log
        self.node = log.node
        self.rejections = rejections
        self.pilots = pilots
        self.on_queued = on_queued
        self.clock = clock
        self.storing: set[asyncio.Future[str]] = set()

    def begin(self, server: RelaySMTP) -> Receiving:
        return Receiving(self, server)

    def plan(self, msg: Receiving, size: int) -> tuple[dict[str, Any], list[str]]:
        """The envelope record to store (routing plan included) and the discarded rcpts."""
        env = msg.envelope
        table = self.pilots()
        now = self.clock()
        plan: list[dict[str, Any]] = []
        discarded: list[str] = []
        forwarded_any = False
        for rcpt in env.rcpt_tos:
            resolved = resolve_recipient(rcpt, self.settings)
            assert resolved is not None
            address, forwarded = resolved
            forwarded_any |= forwarded
            r = route(address, table, now, forwarded)
            if r.discarded:
                discarded.append(rcpt)
            for d in r.deliveries:
                plan.append(
                    {"rcpt": rcpt, "provider": d.provider, "delivered_to": d.delivered_to,
                     "role": d.role, "group": d.group, "mode": d.mode, "pilot": d.pilot}
                )  # fmt: skip
        record = {
            "queue_id": msg.queue_id,
            "received": utc_ts(now),
            "received_epoch": now.timestamp(),
            "mail_from": "" if env.mail_from == "<>" else (env.mail_from or ""),
            "rcpts": list(env.rcpt_tos),
            "options": [o for o in env.mail_options if o in ("BODY=8BITMIME", "SMTPUTF8")],
            "client_ip": msg.server.client_ip,
            "message_id": msg.message_id(),
            "size": size,
            "forwarded": forwarded_any,
            "plan": plan,
            "dsn": False,
        }
        return record, discarded

    async def enqueue(self, msg: Receiving, size: int) -> str:
        """Store durably, then log and schedule; the reply to send after DATA.

        Once the commit is under way it runs to its end even if the session is
        cancelled (client gone): a message on disk is always also scheduled.
        """
        record, discarded = self.plan(msg, size)
        if not record["plan"]:
            await msg.abort()
            self._accepted(msg, record, discarded)
            return Reply.queued(msg.queue_id)
        msg.submitted = True
        task = asyncio.ensure_future(self._store(msg, record, discarded))
        self.storing.add(task)
        task.add_done_callback(self._stored)
        return await asyncio.shield(task)

    async def settle(self, timeout: float) -> None:
        """Wait for the commits under way: each still finishes and is scheduled."""
        if self.storing:
            await asyncio.wait(set(self.storing), timeout=timeout)

    def _stored(self, task: asyncio.Future[str]) -> None:
        self.storing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            oplog.error("error while queuing a message", error=repr(exc), exc_info=exc)

    async def _store(self, msg: Receiving, record: dict[str, Any], discarded: list[str]) -> str:
        try:
            await self.spool.commit(msg.incoming, record)
        except SpoolError as exc:
            oplog.error("spool commit failed", error=str(exc))
            return self.rejections.refuse(
                msg.server.client_ip, "data", Reply.NO_SPACE, "spool write failed"
            )
        try:
            self._accepted(msg, record, discarded)
        except Exception as exc:  # the message is safe on disk: still a 250
            oplog.error("error after queuing a message", queue_id=msg.queue_id,
                        error=repr(exc), exc_info=exc)  # fmt: skip
        return Reply.queued(msg.queue_id)

    def _accepted(self, msg: Receiving, record: dict[str, Any], discarded: list[str]) -> None:
        self.log.emit(
            "received", queue_id=msg.queue_id, message_id=record["message_id"],
            mail_from=record["mail_from"], client_ip=record["client_ip"], size=record["size"],
            rcpts=record["rcpts"], plan=record["plan"], forwarded=record["forwarded"],
            **({"message_id_added": True} if msg.added_message_id else {}),
        )  # fmt: skip
        for rcpt in discarded:
            self.log.emit(
                "discarded", queue_id=msg.queue_id, rcpt=rcpt,
                reason="forwarded copy of a non-pilot: legacy holds the original",
            )  # fmt: skip
        if record["plan"] and self.on_queued:
            self.on_queued(msg.queue_id, record)
