"""One inbound SMTP session: the SMTP engine (engine.py) with the relay's dialogue.

`RelaySMTP` puts an enhanced status code on every reply, offers the relay's
capabilities, keeps command lines to RFC 5321's length, answers the idle and
DATA timeouts, ends a session that makes too many errors, lets junk commands
keep it alive only so long, and reads DATA with our own streaming parser.
What to accept it asks its `SessionPolicy` (the `IngressHandler`); its limits
it is given as `SessionLimits`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from relay import dsn
from relay.config import RelaySettings
from relay.ingress.dataread import DataParser
from relay.ingress.engine import Handler, SMTPEngine, TLSSetupException, syntax
from relay.ingress.replies import Reply, with_enhanced
from relay.ingress.sockets import client_address
from relay.log import oplog

READ_CHUNK = 256 * 1024
# RFC 5321 §4.5.3.1.4: 512 octets with the CRLF (the engine compares without it);
# SIZE= (RFC 1870) and SMTPUTF8 (RFC 6531) extend MAIL by 26 and 10. The DSN
# parameters (RFC 3461 §4) have room of their own, counted only for what they take.
COMMAND_LIMIT = 512 - 2
MAIL_COMMAND_LIMIT = COMMAND_LIMIT + 26 + 10
_READ_LIMITS = {"MAIL": MAIL_COMMAND_LIMIT + dsn.MAIL_ROOM, "RCPT": COMMAND_LIMIT + dsn.RCPT_ROOM}
# Commands that do nothing for a transaction (Postfix's junk commands, plus HELP and
# repeated greetings): past `junk_command_limit` they no longer restart the idle timer.
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO"})
# The stage a session-level refusal (too many errors) is logged under, by last command.
_STAGE_OF_COMMAND = {"MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}


@dataclass(frozen=True)
class SessionLimits:
    """What a session enforces by itself: DATA limits, error and junk-command limits."""

    max_message_size: int
    max_line_length: int
    data_timeout: float
    reject_bare: bool  # bare LF/CR refused (`bare_newline: reject`), not normalised
    hard_error_limit: int  # error replies, then 421 and close (reset by an accepted message)
    junk_command_limit: int  # junk commands that still restart the idle timer

    @classmethod
    def of(cls, settings: RelaySettings) -> SessionLimits:
        limits = settings.limits
        return cls(
            max_message_size=limits.max_message_size,
            max_line_length=limits.max_line_length,
            data_timeout=limits.data_timeout,
            reject_bare=settings.bare_newline == "reject",
            hard_error_limit=limits.hard_error_limit,
            junk_command_limit=limits.junk_command_limit,
        )


class MessageSink(Protocol):
    """Where one message's DATA goes after the 354 (`receiving.Receiving`)."""

    async def write(self, data: bytes) -> None: ...

    async def abort(self) -> None: ...

    async def finish(self, parser: DataParser) -> str: ...


class SessionPolicy(Handler, Protocol):
    """What a session asks the relay (`server.IngressHandler` answers).

    It is also the engine's handler: its `handle_*` hooks answer MAIL, RCPT, EHLO.
    """

    shutting_down: bool

    def admit(self, server: RelaySMTP) -> str | None: ...

    def release(self, server: RelaySMTP) -> None: ...

    async def data_refusal(self, server: RelaySMTP) -> str | None: ...

    def begin_message(self, server: RelaySMTP) -> MessageSink: ...

    async def internal_error(self, server: RelaySMTP, error: Exception) -> str: ...

    def log_reject(self, server: RelaySMTP, stage: str, reply: str, reason: str) -> None: ...


def capabilities(responses: list[str], max_size: int) -> list[str]:
    """The EHLO reply: the engine's, with SIZE, PIPELINING, ENHANCEDSTATUSCODES, DSN."""
    first, *middle, last = responses  # "250-<hostname>", ..., "250 HELP"
    extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
    return [first, f"250-SIZE {max_size}", *middle, *extra, last]


class RelaySMTP(SMTPEngine):
    """One client connection, from the greeting (or a 421) to its close."""

    def __init__(self, policy: SessionPolicy, limits: SessionLimits, **kwargs: Any):
        super().__init__(
            policy,
            command_limit=COMMAND_LIMIT, command_limits=_READ_LIMITS, **kwargs,
        )  # fmt: skip
        self.policy = policy
        self.limits = limits
        self.counted = False
        self.client_ip = ""
        self._plain_reply = False  # greeting-type replies carry no enhanced code
        self._held: list[bytes] | None = None  # reply lines to write at once (EHLO)
        self.command = ""  # the last recognised command
        self.errors = 0  # 4xx/5xx replies since the session began or last queued a message
        self.junk = 0  # JUNK_COMMANDS so far

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply after DATA (shutdown lets these finish)."""
        return self.envelope is not None and bool(self.envelope.mail_from)

    # -- connection accounting ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client_ip = client_address(peer[0]) if peer else ""
        refusal = self.policy.admit(self)
        if refusal:
            transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.policy.release(self)
        super().connection_lost(error)

    def on_idle_timeout(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Reply.IDLE.encode() + b"\r\n")

    # -- replies ----------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        reply = raw if self._plain_reply else with_enhanced(raw)
        if self._held is not None:
            self._held.append(reply + b"\r\n")
        else:
            await super().push(reply)
        if reply[:1] in (b"4", b"5"):
            self.errors += 1
            if self.errors >= self.limits.hard_error_limit:  # Postfix smtpd_hard_error_limit
                stage = _STAGE_OF_COMMAND.get(self.command, "connect")
                self.policy.log_reject(self, stage, Reply.TOO_MANY_ERRORS, "too many errors")
                await self._release_held()
                self.end_session(Reply.TOO_MANY_ERRORS)

    async def _release_held(self) -> None:
        held, self._held = self._held, None
        if held:
            await self.write_raw(b"".join(held))

    def on_command(self, name: str) -> None:
        self.command = name
        if name in JUNK_COMMANDS:
            self.junk += 1
            if self.junk > self.limits.junk_command_limit:
                self.keep_idle_deadline()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        self._plain_reply = bool(hostname)  # RFC 2034: not on the EHLO/HELO reply
        # the engine pushes each line of the reply: held and written at once
        self._held = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_reply = False
            await self._release_held()

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        self._plain_reply = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_reply = False

    async def smtp_AUTH(self, arg: str | None) -> None:
        await self.push(Reply.NO_AUTH)  # the relay takes mail; it has no users to log in

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_active:  # never TLS inside TLS
            await self.push(Reply.TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client gave up on the handshake
            oplog.info("inbound STARTTLS handshake failed", client_ip=self.client_ip,
                       error=repr(error.__cause__))  # fmt: skip
            return Reply.INTERNAL  # not sent: the engine closes the connection
        return await super().handle_exception(error)

    # -- commands -------------------------------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.policy.shutting_down:
            self.close_with(Reply.SHUTDOWN)
            return
        taken = await self._dsn_parameters("MAIL", arg, dsn.MAIL_KEYWORDS, MAIL_COMMAND_LIMIT)
        if taken is None:
            return
        arg, tokens = taken
        try:
            params = dsn.parse_mail(tokens)
        except dsn.DsnSyntaxError as exc:
            await self.push(f"{Reply.DSN_SYNTAX} ({exc})")
            return
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from:
            self.envelope.mail_dsn = params

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        taken = await self._dsn_parameters("RCPT", arg, dsn.RCPT_KEYWORDS, COMMAND_LIMIT)
        if taken is None:
            return
        arg, tokens = taken
        envelope = self.envelope
        if tokens and envelope is not None and envelope.mail_from:  # else the engine's 503
            try:
                params = dsn.parse_rcpt(tokens)
            except dsn.DsnSyntaxError as exc:
                await self.push(f"{Reply.DSN_SYNTAX} ({exc})")
                return
        else:
            params = dsn.RcptDsn()
        before = len(envelope.rcpt_tos) if envelope is not None else 0
        await super().smtp_RCPT(arg)
        if envelope is not None and len(envelope.rcpt_tos) > before:
            envelope.rcpt_dsn.append(params)

    async def _dsn_parameters(
        self, verb: str, arg: str | None, keywords: frozenset[str], limit: int
    ) -> tuple[str | None, list[str]] | None:
        """(the argument without its DSN parameters, those parameters), or None once
        refused: a line over `limit` octets without them is too long (the engine
        read up to `limit` plus the DSN room)."""
        if arg is None or self.session is None or not self.session.extended_smtp:
            return arg, []
        rest, tokens = dsn.split_parameters(arg, keywords)
        octets = len(verb) + 1 + len(rest.encode("utf-8", "surrogateescape"))
        if octets > limit:
            await self.push(Reply.LINE_TOO_LONG)
            return None
        return rest, tokens

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(Reply.NEED_RCPT)
            return
        if arg:
            await self.push(Reply.DATA_SYNTAX)
            return
        refusal = await self.policy.data_refusal(self)
        if refusal:
            await self.push(refusal)
            return
        await self.push(Reply.GO_AHEAD)
        receiving = self.policy.begin_message(self)
        limits = self.limits
        parser = DataParser(
            max_size=limits.max_message_size,
            max_line_length=limits.max_line_length,
            reject_bare=limits.reject_bare,
        )
        failure: Exception | None = None
        # the whole DATA phase: a wait for the client's bytes past it is a timeout
        # (the engine's timer, not an asyncio.timeout per message)
        deadline = self.loop.time() + limits.data_timeout
        try:
            while not parser.done:
                chunk = await self.read_some(READ_CHUNK, deadline)
                if not chunk:
                    raise ConnectionResetError("client closed during DATA")
                self.restart_idle_timer()
                out = parser.feed(chunk)
                if out and failure is None:
                    try:
                        await receiving.write(out)
                    except Exception as exc:  # a bug: read on to the end, then 451
                        failure = exc
        except TimeoutError:
            await receiving.abort()
            self.policy.log_reject(self, "data", Reply.DATA_SLOW, "data timeout")
            self.close_with(Reply.DATA_SLOW)
            return
        except BaseException:
            await receiving.abort()
            raise
        if parser.rest:  # pipelined commands after the final "."
            self.unread(parser.rest)
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
            status = await self.policy.internal_error(self, failure)
        self.end_transaction()
        if status.startswith("250"):
            self.errors = 0  # "errors without delivering mail", as Postfix counts them
        await self.push(status)
