"""How to talk to one provider once: one SMTP transaction, per-recipient replies.

This module classifies and reports; it decides nothing about retries (that is
the scheduler's job). aiosmtplib's exceptions are mapped to `Reply` values
here, at one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from relay.config import ProviderSettings

Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "after_data"]
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b\s*")
_AUTH_CODES = frozenset({530, 534, 535, 538})
_QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)", re.I)


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


async def send(
    cfg: ProviderSettings,
    mail_from: str,
    rcpts: list[str],
    content: bytes,
    options: list[str],
    helo: str,
) -> Attempt:
    """One transaction on a new connection, closed afterwards (see `Agent.send`)."""
    return await _ONE_SHOT.send(cfg, mail_from, rcpts, content, options, helo)


@dataclass(eq=False)
class _Session:
    """An open, greeted (and, as configured, secured and authenticated) connection."""

    smtp: aiosmtplib.SMTP
    cfg: ProviderSettings
    tls: str | None
    opened: float
    uses: int = 0
    idle: asyncio.TimerHandle | None = None


_Key = tuple[str, int, str, str | None, str]


class Agent:
    """The delivery agent: one transaction per call, over cached connections.

    After a successful transaction the connection waits (at most `idle`
    seconds) for the next transaction to the same provider, like Postfix's
    connection cache (smtp_connection_cache_time_limit 2 s, reuse limits
    300 s / 100 transactions). A cached connection that turns out to be gone
    when MAIL is sent is replaced at once by a new one: nothing of the
    transaction had reached the provider. `max_uses=0` disables the cache.
    """

    def __init__(self, idle: float = 2.0, max_uses: int = 100, max_age: float = 300.0):
        self.idle = idle
        self.max_uses = max_uses
        self.max_age = max_age
        self._cache: dict[_Key, list[_Session]] = {}

    async def send(
        self,
        cfg: ProviderSettings,
        mail_from: str,
        rcpts: list[str],
        content: bytes,
        options: list[str],
        helo: str,
    ) -> Attempt:
        """One transaction carrying `rcpts`; a reply for every one of them.

        Never raises for anything the provider or the network does: every
        failure becomes a `Reply` (code None when no reply came). Duplicate
        recipients are sent once and share the reply.
        """
        rcpts = list(dict.fromkeys(rcpts))
        key: _Key = (cfg.host, cfg.port, cfg.tls, cfg.username, helo)
        session = self._take(key)
        if session is not None:
            attempt = Attempt({}, tls=session.tls)
            outcome = await _guarded(session, mail_from, rcpts, content, options, attempt)
            if outcome != "stale":
                self._release(key, session, outcome == "reusable")
                return attempt
            session.smtp.close()  # gone while cached: nothing was sent, go again
        attempt = Attempt({})
        try:
            session = await _open(cfg, helo)
        except _Failed as failed:
            _fill(attempt, rcpts, failed.reply)
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
            or session.uses >= self.max_uses
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
    smtp = aiosmtplib.SMTP(
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
        raise _Failed(_error_reply(exc, stage)) from exc
    except BaseException:  # cancelled (shutdown)
        smtp.close()
        raise
    return _Session(smtp, cfg, _tls_version(smtp), asyncio.get_running_loop().time())


async def _guarded(
    session: _Session,
    mail_from: str,
    rcpts: list[str],
    content: bytes,
    options: list[str],
    attempt: Attempt,
) -> Literal["reusable", "closed", "stale"]:
    """`_transaction`, closing the connection if the attempt is cancelled (shutdown)."""
    try:
        return await _transaction(session, mail_from, rcpts, content, options, attempt)
    except BaseException:
        session.smtp.close()
        raise


async def _transaction(
    session: _Session,
    mail_from: str,
    rcpts: list[str],
    content: bytes,
    options: list[str],
    attempt: Attempt,
) -> Literal["reusable", "closed", "stale"]:
    """MAIL, RCPT…, DATA on an open session, filling `attempt.replies`.

    "stale": a reused session broke before MAIL was answered (nothing filled);
    "reusable": the transaction ended with a 250 and the session is clean.
    """
    smtp, cfg = session.smtp, session.cfg
    reused = session.uses > 0
    stage: Stage = "mail"
    try:
        mail_options = _mail_options(smtp, options, len(content))
        try:
            await smtp.mail(mail_from, options=mail_options, encoding="utf-8")
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            if reused:
                return "stale"
            raise
        except SMTPResponseException as exc:
            if reused and exc.code == 421:
                return "stale"
            raise
        stage = "rcpt"
        accepted = []
        for rcpt in rcpts:
            try:
                await smtp.rcpt(rcpt, encoding="utf-8")
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                attempt.replies[rcpt] = Reply.from_smtp(exc.code, exc.message, "rcpt")
        if not accepted:
            return "closed"  # a transaction is still open: not worth an RSET
        stage = "data"
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise SMTPResponseException(start.code, start.message)
        # After the final ".": a break or timeout from here on is a deferral, and
        # the provider may already have the message.
        stage = "after_data"
        resp = await _send_content(smtp, content, cfg.data_timeout)
        done = Reply.from_smtp(resp.code, resp.message, "after_data")
        if done.ok:
            m = _QUEUED_AS.search(resp.message)
            attempt.remote_id = m.group(1) if m else None
        for rcpt in accepted:
            attempt.replies[rcpt] = done
        return "reusable" if done.ok else "closed"
    except _Failed as failed:
        _fill(attempt, rcpts, failed.reply)
        return "reusable"  # refused before MAIL was sent: the session is untouched
    except Exception as exc:  # every failure becomes a reply
        _fill(attempt, rcpts, _error_reply(exc, stage))
        smtp.close()
        return "closed"


_LEADING_DOT = re.compile(rb"(?m)^\.")


async def _send_content(
    smtp: aiosmtplib.SMTP, content: bytes, timeout: float
) -> aiosmtplib.SMTPResponse:
    """Dot-stuff and send the content and the final ".", then read the reply.

    The spool holds CRLF-only content (ingress normalises or refuses bare
    newlines), so unlike `SMTP.data()` nothing is rewritten but the stuffing.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    protocol.write(_LEADING_DOT.sub(b"..", content) + b".\r\n")
    return await protocol.read_response(timeout=timeout)


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not smtp.is_connected or exc.code == 421:
            raise
        await smtp.helo()


def _fill(attempt: Attempt, rcpts: list[str], reply: Reply) -> None:
    for rcpt in rcpts:
        attempt.replies.setdefault(rcpt, reply)


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
