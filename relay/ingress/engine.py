"""The ingress's SMTP engine: the command loop, the replies and the standard commands.

Our own rather than aiosmtpd's `SMTP` (issue 20): aiosmtpd builds a
StreamReader, a StreamWriter and per-connection method tables for every
connection and runs a log call, a timer re-arm and two layers of writes per
command, about 350 µs of CPU a session against a message's ~2 ms
(bench/ingress_cost.py, docs/performance.md). The dialogue is aiosmtpd's,
reply for reply (its texts; `replies.with_enhanced` gives them enhanced codes),
so clients see the server they saw before; the parts of aiosmtpd the ingress
never used are not here (AUTH mechanisms, PROXY, per-command call limits,
required STARTTLS, decoded data, a fixed SIZE).

One task per connection reads command lines from a buffer that
`data_received` fills; a command's method runs to its end before the next
line is read (pipelined commands wait in the buffer, reading pauses past
`HIGH_WATER`). The idle deadline is kept as a time and checked when its timer
fires, so a command moves it without re-arming a timer.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, Protocol, TypeVar, cast

from relay.dsn import MailDsn, RcptDsn
from relay.mailbox import PLAIN

BOGUS_LIMIT = 5  # unrecognised commands, then 502 and close (aiosmtpd's figure)
LINE_LIMIT = 64 * 1024  # a longer line is read to its end and refused (commands are capped lower)
HIGH_WATER = 256 * 1024 + LINE_LIMIT  # buffered client bytes above which reading pauses
# `<plain mailbox>` with no comment after it: the path nearly every MAIL and RCPT
# carries, answered without the `email` header parser (same answer:
# tests/test_mailbox_fastpath.py checks it against aiosmtpd's parser).
_SIMPLE_PATH = re.compile(rf"[ \t]*<({PLAIN})>")
_F = TypeVar("_F", bound=Callable[..., Any])


class TLSSetupException(Exception):
    """The client's TLS handshake after STARTTLS failed (the cause is chained)."""


class Session:
    """What a connection has said about itself (HELO name, ESMTP, TLS)."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.ssl: dict[str, Any] | None = None  # set once STARTTLS's handshake is done
        self.host_name: str | None = None
        self.extended_smtp = False


class Envelope:
    """One transaction: MAIL, each RCPT, and their RFC 3461 parameters (relay/dsn.py)."""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.mail_dsn = MailDsn()
        self.rcpt_dsn: list[RcptDsn] = []  # one per `rcpt_tos` entry


class Handler(Protocol):
    """The hooks that decide EHLO, MAIL, RCPT and RSET, and explain an error."""

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]: ...  # fmt: skip

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str: ...  # fmt: skip

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str: ...  # fmt: skip

    async def handle_RSET(self, server: Any, session: Session, envelope: Envelope) -> str: ...

    async def handle_exception(self, error: Exception) -> str: ...


def syntax(text: str, extended: str | None = None, when: str | None = None) -> Callable[[_F], _F]:
    """The HELP text of an `smtp_*` command (`extended`: added for an ESMTP session;
    `when`: the attribute that must be true for the command to be offered)."""

    def mark(fn: _F) -> _F:
        fn.__smtp_syntax__ = (text, extended, when)  # type: ignore[attr-defined]
        return fn

    return mark


def parse_path(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """(address, the rest) of a MAIL/RCPT/VRFY argument, as aiosmtpd's `_getaddr`:
    ('', '') for nothing, (None, None) for what does not parse."""
    if not arg:
        return "", ""
    m = _SIMPLE_PATH.match(arg)
    if m is not None and "(" not in arg[m.end() :]:
        address, rest = m.group(1), arg[m.end() :].lstrip(" \t")
    else:
        try:
            token, rest = (get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec)(arg)
        except HeaderParseError:
            return None, None
        address = token.addr_spec
    if local_part_limit and len(address.rpartition("@")[0]) > local_part_limit:
        return None, None
    return address, rest


def parse_params(params: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters as a dict (a bare keyword is True); None if one is malformed."""
    result: dict[str, str | bool] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        result[key] = value if eq else True
    return result


class SMTPEngine(asyncio.Protocol):
    """One client connection: the greeting, then a command at a time until it closes."""

    local_part_limit = 0  # RFC 5321's 64 is not enforced (nor by aiosmtpd)

    def __init__(
        self,
        handler: Handler,
        *,
        hostname: str,
        ident: str,
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
        command_limit: int,
        command_limits: dict[str, int],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.handler = handler
        self.hostname = hostname
        self.ident = ident
        self.tls_context = tls_context
        self.loop = loop
        self.command_limit = command_limit
        self.command_limits = command_limits  # per command, once the session is ESMTP
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.transport: asyncio.Transport | None = None
        self._timeout = timeout
        self._deadline = 0.0
        self._replaced: float | None = None  # the deadline the last restart replaced
        self._timer: asyncio.TimerHandle | None = None  # at or before the nearest deadline
        self._read_deadline: float | None = None  # of the read waiting now (DATA's)
        self._buffer = bytearray()
        # a chunk received while nothing was buffered, kept as it came (never both
        # this and `_buffer`): DATA's reads take it without two copies
        self._chunk = b""
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._reading_paused = False
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        self._task: asyncio.Task[None] | None = None
        self._tls = False

    # -- the connection -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.session = Session(transport.get_extra_info("peername"))
        self.envelope = self.new_envelope()
        self.restart_idle_timer()
        self._task = self.loop.create_task(self._run())

    def connection_lost(self, error: Exception | None) -> None:
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._cancel()

    def eof_received(self) -> bool:
        """The client half-closed: the session ends (as aiosmtpd's did)."""
        self._eof = True
        self._wake()
        self._cancel()
        return False  # the transport closes itself

    def data_received(self, data: bytes) -> None:
        if not self._buffer and not self._chunk:
            self._chunk = data
        else:
            self._merge()
            self._buffer += data
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _taken(self) -> None:
        """Bytes left the buffer: reading goes on once it is low again."""
        if self._reading_paused and self._buffered <= HIGH_WATER // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _more(self, deadline: float | None = None) -> bool:
        """Wait for more client bytes; False at the end of the connection.
        TimeoutError once the loop's clock passes `deadline`."""
        if self._eof:
            return False
        if deadline is not None:
            if self.loop.time() >= deadline:
                raise TimeoutError
            self._read_deadline = deadline
            self._arm()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._read_deadline = None
        return True

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    # -- reading --------------------------------------------------------------------

    @property
    def _buffered(self) -> int:
        return len(self._chunk) + len(self._buffer)

    def _merge(self) -> None:
        """The kept chunk into the buffer (for line reading)."""
        if self._chunk:
            self._buffer += self._chunk
            self._chunk = b""

    def _clear(self) -> None:
        self._chunk = b""
        self._buffer.clear()

    async def _read_line(self) -> bytes | None:
        """The next line with its line ending; None for one over LINE_LIMIT (read to
        its end and dropped); b"" at the end of the connection."""
        buf = self._buffer
        too_long = False
        start = 0
        while True:
            self._merge()
            end = buf.find(b"\n", start)
            if end >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                self._taken()
                return None if too_long or len(line) > LINE_LIMIT else line
            if len(buf) > LINE_LIMIT:
                too_long = True
                buf.clear()
                self._taken()
            start = len(buf)
            if not await self._more():
                return b""

    async def read_some(self, n: int, deadline: float | None = None) -> bytes:
        """Up to `n` octets from the client, as they come (the end of the connection:
        b""); TimeoutError if none came by `deadline` (the loop's clock)."""
        while not self._buffer and not self._chunk:
            if not await self._more(deadline):
                return b""
        if self._chunk:  # the chunk as it came (the buffer is empty)
            data, self._chunk = self._chunk[:n], self._chunk[n:]
            self._taken()
            return data
        buf = self._buffer
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._taken()
        return data

    def unread(self, data: bytes) -> None:
        """Give back what was read past the end of DATA (pipelined commands)."""
        self._merge()
        self._buffer[0:0] = data

    # -- writing --------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Write one reply line (its CRLF added); waits while the client is not reading."""
        raw = status.encode("utf-8") if isinstance(status, str) else status
        await self.write_raw(raw + b"\r\n")

    async def write_raw(self, data: bytes) -> None:
        """Write reply lines as they are (CRLFs included)."""
        if self.closing:
            return
        assert self.transport is not None
        self.transport.write(data)
        if self._drained is not None and not self._drained.done():
            await self._drained

    def close_with(self, reply: str) -> None:
        """Send a last reply and close (without waiting on a client that does not read)."""
        if self.closing:
            return
        assert self.transport is not None
        self.transport.write(reply.encode() + b"\r\n")
        self.transport.close()

    def end_session(self, reply: str) -> None:
        """From inside a command: `close_with`, and nothing the client pipelined after it runs."""
        self.close_with(reply)
        self._clear()
        self._cancel()

    def _cancel(self) -> None:
        """End the command loop, once: an EOF and then the close (or a reply that
        ends the session and then the close) must not cancel its clean-up too."""
        if self._task is not None and not self._task.done() and not self._task.cancelling():
            self._task.cancel()

    # -- the idle timer -----------------------------------------------------------------

    def restart_idle_timer(self) -> None:
        """The client is active: the idle timeout starts again."""
        self._replaced = self._deadline or None
        self._deadline = self.loop.time() + self._timeout
        if self._timer is None:
            self._arm()

    def keep_idle_deadline(self) -> None:
        """The command just started is no sign of life: the deadline stays what it was."""
        if self._replaced is None:
            return
        self._deadline = self._replaced
        self._arm()

    def _arm(self) -> None:
        """The timer at the nearest deadline, unless it is already set before it (it
        then finds the deadline moved and sets itself again: a deadline moved later,
        as each command moves the idle one, re-arms nothing)."""
        when = self._deadline
        if self._read_deadline is not None and self._read_deadline < when:
            when = self._read_deadline
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing:
            return
        now = self.loop.time()
        if self._read_deadline is not None and now >= self._read_deadline:
            self._read_deadline = None
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError())
        if now < self._deadline:  # moved since the timer was set
            self._arm()
            return
        self.on_idle_timeout()
        assert self.transport is not None
        self.transport.close()

    def on_idle_timeout(self) -> None:
        """The idle timeout: the connection is closed right after."""

    # -- the command loop ---------------------------------------------------------------

    def new_envelope(self) -> Envelope:
        return Envelope()

    def end_transaction(self) -> None:
        """After the reply to DATA (and at RSET, HELO, EHLO): a new, empty envelope."""
        self.envelope = self.new_envelope()

    def on_command(self, name: str) -> None:
        """A recognised command starts; the idle timer has just been restarted for it."""

    async def handle_exception(self, error: Exception) -> str:
        return await self.handler.handle_exception(error)

    async def _run(self) -> None:
        try:
            await self.push(f"220 {self.hostname} {self.ident}")
            bogus = BOGUS_LIMIT
            while not self.closing:
                line = await self._read_line()
                if line == b"":
                    break
                try:
                    bogus = await self._command(line, bogus)
                except TLSSetupException as error:  # no reply: the client gave up on TLS
                    await self.handle_exception(error)
                    self._close()
                except ConnectionError:  # (a cancellation is no Exception: it goes on too)
                    raise
                except Exception as error:
                    try:
                        status = await self.handle_exception(error)
                    except Exception as inner:
                        status = f"500 Error: ({type(inner).__name__}) {inner}"
                    await self.push(status)
        except ConnectionError:
            pass
        finally:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _command(self, line: bytes | None, bogus: int) -> int:
        """Run one command line; returns the unrecognised-command budget left."""
        if line is None:
            await self.push("500 Command line too long")
            return bogus
        line = line.rstrip(b"\r\n")
        if not line:
            await self.push("500 Error: bad syntax")
            return bogus
        verb, _, arg_bytes = line.partition(b" ")
        try:
            command = verb.upper().decode("ascii")
        except UnicodeDecodeError:
            await self.push("500 Error: bad syntax")
            return bogus
        # an argument keeps its octets (UTF-8 or not) through surrogateescape
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        assert self.session is not None
        limit = (
            self.command_limits.get(command, self.command_limit)
            if self.session.extended_smtp
            else self.command_limit
        )
        if len(line) > limit:
            await self.push("500 Command line too long")
            return bogus
        method = getattr(self, "smtp_" + command, None) if command.isalpha() else None
        if method is None:
            bogus -= 1
            if bogus < 1:
                await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._close()
                return bogus
            await self.push(f'500 Error: command "{command}" not recognized')
            return bogus
        self.restart_idle_timer()
        self.on_command(command)
        await method(arg)
        return bogus

    # -- the commands ---------------------------------------------------------------------

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        """True (after a 503) when the client has not said HELO or EHLO."""
        assert self.session is not None
        if not self.session.host_name:
            await self.push(f"503 Error: send {helo} first")
            return True
        return False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 Syntax: HELO hostname")
            return
        assert self.session is not None
        self.end_transaction()
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        assert self.session is not None
        response = [f"250-{self.hostname}"]
        self.end_transaction()
        self.session.extended_smtp = True
        response += ["250-8BITMIME", "250-SMTPUTF8"]
        if self.tls_context and not self._tls:
            response.append("250-STARTTLS")
        response.append("250 HELP")
        assert self.envelope is not None
        for r in await self.handler.handle_EHLO(
            self, self.session, self.envelope, hostname, response
        ):
            await self.push(r)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 OK")

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        await self.push("221 Bye")
        self._close()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        # RFC 3207 §4.2: what the client sent before the handshake (commands
        # pipelined after STARTTLS, an injection) is discarded, never run
        self._clear()
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(
                self.transport, self, self.tls_context, server_side=True
            )
        except Exception as error:  # an SSL error, a reset, a timeout
            raise TLSSetupException() from error
        if transport is None:  # closed during the handshake
            raise TLSSetupException() from ConnectionResetError("closed during the handshake")
        # (not cleared again here: the client's first command may already be in
        # the buffer, decrypted in the same pass as the end of the handshake)
        self.transport = cast(asyncio.Transport, transport)
        self._reading_paused = False
        self._tls = True
        self.session = Session(transport.get_extra_info("peername"))
        self.session.ssl = {"cipher": transport.get_extra_info("cipher")}
        self.end_transaction()
        self.restart_idle_timer()

    @property
    def tls_active(self) -> bool:
        """TLS is up on this connection (a second STARTTLS must be refused)."""
        return self._tls

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        code = 250
        if arg:
            found = self._syntax(arg.upper())
            if found is not None:
                text, extended = found
                assert self.session is not None
                if self.session.extended_smtp and extended:
                    text += extended
                await self.push("250 Syntax: " + text)
                return
            code = 501
        names = sorted(
            n[5:] for n in dir(type(self)) if n.startswith("smtp_") and self._syntax(n[5:])
        )
        await self.push(f"{code} Supported commands: {' '.join(names)}")

    def _syntax(self, command: str) -> tuple[str, str | None] | None:
        """(text, extended text) of a command HELP offers now; None for any other."""
        method = getattr(type(self), "smtp_" + command, None) if command.isalpha() else None
        marked = getattr(method, "__smtp_syntax__", None)
        if marked is None:
            return None
        text, extended, when = marked
        if when and not getattr(self, when):
            return None
        return text, extended

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 Syntax: VRFY <address>")
            return
        address, _ = parse_path(arg, self.local_part_limit)
        if address is None:
            await self.push("502 Could not VRFY " + arg)
            return
        await self.push("252 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 EXPN not implemented")

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 Syntax: RSET")
            return
        self.end_transaction()
        assert self.session is not None and self.envelope is not None
        await self.push(await self.handler.handle_RSET(self, self.session, self.envelope))

    def _path_argument(self, keyword: str, arg: str | None) -> tuple[str, list[str]] | str:
        """(address, its parameters) of MAIL/RCPT, or the refusal to send."""
        assert self.session is not None
        syntaxerr = f"501 Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}: <address>"
        if self.session.extended_smtp:
            syntaxerr += " [SP <mail-parameters>]"
        if arg is None or arg[: len(keyword)].upper() != keyword:
            return syntaxerr
        address, rest = parse_path(arg[len(keyword) :].strip(), self.local_part_limit)
        if address is None:
            return "553 5.1.3 Error: malformed address"
        if not address or (not self.session.extended_smtp and rest):
            return syntaxerr
        assert rest is not None
        return address, rest.upper().split()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        taken = self._path_argument("FROM:", arg)
        if isinstance(taken, str):
            await self.push(taken)
            return
        address, options = taken
        assert self.envelope is not None and self.session is not None
        if self.envelope.mail_from:
            await self.push("503 Error: nested MAIL command")
            return
        syntaxerr = "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
        params = parse_params(options)
        if params is None:
            await self.push(syntaxerr)
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            await self.push("501 Error: SMTPUTF8 takes no arguments")
            return
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size and (isinstance(size, bool) or not size.isdigit()):
            await self.push(syntaxerr)
            return
        if params:
            await self.push("555 MAIL FROM parameters not recognized or not implemented")
            return
        await self.push(
            await self.handler.handle_MAIL(self, self.session, self.envelope, address, options)
        )

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push("503 Error: need MAIL command")
            return
        taken = self._path_argument("TO:", arg)
        if isinstance(taken, str):
            await self.push(taken)
            return
        address, options = taken
        params = parse_params(options)
        if params is None:
            await self.push("501 Syntax: RCPT TO: <address> [SP <mail-parameters>]")
            return
        if params:
            await self.push("555 RCPT TO parameters not recognized or not implemented")
            return
        await self.push(
            await self.handler.handle_RCPT(self, self.session, self.envelope, address, options)
        )
