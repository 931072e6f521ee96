"""Inbound SMTP: check, queue durably, answer. Never talks to a provider.

`RelaySMTP` is the one aiosmtpd subclass: enhanced status codes on every
reply, our own streaming DATA reader, connection limits and timeouts.
`IngressHandler` holds the policy: relay check, limits, loop check, the routing
plan, the durable enqueue, the `received`/`rejected` log events.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import re
import ssl
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd import smtp as smtp_module
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from relay.config import RelaySettings
from relay.dataread import DataError, DataParser
from relay.log import DeliveryLog, oplog, utc_ts
from relay.records import Envelope as Record
from relay.records import PlanEntry
from relay.routing import PilotTable, resolve_recipient, route
from relay.spool import Spool, SpoolError, new_queue_id

READ_CHUNK = 256 * 1024
HEADER_SCAN_LIMIT = 1 << 20
# RFC 5321 §4.5.3.1.4: 512 octets with the CRLF (aiosmtpd compares without it);
# SIZE= (RFC 1870) and SMTPUTF8 (RFC 6531) extend MAIL by 26 and 10.
COMMAND_LIMIT = 512 - 2
MAIL_COMMAND_LIMIT = COMMAND_LIMIT + 26 + 10

# Enhanced status codes (RFC 3463) for aiosmtpd's own replies, by reply code.
_ENHANCED = {
    "221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "421": "4.3.0", "451": "4.3.0", "452": "4.3.1",
    "454": "4.7.0", "500": "5.5.1", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "535": "5.7.8", "550": "5.7.1", "552": "5.3.4",
    "553": "5.1.3", "554": "5.7.0", "555": "5.5.4",
}  # fmt: skip
_HAS_ENHANCED = re.compile(rb"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b")
# aiosmtpd texts that need a different code or wording than the default above.
_REWRITE = {
    b"500 Command line too long": b"500 5.5.2 Line too long",
    b"500 Error: bad syntax": b"500 5.5.2 Error: bad syntax",
    b"220 Ready to start TLS": b"220 2.0.0 Ready to start TLS",
}


class Reply:
    """Named replies (SPEC "Replies"); one place for every code and text."""

    OK_MAIL = "250 2.1.0 Ok"
    OK_RCPT = "250 2.1.5 Ok"
    RELAY_DENIED = "550 5.7.1 Relaying denied"
    BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
    LINE_TOO_LONG = "500 5.5.2 Line too long"
    BARE_NEWLINE = "550 5.5.2 Bare <LF> or <CR> received; use <CR><LF> line endings"
    LOOP = "554 5.4.6 Too many hops (mail loop?)"
    LOOP_TRACE = "554 5.4.6 Mail loop: this relay's own trace header seen"
    NO_SPACE = "452 4.3.1 Insufficient system storage"
    TOO_MANY_CONN = "421 4.7.0 Too many connections, try again later"
    TOO_MANY_CONN_IP = "421 4.7.0 Too many connections from your address, try again later"
    IDLE = "421 4.4.2 Idle timeout, closing connection"
    DATA_SLOW = "421 4.4.2 DATA timeout, closing connection"
    INTERNAL = "451 4.3.0 Internal error, try again later"
    SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
    NO_AUTH = "503 5.5.1 Error: authentication not enabled"
    TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
    NEED_RCPT = "503 5.5.1 Error: need RCPT command"
    DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
    GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"

    @staticmethod
    def queued(queue_id: str) -> str:
        return f"250 2.0.0 Ok: queued as {queue_id}"


def with_enhanced(status: bytes) -> bytes:
    """Give an aiosmtpd reply an enhanced status code if it lacks one."""
    if status in _REWRITE:
        return _REWRITE[status]
    code = status[:3].decode("ascii", "replace")
    if len(status) < 4 or status[3:4] != b" " or code not in _ENHANCED:
        return status
    if _HAS_ENHANCED.match(status):
        return status
    if status.startswith(b"500 Error: command"):
        return b"500 5.5.1 " + status[4:]
    return f"{code} {_ENHANCED[code]} ".encode() + status[4:]


class Connections:
    """Open sessions, total and per client IP (STARTTLS does not count twice)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set[RelaySMTP] = set()


class _CommandLimits(dict[str, int]):
    """Per-session command line limits that stay fixed.

    aiosmtpd keeps them in a class-level dict that every new connection clears
    and every EHLO raises (`['MAIL'] += 26`): after a few EHLOs any MAIL line
    passed, and one client's EHLO changed every other session's limit.
    """

    def __init__(self) -> None:
        super().__init__()
        dict.__setitem__(self, "MAIL", MAIL_COMMAND_LIMIT)

    def __missing__(self, key: str) -> int:
        return COMMAND_LIMIT

    def __setitem__(self, key: str, value: int) -> None:
        pass  # ignore aiosmtpd's per-EHLO increments


class _CachedIntrospection:
    """What aiosmtpd's `SMTP.__init__` asks `inspect` and `dir` on every connection,
    computed once per class: it was 18 % of the event loop's time under load
    (py-spy, bench/dual_bench.sh). Answers are the same: only names starting
    with `auth_`, `handle_` and `smtp_` are looked up, and those live on classes.
    """

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}
        self._signatures: dict[Any, inspect.Signature] = {}

    def _class_names(self, obj: object) -> list[str]:
        cls = type(obj)
        if cls not in self._names:
            self._names[cls] = [n for n in dir(cls) if n.startswith(("auth_", "handle_", "smtp_"))]
        return self._names[cls]

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        return [(n, getattr(obj, n)) for n in self._class_names(obj) if n.startswith("auth_")]

    def dir(self, obj: object) -> list[str]:
        return self._class_names(obj)

    def signature(self, fn: Any) -> inspect.Signature:
        key = (type(fn), getattr(fn, "__func__", fn))
        if key not in self._signatures:
            self._signatures[key] = inspect.signature(fn)
        return self._signatures[key]


_introspection = _CachedIntrospection()


class RelaySMTP(SMTP):
    line_length_limit = 64 * 1024  # stream-reader buffer; commands are still capped at 512
    command_size_limit = COMMAND_LIMIT

    def __init__(self, handler: IngressHandler, **kwargs: Any):
        # aiosmtpd.smtp looks these names up in its module globals at call time; only
        # this class's construction (synchronous) sees the cached answers.
        module = vars(smtp_module)
        saved = module["inspect"]
        module["inspect"], module["dir"] = _introspection, _introspection.dir
        try:
            super().__init__(handler, **kwargs)
        finally:
            module["inspect"] = saved
            del module["dir"]
        self.command_size_limits = _CommandLimits()
        self.handler = handler
        self.counted = False
        self.client_ip = ""
        self._plain_reply = False  # greeting-type replies carry no enhanced code

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply after DATA (shutdown lets these finish)."""
        return self.envelope is not None and bool(self.envelope.mail_from)

    # -- connection accounting ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.counted:  # STARTTLS re-runs connection_made
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        refusal = self.handler.admit(self)
        if refusal:
            transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.handler.release(self)
        if self.session is not None and self.transport is not None:
            super().connection_lost(error)

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Reply.IDLE.encode() + b"\r\n")  # type: ignore[attr-defined]
        super()._timeout_cb()

    def close_with(self, reply: str) -> None:
        """Send a last reply and close (without waiting on a client that does not read)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()

    # -- replies ----------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        await super().push(raw if self._plain_reply else with_enhanced(raw))

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_reply = bool(hostname)  # RFC 2034: not on the EHLO/HELO reply
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_reply = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_reply = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_reply = False

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(Reply.NO_AUTH)  # the relay takes mail; it has no users to log in

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:  # aiosmtpd would start TLS inside TLS
            await self.push(Reply.TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client gave up on the handshake
            oplog.info("inbound STARTTLS handshake failed", client_ip=self.client_ip,
                       error=repr(error.__cause__))  # fmt: skip
            return Reply.INTERNAL  # not sent: aiosmtpd closes the connection
        return await super().handle_exception(error)

    # -- commands -------------------------------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.handler.shutting_down:
            self.close_with(Reply.SHUTDOWN)
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(Reply.NEED_RCPT)
            return
        if arg:
            await self.push(Reply.DATA_SYNTAX)
            return
        refusal = await self.handler.data_refusal(self)
        if refusal:
            await self.push(refusal)
            return
        await self.push(Reply.GO_AHEAD)
        receiving = self.handler.begin_message(self)
        limits = self.handler.settings.limits
        parser = DataParser(
            max_size=limits.max_message_size,
            max_line_length=limits.max_line_length,
            reject_bare=self.handler.settings.bare_newline == "reject",
        )
        failure: Exception | None = None
        try:
            async with asyncio.timeout(limits.data_timeout):
                while not parser.done:
                    chunk = await self._reader.read(READ_CHUNK)
                    if not chunk:
                        raise ConnectionResetError("client closed during DATA")
                    self._reset_timeout()
                    out = parser.feed(chunk)
                    if out and failure is None:
                        try:
                            await receiving.write(out)
                        except Exception as exc:  # a bug: read on to the end, then 451
                            failure = exc
        except TimeoutError:
            await receiving.abort()
            self.handler.log_reject(self.client_ip, "data", Reply.DATA_SLOW, "data timeout")
            self.close_with(Reply.DATA_SLOW)
            return
        except BaseException:
            await receiving.abort()
            raise
        if parser.rest:  # pipelined commands after the final "."
            self._reader._buffer[0:0] = parser.rest  # type: ignore[attr-defined]
        if failure is None:
            try:
                status = await receiving.finish(parser)
            except Exception as exc:
                failure = exc
            except BaseException:
                await receiving.abort()  # a no-op once the message went to the spool
                raise
        if failure is not None:
            await receiving.abort()
            status = await self.handler.internal_error(self, failure)
        self._set_post_data_state()
        await self.push(status)


class Receiving:
    """One message between 354 and the final reply."""

    def __init__(self, handler: IngressHandler, server: RelaySMTP):
        self.handler = handler
        self.server = server
        assert server.envelope is not None and server.session is not None
        self.envelope: Envelope = server.envelope
        self.session: Session = server.session
        self.queue_id = new_queue_id()
        self.incoming = handler.spool.begin(self.queue_id)
        self.header = bytearray()
        self.header_done = False
        self.store_error: str | None = None
        self.started = False
        self.submitted = False  # handed to the spool's commit: no longer ours to abort

    def received_header(self) -> bytes:
        s = self.handler.settings
        rcpts = self.envelope.rcpt_tos
        helo = _CONTROL.sub("?", self.session.host_name or "unknown")
        proto = (
            "ESMTPS" if self.session.ssl else ("ESMTP" if self.session.extended_smtp else "SMTP")
        )
        when = format_datetime(datetime.now(UTC))
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ([{self.server.client_ip}])\r\n"
            f"\tby {s.listen.hostname} (relay) with {proto} id {self.queue_id}{for_clause};"
            f" {when}\r\nX-Relay-Trace: {self.handler.node} {self.queue_id}\r\n"
        ).encode("utf-8", "surrogateescape")

    async def write(self, data: bytes) -> None:
        if not self.header_done:
            self.header += data
            if self.header.startswith(b"\r\n"):  # no header section at all
                self.header_done = True
                self.header.clear()
            else:
                end = self.header.find(b"\r\n\r\n")
                if end >= 0 or len(self.header) > HEADER_SCAN_LIMIT:
                    self.header_done = True
                    del self.header[end + 2 if end >= 0 else HEADER_SCAN_LIMIT :]
        if self.store_error:
            return
        try:
            if not self.started:
                self.started = True
                await self.handler.spool.write(self.incoming, self.received_header())
            await self.handler.spool.write(self.incoming, data)
        except SpoolError as exc:
            self.store_error = str(exc)

    async def abort(self) -> None:
        if not self.submitted:
            self.submitted = True  # once is enough
            await self.handler.spool.abort(self.incoming)

    async def finish(self, parser: DataParser) -> str:
        refusal = self._content_refusal(parser)
        if refusal:
            await self.abort()
            return await self.handler.reject(self.server, "data", *refusal)
        if not self.started:  # an empty message still gets its trace headers
            await self.write(b"")
        return await self.handler.enqueue(self, parser.size)

    def _content_refusal(self, parser: DataParser) -> tuple[str, str] | None:
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
        if self.handler.node in traces:
            return Reply.LOOP_TRACE, "own trace header"
        if hops > self.handler.settings.limits.max_hops:
            return Reply.LOOP, f"{hops} hops"
        return None

    def message_id(self) -> str | None:
        m = re.search(
            rb"(?im)^message-id:[ \t]*((?:.|\r\n[ \t])*?)\r\n(?![ \t])", bytes(self.header)
        )
        return m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace") if m else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def scan_trace(header: bytes) -> tuple[int, set[str]]:
    """(number of Received: headers, node names in X-Relay-Trace headers)."""
    hops = len(re.findall(rb"(?im)^received:", header))
    nodes = {
        m.decode("utf-8", "replace")
        for m in re.findall(rb"(?im)^x-relay-trace:[ \t]*(\S+)", header)
    }
    return hops, nodes


class IngressHandler:
    """Policy for every SMTP command; the one place that decides replies."""

    def __init__(
        self,
        settings: RelaySettings,
        spool: Spool,
        log: DeliveryLog,
        pilots: Callable[[], PilotTable],
        on_queued: Callable[[str, Record], object] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.settings = settings
        self.spool = spool
        self.log = log
        self.node = log.node
        self.pilots = pilots
        self.on_queued = on_queued
        self.clock = clock
        self.conns = Connections()
        self.shutting_down = False
        self.storing: set[asyncio.Future[str]] = set()
        self.forward_nets = [
            ipaddress.ip_network(n, strict=False) for n in settings.forward_networks
        ]

    # -- connections -------------------------------------------------------------

    def admit(self, server: RelaySMTP) -> str | None:
        per_ip = self.conns.per_ip
        limits = self.settings.limits
        refusal = None
        if self.shutting_down:
            refusal = Reply.SHUTDOWN
        elif self.conns.total >= limits.max_connections:
            refusal = Reply.TOO_MANY_CONN
        elif per_ip[server.client_ip] >= limits.max_connections_per_ip:
            refusal = Reply.TOO_MANY_CONN_IP
        if refusal:
            reason = "shutting down" if refusal == Reply.SHUTDOWN else "connection limit"
            self.log_reject(server.client_ip, "connect", refusal, reason)
            return refusal
        self.conns.total += 1
        per_ip[server.client_ip] += 1
        self.conns.sessions.add(server)
        return None

    def release(self, server: RelaySMTP) -> None:
        per_ip = self.conns.per_ip
        self.conns.total -= 1
        per_ip[server.client_ip] -= 1
        if per_ip[server.client_ip] <= 0:
            del per_ip[server.client_ip]
        self.conns.sessions.discard(server)

    # -- aiosmtpd hooks ------------------------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        first, *middle, last = responses  # "250-<hostname>", ..., "250 HELP"
        size = f"250-SIZE {self.settings.limits.max_message_size}"
        middle = [r for r in middle if not r.startswith("250-AUTH")]  # no AUTH here
        return [first, size, *middle, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        size = next((o[5:] for o in options if o.startswith("SIZE=")), "")
        if size.isdigit() and int(size) > self.settings.limits.max_message_size:
            return await self.reject(server, "mail", Reply.TOO_BIG, "declared size too big")
        if not await self.spool.has_room(self.settings.limits.min_free_space):
            return await self.reject(server, "mail", Reply.NO_SPACE, "spool full")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply.OK_MAIL

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        if address == "<>" or ("@" not in address and address.lower() != "postmaster"):
            return await self.reject(server, "rcpt", Reply.BAD_ADDRESS, "malformed address")
        if len(envelope.rcpt_tos) >= self.settings.limits.max_recipients:
            return await self.reject(server, "rcpt", Reply.TOO_MANY_RCPTS, "too many recipients")
        resolved = resolve_recipient(address, self.settings)
        if resolved is None:
            return await self.reject(server, "rcpt", Reply.RELAY_DENIED, "relay denied")
        if resolved[1] and self.forward_nets and not self._from_forward_net(server.client_ip):
            return await self.reject(
                server, "rcpt", Reply.RELAY_DENIED, "forward domain from outside forward_networks"
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply.OK_RCPT

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        oplog.error("smtp session error", error=repr(error), exc_info=error)
        return Reply.INTERNAL

    async def internal_error(self, server: RelaySMTP, error: Exception) -> str:
        """A fault while taking a message: the client gets a 4xx and tries again later."""
        oplog.error("error while receiving a message", error=repr(error), exc_info=error)
        return await self.reject(server, "data", Reply.INTERNAL, "internal error")

    def _from_forward_net(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.forward_nets)

    # -- DATA --------------------------------------------------------------------------

    async def data_refusal(self, server: RelaySMTP) -> str | None:
        if not await self.spool.has_room(self.settings.limits.min_free_space):
            return await self.reject(server, "data", Reply.NO_SPACE, "spool full")
        return None

    def begin_message(self, server: RelaySMTP) -> Receiving:
        return Receiving(self, server)

    def plan(self, msg: Receiving, size: int) -> tuple[Record, list[str]]:
        """The envelope record to store (routing plan included) and the discarded rcpts."""
        env = msg.envelope
        table = self.pilots()
        now = self.clock()
        plan: list[PlanEntry] = []
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
                    PlanEntry(rcpt, d.provider, d.delivered_to, d.role, d.group, d.mode, d.pilot)
                )
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
        )
        return record, discarded

    async def enqueue(self, msg: Receiving, size: int) -> str:
        """Store durably, then log and schedule; the reply to send after DATA.

        Once the commit is under way it runs to its end even if the session is
        cancelled (client gone): a message on disk is always also scheduled.
        """
        record, discarded = self.plan(msg, size)
        if not record.plan:
            await msg.abort()
            self._accepted(msg, record, discarded)
            return Reply.queued(msg.queue_id)
        msg.submitted = True
        task = asyncio.ensure_future(self._store(msg, record, discarded))
        self.storing.add(task)
        task.add_done_callback(self._stored)
        return await asyncio.shield(task)

    def _stored(self, task: asyncio.Future[str]) -> None:
        self.storing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            oplog.error("error while queuing a message", error=repr(exc), exc_info=exc)

    async def _store(self, msg: Receiving, record: Record, discarded: list[str]) -> str:
        try:
            await self.spool.commit(msg.incoming, record)
        except SpoolError as exc:
            oplog.error("spool commit failed", error=str(exc))
            return await self.reject(msg.server, "data", Reply.NO_SPACE, "spool write failed")
        try:
            self._accepted(msg, record, discarded)
        except Exception as exc:  # the message is safe on disk: still a 250
            oplog.error("error after queuing a message", queue_id=msg.queue_id,
                        error=repr(exc), exc_info=exc)  # fmt: skip
        return Reply.queued(msg.queue_id)

    def _accepted(self, msg: Receiving, record: Record, discarded: list[str]) -> None:
        self.log.emit(
            "received", queue_id=msg.queue_id, message_id=record.message_id,
            mail_from=record.mail_from, client_ip=record.client_ip, size=record.size,
            rcpts=list(record.rcpts), plan=[p.to_dict() for p in record.plan],
            forwarded=record.forwarded,
        )  # fmt: skip
        for rcpt in discarded:
            self.log.emit(
                "discarded", queue_id=msg.queue_id, rcpt=rcpt,
                reason="forwarded copy of a non-pilot: legacy holds the original",
            )  # fmt: skip
        if record.plan and self.on_queued:
            self.on_queued(msg.queue_id, record)

    # -- rejections ------------------------------------------------------------------

    async def reject(self, server: RelaySMTP, stage: str, reply: str, reason: str) -> str:
        self.log_reject(server.client_ip, stage, reply, reason)
        return reply

    def log_reject(self, client_ip: str, stage: str, reply: str, reason: str) -> None:
        code, enhanced, _ = reply.split(" ", 2)
        self.log.emit(
            "rejected", client_ip=client_ip, stage=stage, smtp_code=int(code),
            enhanced_code=enhanced, reason=reason,
        )  # fmt: skip


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
        self.tls = tls_context(self.settings)
        self.server: asyncio.Server | None = None
        self.sock = sock

    def _factory(self) -> RelaySMTP:
        s = self.settings
        return RelaySMTP(
            self.handler,
            data_size_limit=None,  # SIZE is advertised and checked by the handler
            enable_SMTPUTF8=True,
            hostname=s.listen.hostname,
            ident="ESMTP relay",
            tls_context=self.tls,
            timeout=s.limits.idle_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self, reuse_port: bool = False) -> int:
        """Listen; `reuse_port`: worker processes share the port (SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self.server = await loop.create_server(self._factory, sock=self.sock)
        else:
            self.server = await loop.create_server(
                self._factory,
                host=self.settings.listen.host,
                port=self.settings.listen.port,
                reuse_port=reuse_port or None,
            )
        return int(self.server.sockets[0].getsockname()[1])

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; let transactions finish up to `timeout`; 421 the rest."""
        self.handler.shutting_down = True
        if self.server:
            self.server.close()
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
        if self.handler.storing:
            await asyncio.wait(set(self.handler.storing), timeout=max(0.5, timeout))
