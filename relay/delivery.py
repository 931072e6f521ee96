"""How to talk to one provider once: one SMTP transaction, per-recipient replies.

This module classifies and reports; it decides nothing about retries (that is
the scheduler's job). aiosmtplib's exceptions are mapped to `Reply` values
here, at one boundary.

aiosmtplib stays the protocol engine: connecting, EHLO, STARTTLS, AUTH and
parsing replies. The transaction itself is ours, because that is where its
per-round-trip and whole-message paths cost time and memory (DESIGN traps 10
and 11): MAIL, every RCPT and DATA go in one write when the provider offers
PIPELINING (RFC 2920), and the content is streamed from the spool file in
chunks, dot-stuffed on the way and otherwise sent exactly as stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

from relay.config import ProviderSettings

Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "after_data"]
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b\s*")
_AUTH_CODES = frozenset({530, 534, 535, 538})
_QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)", re.I)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command line (injection)

CHUNK = 256 * 1024  # content read from the spool and written to the provider at a time


@dataclass(frozen=True)
class Reply:
    """One recipient's outcome of an attempt; `code` is None when no reply came."""

    code: int | None
    text: str
    stage: Stage
    enhanced: str | None = None

    @classmethod
    def from_smtp(cls, code: int, message: str, stage: Stage) -> Reply:
        m = _ENHANCED.match(message)
        return cls(code, message, stage, m.group(1) if m else None)

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx is final (bounced), except configuration faults, which are deferred.

        SPEC: any failure at the AUTH stage (530, 534, 535, 538 or AUTH not
        offered) is deferred and logged, never bounced; the same codes at MAIL or
        later ("530 5.7.0 Authentication required", "must issue STARTTLS first")
        say the same thing. TLS failures are retried too.
        """
        if self.code is None or self.code < 500:
            return False
        return self.stage not in ("auth", "tls") and self.code not in _AUTH_CODES


@dataclass
class Attempt:
    replies: dict[str, Reply]
    tls: str | None = None
    remote_id: str | None = None
    notes: list[str] = field(default_factory=list)


class _Failed(Exception):
    """Every recipient still open gets this reply."""

    def __init__(self, reply: Reply):
        self.reply = reply


class ContentError(Exception):
    """The spool could not give the content back: our fault, never the provider's."""


class Content:
    """A message's content as the spool holds it: CRLF lines, not dot-stuffed.

    `open` opens the spool file and reads the first chunk in one thread hop
    (for most messages, all of it); later chunks are read by position in a
    thread, so the event loop never waits on the disk and a transaction
    retried at once simply reads from the start again. Close it after use.
    """

    def __init__(self, length: int, head: bytes, fh: BinaryIO | None = None, start: int = 0):
        self.length = length
        self._head = head  # the first chunk (without a file: the whole content)
        self._fh = fh
        self._start = start

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        return cls(len(data), data)

    @classmethod
    async def open(
        cls, opener: Callable[[], tuple[BinaryIO, int]], inline: bool = False
    ) -> Content:
        """`opener()` gives (file positioned at the content, its length), as
        `partial(spool.open_content, queue_id)` does. `inline`: open and read on
        the event loop, for a message known to be small (a page-cache read of a
        few KiB costs less than a thread hop)."""

        def _open() -> Content:
            fh, length = opener()
            try:
                start = fh.tell()
                head = _pread(fh, min(length, CHUNK), start)
            except BaseException:
                fh.close()
                raise
            if length <= CHUNK:  # all of it read: the file is not needed any more
                fh.close()
                return cls(length, head)
            return cls(length, head, fh, start)

        return _open() if inline else await asyncio.to_thread(_open)

    async def read(self, offset: int) -> bytes:
        """The next at most `CHUNK` bytes from `offset` (0 ≤ offset < length)."""
        if self._fh is None:
            return self._head[offset : offset + CHUNK]
        if offset == 0:
            return self._head
        return await asyncio.to_thread(
            _pread, self._fh, min(CHUNK, self.length - offset), self._start + offset
        )

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _pread(fh: BinaryIO, size: int, position: int) -> bytes:
    """Exactly `size` bytes at `position` (no shared file offset: safe to repeat)."""
    try:
        data = os.pread(fh.fileno(), size, position)
        while len(data) < size:
            more = os.pread(fh.fileno(), size - len(data), position + len(data))
            if not more:
                raise ContentError(f"content truncated at {position + len(data)}")
            data += more
    except OSError as exc:
        raise ContentError(str(exc)) from exc
    return data


def tls_context(cfg: ProviderSettings) -> ssl.SSLContext:
    """`required`/`implicit` verify certificate and host name; `starttls` does not."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.tls == "starttls":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _error_reply(exc: BaseException, stage: Stage) -> Reply:
    if isinstance(exc, SMTPResponseException) and exc.code >= 0:
        return Reply.from_smtp(exc.code, exc.message, stage)
    if isinstance(exc, asyncio.TimeoutError | aiosmtplib.SMTPTimeoutError):
        return Reply(None, f"timeout at {stage}", stage)
    return Reply(None, f"{type(exc).__name__} at {stage}: {exc}", stage)


# --------------------------------------------------------------------- the protocol


class _Protocol(SMTPProtocol):
    """aiosmtplib's protocol, able to take the replies to pipelined commands.

    aiosmtplib expects one reply per write: it parses one reply per read and
    drops whatever arrives while a parsed reply still waits to be picked up
    (under uvloop several reads can come in one pass of the loop). During one
    of our transactions (`replies` is a deque) every complete reply is parsed
    and queued in order instead; outside of them aiosmtplib's own handling
    applies unchanged (STARTTLS keeps its injection defence).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        connection_lost_callback: Callable[[SMTPProtocol], None] | None = None,
    ) -> None:
        super().__init__(loop=loop, connection_lost_callback=connection_lost_callback)
        self.replies: collections.deque[SMTPResponse] | None = None

    def data_received(self, data: bytes) -> None:
        replies = self.replies
        if replies is None:
            super().data_received(data)
            return
        waiter = self._response_waiter
        if waiter is None:
            return
        self._buffer.extend(data)
        try:
            while (reply := self._read_response_from_buffer()) is not None:
                replies.append(reply)
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                raise SMTPResponseException(-1, "Response too long")
        except Exception as exc:  # out of step with the server: this connection is done
            del self._buffer[:]
            if not waiter.done():
                self._set_response_exception(waiter, exc)
            if self.transport is not None:
                self.transport.close()
            return
        if replies and not waiter.done():
            waiter.set_result(replies.popleft())

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        replies = self.replies
        waiter = self._response_waiter
        if replies and (waiter is None or not waiter.done()):
            return replies.popleft()  # the waiter, when done, holds an earlier one
        return await super().read_response(timeout=timeout)

    def begin(self) -> None:
        """Our transaction starts: every reply from now on is expected and queued."""
        self.replies = collections.deque()
        self._response_pending = True

    def end(self) -> int:
        """Back to aiosmtplib's handling; returns the number of replies left unread."""
        left = len(self.replies or ())
        self.replies = None
        self._response_pending = False
        return left


class _SMTP(aiosmtplib.SMTP):
    """aiosmtplib's client on `_Protocol`."""

    async def _create_connection(self, timeout: float | None) -> SMTPResponse:
        # aiosmtplib 5.1.3's own, for a host and port, with `_Protocol` as the protocol.
        if self.loop is None:
            raise RuntimeError("No event loop set")
        protocol = _Protocol(loop=self.loop, connection_lost_callback=self._on_connection_lost)
        tls = await self._get_tls_context() if self.use_tls else None
        host, port = self.hostname or "localhost", self.port or self._get_default_port()
        try:
            transport, _ = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: protocol, host=host, port=port, ssl=tls,
                    ssl_handshake_timeout=timeout if tls else None,
                    local_addr=self.source_address,
                ),
                timeout=timeout,
            )  # fmt: skip
        except TimeoutError as exc:
            raise aiosmtplib.SMTPConnectTimeoutError(
                f"Timed out connecting to {host} on port {port}"
            ) from exc
        except OSError as exc:
            raise aiosmtplib.SMTPConnectError(
                f"Error connecting to {host} on port {port}: {exc}"
            ) from exc
        self.protocol = protocol
        self.transport = transport
        try:
            response = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise aiosmtplib.SMTPConnectError(
                f"Error connecting to {host} on port {port}: {exc}"
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise aiosmtplib.SMTPConnectTimeoutError(
                "Timed out waiting for server ready message"
            ) from exc
        if response.code != 220:
            raise aiosmtplib.SMTPConnectResponseError(response.code, response.message)
        return response


# ------------------------------------------------------------------------ the agent


async def send(
    cfg: ProviderSettings,
    mail_from: str,
    rcpts: list[str],
    content: Content | bytes,
    options: list[str],
    helo: str,
) -> Attempt:
    """One transaction on a new connection, closed afterwards (see `Agent.send`)."""
    return await _ONE_SHOT.send(cfg, mail_from, rcpts, content, options, helo)


@dataclass(eq=False)
class _Session:
    """An open, greeted (and, as configured, secured and authenticated) connection."""

    smtp: _SMTP
    cfg: ProviderSettings
    tls: str | None
    opened: float
    uses: int = 0
    dirty: bool = False  # a transaction may still be open there: RSET before the next MAIL
    idle: asyncio.TimerHandle | None = None


_Key = tuple[str, int, str, str | None, str]
_Outcome = Literal["reusable", "closed", "stale"]


class Agent:
    """The delivery agent: one transaction per call, over cached connections.

    After a transaction the connection waits (at most `idle` seconds) for the
    next transaction to the same provider, like Postfix's connection cache
    (smtp_connection_cache_time_limit 2 s, smtp_connection_reuse_time_limit
    300 s; like Postfix, no limit on the number of transactions unless
    `max_uses` sets one; 0 disables the cache). The scheduler runs at most
    `max_connections` attempts per provider at a time, and a connection is
    opened only when none is cached, so that is also the most connections a
    provider sees. A cached connection that turns out to be broken before the
    final "." of DATA (a reset, an EOF, a 421) is replaced at once by a new one
    and the transaction sent again: the provider cannot have the message.
    """

    def __init__(self, idle: float = 2.0, max_uses: int | None = None, max_age: float = 300.0):
        self.idle = idle
        self.max_uses = max_uses
        self.max_age = max_age
        self._cache: dict[_Key, list[_Session]] = {}

    async def send(
        self,
        cfg: ProviderSettings,
        mail_from: str,
        rcpts: list[str],
        content: Content | bytes,
        options: list[str],
        helo: str,
    ) -> Attempt:
        """One transaction carrying `rcpts`; a reply for every one of them.

        Never raises for anything the provider or the network does: every
        failure becomes a `Reply` (code None when no reply came). Duplicate
        recipients are sent once and share the reply.
        """
        if isinstance(content, bytes):
            content = Content.from_bytes(content)
        rcpts = list(dict.fromkeys(rcpts))
        key: _Key = (cfg.host, cfg.port, cfg.tls, cfg.username, helo)
        session = self._take(key)
        if session is not None:
            attempt = Attempt({}, tls=session.tls)
            outcome = await _guarded(session, mail_from, rcpts, content, options, attempt)
            if outcome != "stale":
                self._release(key, session, outcome == "reusable")
                return attempt
            session.smtp.close()  # broke before the final ".": once more, at once
        attempt = Attempt({})
        try:
            session = await _open(cfg, helo)
        except _Failed as failed:
            _fill(attempt.replies, rcpts, failed.reply)
            return attempt
        attempt.tls = session.tls
        outcome = await _guarded(session, mail_from, rcpts, content, options, attempt)
        self._release(key, session, outcome == "reusable")
        return attempt

    def _take(self, key: _Key) -> _Session | None:
        idle = self._cache.get(key)
        while idle:
            session = idle.pop()  # the most recently used: the warmest
            if session.idle is not None:
                session.idle.cancel()
            if session.smtp.is_connected:
                return session
            session.smtp.close()
        return None

    def _release(self, key: _Key, session: _Session, reusable: bool) -> None:
        session.uses += 1
        loop = asyncio.get_running_loop()
        if (
            not reusable
            or not session.smtp.is_connected
            or self.max_uses == 0
            or (self.max_uses is not None and session.uses >= self.max_uses)
            or loop.time() - session.opened >= self.max_age
        ):
            if session.smtp.is_connected:
                # QUIT after returning: the caller records the outcome a round trip
                # sooner, which narrows the window in which a crash makes a duplicate.
                _quit_later(session.smtp, session.cfg)
            else:
                session.smtp.close()
            return
        session.idle = loop.call_later(self.idle, self._expire, key, session)
        self._cache.setdefault(key, []).append(session)

    def _expire(self, key: _Key, session: _Session) -> None:
        idle = self._cache.get(key, [])
        if session in idle:
            idle.remove(session)
            _quit_later(session.smtp, session.cfg)

    async def close(self) -> None:
        """Close every cached connection (QUIT written, not waited for)."""
        cache, self._cache = self._cache, {}
        for sessions in cache.values():
            for session in sessions:
                if session.idle is not None:
                    session.idle.cancel()
                if session.smtp.protocol is not None:
                    with contextlib.suppress(Exception):
                        session.smtp.protocol.write(b"QUIT\r\n")
                session.smtp.close()


_ONE_SHOT = Agent(max_uses=0)


async def _open(cfg: ProviderSettings, helo: str) -> _Session:
    """Connect, EHLO, STARTTLS and AUTH as `cfg` says; raise `_Failed` otherwise."""
    smtp = _SMTP(
        hostname=cfg.host,
        port=cfg.port,
        local_hostname=helo,
        timeout=cfg.command_timeout,
        use_tls=cfg.tls == "implicit",
        start_tls=False,  # never aiosmtplib's opportunistic default (DESIGN trap 9)
        tls_context=tls_context(cfg) if cfg.tls != "none" else None,
    )
    stage: Stage = "connect"
    try:
        await smtp.connect(timeout=cfg.connect_timeout)
        await _hello(smtp)  # aiosmtplib does not EHLO on connect: no extensions known before
        stage = "tls"
        if await _secure(smtp, cfg):
            await _hello(smtp)  # RFC 3207: forget what was learnt before TLS
        stage = "auth"
        await _authenticate(smtp, cfg)
    except _Failed:
        smtp.close()
        raise
    except Exception as exc:  # every failure becomes a reply
        smtp.close()
        cause = exc.__cause__
        if stage == "connect" and isinstance(cause, ssl.SSLError):  # implicit TLS handshake
            raise _Failed(Reply(None, f"TLS failed: {cause}", "tls")) from exc
        raise _Failed(_error_reply(exc, stage)) from exc
    except BaseException:  # cancelled (shutdown)
        smtp.close()
        raise
    return _Session(smtp, cfg, _tls_version(smtp), asyncio.get_running_loop().time())


async def _guarded(
    session: _Session,
    mail_from: str,
    rcpts: list[str],
    content: Content,
    options: list[str],
    attempt: Attempt,
) -> _Outcome:
    """`_transaction`, closing the connection if the attempt is cancelled (shutdown)."""
    try:
        return await _transaction(session, mail_from, rcpts, content, options, attempt)
    except BaseException:
        session.smtp.close()
        raise


# ------------------------------------------------------------------ the transaction


class _Closing(Exception):
    """The provider answered 421 before the final ".": it is closing the connection."""

    def __init__(self, response: SMTPResponse):
        self.response = response


async def _transaction(
    session: _Session,
    mail_from: str,
    rcpts: list[str],
    content: Content,
    options: list[str],
    attempt: Attempt,
) -> _Outcome:
    """MAIL, RCPT…, DATA and the content on an open session, filling `attempt`.

    With PIPELINING (RFC 2920) the commands up to DATA go in one write and
    their replies are read in order; without it, one round trip each, and
    no DATA when every recipient was refused. Returns

    - "stale": a reused session broke (or said 421) before the final "." was
      written; nothing was filled, and the provider cannot have the message;
    - "reusable": the session is in step and may carry another transaction
      (after RSET if `session.dirty`);
    - "closed": the session was closed or must be.
    """
    smtp, cfg = session.smtp, session.cfg
    reused = session.uses > 0
    try:
        mail = _command(b"MAIL FROM:", mail_from, _mail_options(smtp, options, content.length))
        rcpt_commands = [_command(b"RCPT TO:", rcpt, []) for rcpt in rcpts]
    except _Failed as failed:
        _fill(attempt.replies, rcpts, failed.reply)
        return "reusable"  # refused before anything was sent: the session is untouched
    except ValueError as exc:
        _fill(attempt.replies, rcpts, _error_reply(exc, "mail"))
        return "reusable"

    replies: dict[str, Reply] = {}
    proto = smtp.protocol
    stage: Stage = "mail"
    try:
        if not isinstance(proto, _Protocol) or proto._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with proto._command_lock:
            proto.begin()
            try:
                reset, session.dirty = session.dirty, True  # clean again after the final reply

                async def reply() -> SMTPResponse:
                    response = await proto.read_response(timeout=cfg.command_timeout)
                    if response.code == 421:
                        raise _Closing(response)
                    return response

                data: SMTPResponse | None = None
                rcpt_replies: list[SMTPResponse] = []
                if smtp.supports_extension("pipelining"):
                    _write(proto, *([b"RSET"] if reset else []), mail, *rcpt_commands, b"DATA")
                    if reset:
                        await reply()
                    first = await reply()
                    stage = "rcpt"
                    rcpt_replies = [await reply() for _ in rcpt_commands]
                    stage = "data"
                    data = await reply()
                else:
                    if reset:
                        _write(proto, b"RSET")
                        await reply()
                    _write(proto, mail)
                    first = await reply()
                    if first.code == 250:
                        stage = "rcpt"
                        for command in rcpt_commands:
                            _write(proto, command)
                            rcpt_replies.append(await reply())
                        if any(r.code in (250, 251) for r in rcpt_replies):
                            stage = "data"
                            _write(proto, b"DATA")
                            data = await reply()

                accepted = []
                if first.code != 250:
                    _fill(replies, rcpts, Reply.from_smtp(first.code, first.message, "mail"))
                else:
                    for rcpt, r in zip(rcpts, rcpt_replies, strict=True):
                        if r.code in (250, 251):
                            accepted.append(rcpt)
                        else:
                            replies[rcpt] = Reply.from_smtp(r.code, r.message, "rcpt")
                    if accepted and data is not None and data.code != 354:
                        _fill(replies, accepted, Reply.from_smtp(data.code, data.message, "data"))
                        accepted = []
                if not accepted:
                    if data is not None and data.code == 354:
                        # RFC 2920 §3.1: DATA accepted with no recipient: end it, empty.
                        _write(proto, b".")
                        await reply()
                        session.dirty = False
                    return _merge(attempt, replies, "reusable")

                stage = "data"
                await _write_content(proto, content, cfg.command_timeout)
                # The final "." is written: from here on a break or timeout is a
                # deferral, and the provider may already have the message.
                stage = "after_data"
                final = await proto.read_response(timeout=cfg.data_timeout)
                session.dirty = False
            finally:
                left = proto.end()
        done = Reply.from_smtp(final.code, final.message, "after_data")
        if done.ok:
            m = _QUEUED_AS.search(final.message)
            attempt.remote_id = m.group(1) if m else None
        _fill(replies, accepted, done)
        if final.code == 421 or left:  # closing, or out of step (more replies than commands)
            smtp.close()
            return _merge(attempt, replies, "closed")
        return _merge(attempt, replies, "reusable")
    except _Closing as closing:
        smtp.close()
        if reused:
            return "stale"
        r = closing.response
        _fill(replies, rcpts, Reply.from_smtp(r.code, r.message, stage))
        return _merge(attempt, replies, "closed")
    except ContentError as exc:  # the spool failed us mid-way: never end DATA with "."
        smtp.close()
        _fill(replies, rcpts, Reply(None, f"content unreadable: {exc}", stage))
        return _merge(attempt, replies, "closed")
    except Exception as exc:  # every failure becomes a reply
        smtp.close()
        broken = isinstance(exc, ConnectionError | aiosmtplib.SMTPServerDisconnected)
        if reused and broken and stage != "after_data":
            return "stale"
        _fill(replies, rcpts, _error_reply(exc, stage))
        return _merge(attempt, replies, "closed")


def _command(verb: bytes, address: str, options: list[str]) -> bytes:
    """`MAIL FROM:<a> OPTIONS` / `RCPT TO:<a>`; ValueError for what could inject."""
    line = b" ".join(
        [verb + quote_address(address).encode("utf-8"), *(o.encode("ascii") for o in options)]
    )
    if _CONTROL.search(line):
        raise ValueError("control character in a command line")
    return line


def _write(proto: _Protocol, *commands: bytes) -> None:
    proto.write(b"".join(c + b"\r\n" for c in commands))


async def _write_content(proto: _Protocol, content: Content, timeout: float) -> None:
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
        data = chunk.replace(b"\n.", b"\n..")
        if line_start and data[:1] == b".":
            data = b"." + data
        line_start = chunk[-1:] == b"\n"
        last2 = (last2 + chunk[-2:])[-2:]
        if offset >= length:
            proto.write(data + (b".\r\n" if last2 == b"\r\n" else b"\r\n.\r\n"))
            return
        proto.write(data)
        if proto._connection_lost:
            raise ConnectionResetError("Connection lost")
        if proto._paused:
            async with asyncio.timeout(timeout):
                await proto._drain_helper()
    proto.write(b".\r\n")  # empty content


def _merge(attempt: Attempt, replies: dict[str, Reply], outcome: _Outcome) -> _Outcome:
    attempt.replies.update(replies)
    return outcome


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not smtp.is_connected or exc.code == 421:
            raise
        await smtp.helo()


def _fill(replies: dict[str, Reply], rcpts: list[str], reply: Reply) -> None:
    for rcpt in rcpts:
        replies.setdefault(rcpt, reply)


_quitting: set[asyncio.Task[None]] = set()


def _quit_later(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> bool:
    """QUIT in the background (the task closes `smtp` in the end); returns True."""
    task = asyncio.create_task(_quit(smtp, cfg))
    _quitting.add(task)
    task.add_done_callback(_quitting.discard)
    return True


async def _quit(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    """QUIT politely; the outcome is already known, so any failure here is ignored."""
    try:
        with contextlib.suppress(Exception):
            await smtp.quit(timeout=min(5.0, cfg.command_timeout))
    finally:
        smtp.close()


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    transport = smtp.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
    return ssl_obj.version() if ssl_obj else None


async def _secure(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> bool:
    """STARTTLS as `cfg.tls` says; True when the session was upgraded."""
    if cfg.tls not in ("starttls", "required"):
        return False  # none: never STARTTLS, even when offered; implicit: already TLS
    if not smtp.supports_extension("starttls"):
        if cfg.tls == "required":
            raise _Failed(Reply(None, "STARTTLS not offered (tls: required)", "tls"))
        return False
    try:
        await smtp.starttls(tls_context=tls_context(cfg), server_hostname=cfg.host)
    except SMTPResponseException as exc:
        if exc.code < 0:
            raise _Failed(Reply(None, f"TLS failed: {exc.message}", "tls")) from exc
        # a refused STARTTLS is a TLS failure: retried, never a bounce
        raise _Failed(Reply.from_smtp(exc.code, exc.message, "tls")) from exc
    except (ssl.SSLError, SMTPException, OSError) as exc:
        raise _Failed(Reply(None, f"TLS failed: {exc}", "tls")) from exc
    return True


async def _authenticate(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    """One mechanism per attempt, so a wrong password cannot lock the account."""
    if not cfg.username:
        return
    if not smtp.supports_extension("auth"):
        raise _Failed(Reply(None, "AUTH not offered by the provider", "auth"))
    password = cfg.password() or ""
    try:
        if cfg.auth_mechanism == "login":
            await smtp.auth_login(cfg.username, password)
        else:
            await smtp.auth_plain(cfg.username, password)
    except SMTPResponseException as exc:
        raise _Failed(Reply.from_smtp(exc.code, exc.message, "auth")) from None


def _mail_options(smtp: aiosmtplib.SMTP, options: list[str], size: int) -> list[str]:
    """Pass BODY=8BITMIME / SMTPUTF8 on; a provider lacking them is a final failure."""
    out = []
    if "BODY=8BITMIME" in options:
        if not smtp.supports_extension("8bitmime"):
            raise _Failed(Reply(554, "5.6.3 provider does not support 8BITMIME", "mail", "5.6.3"))
        out.append("BODY=8BITMIME")
    if "SMTPUTF8" in options:
        if not smtp.supports_extension("smtputf8"):
            raise _Failed(Reply(554, "5.6.7 provider does not support SMTPUTF8", "mail", "5.6.7"))
        out.append("SMTPUTF8")
    if smtp.supports_extension("size"):
        out.append(f"SIZE={size}")
    return out
