"""One inbound message from the 354 to its reply, and how it is queued.

`Receiving` streams the message into the spool behind its Received: and
X-Relay-Trace: headers and checks the header section for mail loops. `Intake`
is what every message shares: the spool, this relay's names and hop limit,
the authentication verdict (with `auth.verify`), the routing plan and the
durable enqueue with its `received` event.

When our Authentication-Results is added, the header section is held back
until it is complete (at most HEADER_SCAN_LIMIT), so that an incoming one
claiming our authserv-id never reaches the spool (RFC 8601 §5). Our own field
is not in the spooled content: the spool's content starts with the Received:
written before the verdict exists, so the field rides in the envelope record
(`prepend`) and goes on top of each copy as it is sent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from relay.archive.plan import archive_entry
from relay.auth import Judgement, Message, Verifier
from relay.auth.results import strip_own
from relay.config import RelaySettings
from relay.ingress.clienttext import printable
from relay.ingress.dataread import DataError, DataParser
from relay.ingress.engine import Envelope, Session
from relay.ingress.policy import Refusal, Rejections
from relay.ingress.protocol import RelaySMTP
from relay.ingress.replies import Reply
from relay.ingress.sockets import address_literal
from relay.log import DeliveryLog, oplog, utc_ts
from relay.records import Envelope as Record
from relay.records import PlanEntry
from relay.routing import PilotTable, resolve_recipient, route
from relay.spool import Spool, SpoolError, new_queue_id

HEADER_SCAN_LIMIT = 1 << 20


def scan_trace(header: bytes) -> tuple[int, set[str]]:
    """(number of Received: headers, node names in X-Relay-Trace headers)."""
    hops = len(re.findall(rb"(?im)^received:", header))
    nodes = {
        m.decode("utf-8", "replace")
        for m in re.findall(rb"(?im)^x-relay-trace:[ \t]*(\S+)", header)
    }
    return hops, nodes


_date: tuple[int, str] = (-1, "")  # (a second, its RFC 5322 date): the last one formatted


def _received_date() -> str:
    """Now as the `Received:` header's RFC 5322 date, formatted once a second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date[1]


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
        self.header_whole = False  # the header section ended within HEADER_SCAN_LIMIT
        # the content held until its header section is whole: we add a missing Message-ID
        # and, with our Authentication-Results, remove forged ones claiming our id
        self.held: bytearray | None = bytearray()
        self.added_message_id: str | None = None
        self.prefix_length = 0  # our Received: and X-Relay-Trace: at the start of the spool file
        self.store_error: str | None = None
        self.started = False
        self.submitted = False  # handed to the spool's commit: no longer ours to abort
        self.plain = False  # no line of the content begins with "." (set at the end of DATA)

    def received_header(self) -> bytes:
        rcpts = self.envelope.rcpt_tos
        helo = printable(self.session.host_name or "unknown")
        proto = (
            "ESMTPS" if self.session.ssl else ("ESMTP" if self.session.extended_smtp else "SMTP")
        )
        when = _received_date()
        for_clause = f"\r\n\tfor <{printable(rcpts[0])}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ({address_literal(self.server.client_ip)})\r\n"
            f"\tby {self.intake.hostname} (relay) with {proto} id {self.queue_id}{for_clause};"
            f" {when}\r\nX-Relay-Trace: {self.intake.node} {self.queue_id}\r\n"
            + (f"Message-ID: {self.added_message_id}\r\n" if self.added_message_id else "")
        ).encode()

    async def write(self, data: bytes) -> None:
        if not self.header_done:
            self.header += data
            if self.header.startswith(b"\r\n"):  # no header section at all
                self.header_done = self.header_whole = True
                self.header.clear()
            else:
                end = self.header.find(b"\r\n\r\n")
                if end >= 0 or len(self.header) > HEADER_SCAN_LIMIT:
                    self.header_done, self.header_whole = True, end >= 0
                    del self.header[end + 2 if end >= 0 else HEADER_SCAN_LIMIT :]
            if self.held is not None:
                if not self.header_done:
                    self.held += data
                    return
                data = self._release(data)
        await self._store(data)

    def _release(self, last: bytes = b"") -> bytes:
        """The held content, without forged Authentication-Results when its header
        section is whole (a section cut at the scan limit is passed on as it is);
        a message without Message-ID gets one here, in our prefix (SPEC Part 2)."""
        assert self.held is not None
        # the content held so far and `last`, the chunk that completed the header
        # section (most messages: the first chunk, passed on without a copy)
        held = bytes(self.held) + last if self.held else last
        self.held = None
        if self.message_id() is None:  # the probe finds copies by it, on both providers
            self.added_message_id = f"<{self.queue_id}.{self.intake.node}@{self.intake.hostname}>"
        if not self.header_whole or not self.intake.strips:
            return held
        header = bytes(self.header)
        return strip_own(header, self.intake.authserv) + held[len(header) :]

    async def _store(self, data: bytes) -> None:
        if self.store_error:
            return
        spool = self.intake.spool
        try:
            if not self.started:
                self.started = True
                prefix = self.received_header()
                self.prefix_length = len(prefix)
                await spool.write(self.incoming, prefix)
            await spool.write(self.incoming, data)
        except SpoolError as exc:
            self.store_error = str(exc)

    async def abort(self) -> None:
        if not self.submitted:
            self.submitted = True  # once is enough
            await self.intake.spool.abort(self.incoming)

    async def finish(self, parser: DataParser) -> str:
        if self.held is not None:  # the message ended within its header section
            self.header_whole = True
            await self._store(self._release())
        # our prefix never begins a line with ".", nor does removing whole header fields
        self.plain = not parser.dot_lines
        refusal = self._content_refusal(parser)
        if refusal:
            await self.abort()
            return self.intake.rejections.refuse(self.server, "data", *refusal)
        if not self.started:  # an empty message still gets its trace headers
            await self.write(b"")
        judgement = await self.intake.judge(self) if self.intake.verifier else None
        return await self.intake.enqueue(self, parser.size, judgement)

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
        on_queued: Callable[[str, Record], object] | None,
        clock: Callable[[], datetime],
        verifier: Verifier | None = None,
    ):
        self.settings = settings
        self.verifier = verifier
        self.strips = verifier is not None and verifier.add_header
        self.authserv = verifier.authserv if verifier else ""
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

    async def judge(self, msg: Receiving) -> Judgement:
        """The verdict on the stored message: read back whole up to auth.max_dkim_size,
        else its header section only (DKIM and ARC are then not verified)."""
        assert self.verifier is not None
        stored = msg.incoming.size - msg.prefix_length
        whole = stored <= self.verifier.max_dkim_size
        try:
            content = await self.spool.read_back(msg.incoming, msg.prefix_length) if whole else b""
        except SpoolError as exc:
            oplog.error("message unreadable for its authentication check", error=str(exc))
            whole = False
        env = msg.envelope
        return await self.verifier.judge(Message(
            content if whole else bytes(msg.header) + b"\r\n", whole, msg.server.client_ip,
            "" if env.mail_from == "<>" else (env.mail_from or ""), msg.session.host_name or "",
        ))  # fmt: skip

    def plan(
        self, msg: Receiving, size: int, judgement: Judgement | None = None
    ) -> tuple[Record, list[str]]:
        """The envelope record to store (routing plan included) and the discarded rcpts."""
        env = msg.envelope
        table = self.pilots()
        now = self.clock()
        plan: list[PlanEntry] = []
        discarded: list[str] = []
        forwarded_any = False
        for rcpt, params in zip(env.rcpt_tos, env.rcpt_dsn, strict=True):
            resolved = resolve_recipient(rcpt, self.settings)
            assert resolved is not None
            address, forwarded = resolved
            forwarded_any |= forwarded
            r = route(address, table, now, forwarded)
            if r.discarded:
                discarded.append(rcpt)
            for d in r.deliveries:
                entry = PlanEntry(
                    rcpt, d.provider, d.delivered_to, d.role, d.group, d.mode, d.pilot,
                    params.notify, params.orcpt,
                )  # fmt: skip
                plan.append(entry)
        archived = archive_entry(self.settings.archive, plan)
        if archived is not None:
            plan.append(archived)
        record = Record(
            queue_id=msg.queue_id,
            received=utc_ts(now),
            received_epoch=now.timestamp(),
            mail_from="" if env.mail_from == "<>" else (env.mail_from or ""),
            rcpts=tuple(env.rcpt_tos),
            options=tuple(o for o in env.mail_options if o in ("BODY=8BITMIME", "SMTPUTF8")),
            client_ip=msg.server.client_ip,
            message_id=msg.message_id(),
            size=size,
            forwarded=forwarded_any,
            plan=tuple(plan),
            dsn=False,
            auth=judgement.verdict if judgement else None,
            prepend=judgement.prepend if judgement else (),
            ret=env.mail_dsn.ret,
            envid=env.mail_dsn.envid,
        )
        return record, discarded

    async def enqueue(self, msg: Receiving, size: int, judgement: Judgement | None = None) -> str:
        """Store durably, then log and schedule; the reply to send after DATA.

        Once the commit is under way it runs to its end even if the session is
        cancelled (client gone): a message on disk is always also scheduled.
        """
        record, discarded = self.plan(msg, size, judgement)
        if not record.plan:
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

    async def _store(self, msg: Receiving, record: Record, discarded: list[str]) -> str:
        try:
            await self.spool.commit(msg.incoming, record, plain=msg.plain)
        except SpoolError as exc:
            oplog.error("spool commit failed", error=str(exc))
            return self.rejections.refuse(msg.server, "data", Reply.NO_SPACE, "spool write failed")
        try:
            self._accepted(msg, record, discarded)
        except Exception as exc:  # the message is safe on disk: still a 250
            oplog.error("error after queuing a message", queue_id=msg.queue_id,
                        error=repr(exc), exc_info=exc)  # fmt: skip
        return Reply.queued(msg.queue_id)

    def _accepted(self, msg: Receiving, record: Record, discarded: list[str]) -> None:
        extra: dict[str, Any] = {"auth": record.auth.to_dict()} if record.auth else {}
        if msg.added_message_id:
            extra["message_id_added"] = True
        self.log.emit(
            "received", queue_id=msg.queue_id, message_id=record.message_id,
            mail_from=record.mail_from, client_ip=record.client_ip, size=record.size,
            rcpts=list(record.rcpts), plan=[p.to_dict() for p in record.plan],
            forwarded=record.forwarded, **extra,
        )  # fmt: skip
        for rcpt in discarded:
            self.log.emit(
                "discarded", queue_id=msg.queue_id, rcpt=rcpt,
                reason="forwarded copy of a non-pilot: legacy holds the original",
            )  # fmt: skip
        if record.plan and self.on_queued:
            self.on_queued(msg.queue_id, record)
