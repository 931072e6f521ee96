"""One SMTP transaction on an open session: MAIL, RCPT…, DATA, the content.

The transaction is ours rather than aiosmtplib's, because that is where its
per-round-trip and whole-message paths cost time and memory (DESIGN traps 10
and 11): MAIL, every RCPT and DATA go in one write when the provider offers
PIPELINING (RFC 2920), and the content is streamed from the spool file in
chunks, dot-stuffed on the way and otherwise sent exactly as stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay.delivery._aiosmtplib import Protocol, quote_address
from relay.delivery.connect import Session
from relay.delivery.content import Content, ContentError
from relay.delivery.reply import Attempt, Failed, Reply, Stage, error_reply, fill, remote_id

Outcome = Literal["reusable", "closed", "stale"]
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command line (injection)


async def transaction(
    session: Session,
    mail_from: str,
    rcpts: list[str],
    content: Content,
    options: list[str],
    attempt: Attempt,
    rcpt_options: Mapping[str, list[str]] | None = None,
    handover: Callable[[], bool] | None = None,
) -> Outcome:
    """MAIL, RCPT…, DATA and the content on an open session, filling `attempt`.

    `rcpt_options` (NOTIFY, ORCPT) and the RET/ENVID of `options` go only to a
    provider that offers DSN (RFC 3461 §5.2: a relay without it drops them).

    With PIPELINING (RFC 2920) the commands up to DATA go in one write and
    their replies are read in order; without it, one round trip each, and
    no DATA when every recipient was refused. Returns

    - "stale": the provider said 421 before the final "." (the replies are
      filled with it, for when no other host is left), or a reused session
      broke there (nothing filled); either way it cannot have the message, so
      the transaction may go at once on another connection or host;
    - "reusable": the session is in step and may carry another transaction
      (after RSET if `session.dirty`);
    - "closed": the session was closed or must be.

    `handover`: called once the final "." is written, on a provider with
    PIPELINING; True when it has made the session available to the next
    transaction, which then writes its commands behind the "." at once (RFC 2920
    §3.1: content may begin a group) and reads its replies once this one has
    read its final reply. One round trip a message instead of two.

    Cancelled (shutdown), it closes the session before the cancellation goes on.
    """
    try:
        mail_options = await _mail_options(session.smtp, options, content, [mail_from, *rcpts])
        mail = _command(b"MAIL FROM:", mail_from, mail_options)
        dsn = session.smtp.supports_extension("dsn")
        attempt.dsn = dsn
        per_rcpt = rcpt_options if dsn and rcpt_options else {}
        rcpt_commands = [_command(b"RCPT TO:", r, per_rcpt.get(r, [])) for r in rcpts]
    except Failed as failed:
        fill(attempt.replies, rcpts, failed.reply)
        return "reusable"  # refused before anything was sent: the session is untouched
    except ContentError as exc:
        fill(attempt.replies, rcpts, _unreadable(exc, "mail"))
        return "reusable"
    except ValueError as exc:
        fill(attempt.replies, rcpts, dataclasses.replace(error_reply(exc, "mail"), by="relay"))
        return "reusable"
    return await _Transaction(session, rcpts, attempt, handover).run(mail, rcpt_commands, content)


async def probe(session: Session, rcpt: str, attempt: Attempt) -> Outcome:
    """`MAIL FROM:<>`, `RCPT TO:<rcpt>`, `RSET` (recipient verification): the RCPT
    reply is the answer, filled into `attempt` (the MAIL reply when MAIL was refused).
    Pipelined when offered, and the session stays clean for the next use."""
    try:
        command = _command(b"RCPT TO:", rcpt, [])
    except ValueError as exc:
        fill(attempt.replies, [rcpt], dataclasses.replace(error_reply(exc, "rcpt"), by="relay"))
        return "reusable"
    return await _Transaction(session, [rcpt], attempt).run(b"MAIL FROM:<>", [command], None)


class _Closing(Exception):
    """The provider answered 421 before the final ".": it is closing the connection."""

    def __init__(self, response: SMTPResponse):
        self.response = response


class _Transaction:
    """One transaction's progress: the stage reached and the replies so far.

    `stage` is the stage a failure is charged to; `replies` go into the
    attempt at the end, unless a reused session broke ("stale", nothing filled).
    """

    def __init__(
        self,
        session: Session,
        rcpts: list[str],
        attempt: Attempt,
        handover: Callable[[], bool] | None = None,
    ) -> None:
        self.session = session
        self.rcpts = rcpts
        self.attempt = attempt
        self.handover = handover
        self.stage: Stage = "mail"
        self.replies: dict[str, Reply] = {}
        self.accepted: list[str] = []
        # the command lock, while this transaction holds it (released at a handover)
        self.lock: asyncio.Lock | None = None
        # a predecessor's final read still to come before our first reply
        self.behind: asyncio.Future[None] | None = None
        # our own final read, while a successor may be writing behind it
        self.reading: asyncio.Future[None] | None = None

    async def run(
        self, mail: bytes, rcpt_commands: list[bytes], content: Content | None
    ) -> Outcome:
        """The exchange under aiosmtplib's command lock, every failure a reply; without
        `content` a probe (RSET where DATA would be)."""
        session = self.session
        smtp = session.smtp
        reused = session.uses > 0
        try:
            proto, lock = smtp.pipeline()
            await lock.acquire()
            self.lock = lock
            # the session's previous transaction may still wait for its final reply:
            # ours come after it, in the same queue (no begin: that would drop it)
            self.behind, session.reading = session.reading, None
            if self.behind is None:
                proto.begin()
            try:
                final = await self._exchange(proto, mail, rcpt_commands, content)
            finally:
                self._unlock()
                left = self._end(proto)
            if final is None:  # nothing to send: every recipient has its reply
                return self._merge("reusable")
            done = Reply.from_smtp(final.code, final.message, "after_data")
            if done.ok:
                self.attempt.remote_id = remote_id(final.message)
            fill(self.replies, self.accepted, done)
            if final.code == 421 or left:  # closing, or out of step (more replies than commands)
                smtp.close()
                return self._merge("closed")
            return self._merge("reusable")
        except _Closing as closing:
            smtp.close()
            r = closing.response
            fill(self.replies, self.rcpts, Reply.from_smtp(r.code, r.message, self.stage))
            self._merge("closed")
            return "stale"
        except ContentError as exc:  # the spool failed us mid-way: never end DATA with "."
            smtp.close()
            fill(self.replies, self.rcpts, _unreadable(exc, self.stage))
            return self._merge("closed")
        except Exception as exc:  # every failure becomes a reply
            smtp.close()
            broken = isinstance(exc, ConnectionError | aiosmtplib.SMTPServerDisconnected)
            if reused and broken and self.stage != "after_data":
                return "stale"
            fill(self.replies, self.rcpts, error_reply(exc, self.stage))
            return self._merge("closed")
        except BaseException:  # cancelled (shutdown): the session is out of step
            smtp.close()
            raise

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _end(self, proto: Protocol) -> int:
        """After our last read: replies left unread (out of step), unless a successor
        took the session over (its replies are queued behind ours: it ends it)."""
        reading, session = self.reading, self.session
        if reading is not None:
            reading.set_result(None)
            if session.reading is not reading:  # taken over
                return 0
            session.reading = None
        return proto.end()

    async def _reply_behind(self, proto: Protocol) -> SMTPResponse:
        """Our first reply, once the predecessor's final one is read."""
        if self.behind is not None:
            proto.quickack = True  # our replies follow the one it reads
            try:
                await self.behind
            finally:
                proto.quickack = False
            self.behind = None
            if not self.session.smtp.is_connected:  # it ended the connection
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        return await self._reply(proto)

    def _hand_over(self) -> None:
        """The final "." is written: the next transaction may write behind it."""
        session = self.session
        if (
            self.handover is None
            or not session.smtp.supports_extension("pipelining")
            or not self.handover()
        ):
            return
        session.dirty = False  # the "." ends the transaction whatever its reply says
        self.reading = session.reading = asyncio.get_running_loop().create_future()
        self._unlock()

    async def _exchange(
        self, proto: Protocol, mail: bytes, rcpt_commands: list[bytes], content: Content | None
    ) -> SMTPResponse | None:
        """The commands and the content; the final reply, None when none was sent."""
        session = self.session
        reset, session.dirty = session.dirty, True  # clean again after the final reply
        last = b"DATA" if content is not None else b"RSET"
        if session.smtp.supports_extension("pipelining"):
            first, rcpt_replies, data = await self._pipelined(
                proto, reset, mail, rcpt_commands, last
            )
        else:
            first, rcpt_replies, data = await self._stepwise(
                proto, reset, mail, rcpt_commands, last
            )
        if content is None:  # a probe: every RCPT reply is an answer; RSET ended it
            self._classify(first, rcpt_replies, None)
            for rcpt, r in zip(self.rcpts, rcpt_replies, strict=False):
                self.replies.setdefault(rcpt, Reply.from_smtp(r.code, r.message, "rcpt"))
            session.dirty = data is None or data.code != 250
            return None
        self.accepted = self._classify(first, rcpt_replies, data)
        if not self.accepted:
            if data is not None and data.code == 354:
                # RFC 2920 §3.1: DATA accepted with no recipient: end it, empty.
                _write(proto, b".")
                await self._reply(proto)
                session.dirty = False
            return None
        self.stage = "data"
        await write_content(proto, content, session.cfg.command_timeout)
        # The final "." is written: from here on a break or timeout is a
        # deferral, and the provider may already have the message.
        self.stage = "after_data"
        self._hand_over()
        final = await proto.read_response(timeout=session.cfg.data_timeout)
        if self.reading is None:
            session.dirty = False
        return final

    async def _pipelined(
        self, proto: Protocol, reset: bool, mail: bytes, rcpt_commands: list[bytes], last: bytes
    ) -> tuple[SMTPResponse, list[SMTPResponse], SMTPResponse | None]:
        """[RSET,] MAIL, every RCPT and DATA (`last`) in one write, then their replies
        in order."""
        _write(proto, *([b"RSET"] if reset else []), mail, *rcpt_commands, last)
        if reset:
            await self._reply_behind(proto)
        first = await (self._reply(proto) if reset else self._reply_behind(proto))
        self.stage = "rcpt"
        rcpt_replies = [await self._reply(proto) for _ in rcpt_commands]
        self.stage = "data"
        return first, rcpt_replies, await self._reply(proto)

    async def _stepwise(
        self, proto: Protocol, reset: bool, mail: bytes, rcpt_commands: list[bytes], last: bytes
    ) -> tuple[SMTPResponse, list[SMTPResponse], SMTPResponse | None]:
        """One round trip per command; no RCPT after a refused MAIL, no DATA when
        every recipient was refused (a probe's closing RSET always goes)."""
        if reset:
            _write(proto, b"RSET")
            await self._reply_behind(proto)
        _write(proto, mail)
        first = await (self._reply(proto) if reset else self._reply_behind(proto))
        rcpt_replies: list[SMTPResponse] = []
        data: SMTPResponse | None = None
        if first.code == 250:
            self.stage = "rcpt"
            for command in rcpt_commands:
                _write(proto, command)
                rcpt_replies.append(await self._reply(proto))
        if last == b"RSET" or any(r.code in (250, 251) for r in rcpt_replies):
            self.stage = "data"
            _write(proto, last)
            data = await self._reply(proto)
        return first, rcpt_replies, data

    async def _reply(self, proto: Protocol) -> SMTPResponse:
        """The next reply before the final "."; a 421 there ends the connection."""
        response = await proto.read_response(timeout=self.session.cfg.command_timeout)
        if response.code == 421:
            raise _Closing(response)
        return response

    def _classify(
        self, first: SMTPResponse, rcpt_replies: list[SMTPResponse], data: SMTPResponse | None
    ) -> list[str]:
        """Record the refusals; returns the recipients the content is for."""
        if first.code != 250:
            fill(self.replies, self.rcpts, Reply.from_smtp(first.code, first.message, "mail"))
            return []
        accepted = []
        for rcpt, r in zip(self.rcpts, rcpt_replies, strict=True):
            if r.code in (250, 251):
                accepted.append(rcpt)
            else:
                self.replies[rcpt] = Reply.from_smtp(r.code, r.message, "rcpt")
        if accepted and data is not None and data.code != 354:
            fill(self.replies, accepted, Reply.from_smtp(data.code, data.message, "data"))
            return []
        return accepted

    def _merge(self, outcome: Outcome) -> Outcome:
        self.attempt.replies.update(self.replies)
        return outcome


def _command(verb: bytes, address: str, options: list[str]) -> bytes:
    """`MAIL FROM:<a> OPTIONS` / `RCPT TO:<a>`; ValueError for what could inject."""
    line = b" ".join(
        [verb + quote_address(address).encode("utf-8"), *(o.encode("ascii") for o in options)]
    )
    if _CONTROL.search(line):
        raise ValueError("control character in a command line")
    return line


def _write(proto: Protocol, *commands: bytes) -> None:
    proto.write(b"".join(c + b"\r\n" for c in commands))


async def write_content(proto: Protocol, content: Content, timeout: float) -> None:
    """Send the content dot-stuffed, then the final "."; return once "." is written.

    A line starting with "." gets one more (RFC 5321 §4.5.2), across chunk
    boundaries too. Nothing else changes: the spool holds CRLF lines already
    (ingress normalised or refused bare newlines), and long lines pass as they
    are. After each chunk the transport is drained (flow control), so about one
    chunk per connection is in memory whatever the message size. Any failure
    raises before the final "." is written: the provider then never takes a
    partial message as complete.
    """
    offset, length = 0, content.length
    line_start = True  # the next content byte begins a line
    last2 = b""  # the content's last two bytes so far
    while offset < length:
        chunk = await content.read(offset)
        if not chunk:
            raise ContentError(f"content ended at {offset} of {length} bytes")
        offset += len(chunk)
        data = chunk if content.plain else chunk.replace(b"\n.", b"\n..")
        if line_start and data[:1] == b"." and not content.plain:
            data = b"." + data
        line_start = chunk[-1:] == b"\n"
        last2 = (last2 + chunk[-2:])[-2:]
        if offset >= length:
            proto.write(data + (b".\r\n" if last2 == b"\r\n" else b"\r\n.\r\n"))
            return
        proto.write(data)
        await proto.drain(timeout)
    proto.write(b".\r\n")  # empty content


async def _mail_options(
    smtp: aiosmtplib.SMTP, options: list[str], content: Content, addresses: list[str]
) -> list[str]:
    """BODY=8BITMIME / SMTPUTF8 passed on; to a provider lacking one, left out when
    nothing in this copy needs it (as Postfix does), else a final failure the
    relay decided (5.6.3 / 5.6.7): never downgraded, never sent broken.

    SMTPUTF8 is needed by a non-ASCII envelope address (as sent to this
    provider) or header section; left out, an 8-bit body still needs 8BITMIME.
    8BITMIME is needed by any 8-bit octet in the content. The content is
    scanned only when a provider lacks an extension the message asked for.
    """
    eight_bit = "BODY=8BITMIME" in options
    utf8 = "SMTPUTF8" in options
    if utf8 and not smtp.supports_extension("smtputf8"):
        header_8bit, body_8bit = await content.eight_bit()
        if header_8bit or not all(a.isascii() for a in addresses):
            raise Failed(_refusal("5.6.7", "SMTPUTF8"))
        utf8, eight_bit = False, eight_bit or body_8bit
    if eight_bit and not smtp.supports_extension("8bitmime"):
        if any(await content.eight_bit()):
            raise Failed(_refusal("5.6.3", "8BITMIME"))
        eight_bit = False
    out = (["BODY=8BITMIME"] if eight_bit else []) + (["SMTPUTF8"] if utf8 else [])
    if smtp.supports_extension("size"):
        out.append(f"SIZE={content.length}")
    if smtp.supports_extension("dsn"):
        out += [o for o in options if o.startswith(("RET=", "ENVID="))]
    return out


def _unreadable(exc: ContentError, stage: Stage) -> Reply:
    """The spool failed us: the relay's fault, retried, never charged to the provider."""
    return Reply(None, f"content unreadable: {exc}", stage, by="relay")


def _refusal(enhanced: str, extension: str) -> Reply:
    text = f"{enhanced} provider does not support {extension}, which this message needs"
    return Reply(554, text, "mail", enhanced, by="relay")
