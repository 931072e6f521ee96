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
    """One transaction carrying `rcpts`; a reply for every one of them.

    Never raises for anything the provider or the network does: every failure
    becomes a `Reply` (code None when no reply came). Duplicate recipients are
    sent once and share the reply.
    """
    rcpts = list(dict.fromkeys(rcpts))
    smtp = aiosmtplib.SMTP(
        hostname=cfg.host,
        port=cfg.port,
        local_hostname=helo,
        timeout=cfg.command_timeout,
        use_tls=cfg.tls == "implicit",
        start_tls=False,  # never aiosmtplib's opportunistic default (DESIGN trap 9)
        tls_context=tls_context(cfg) if cfg.tls != "none" else None,
    )
    attempt = Attempt({})
    stage: Stage = "connect"
    quitting = False
    try:
        await smtp.connect(timeout=cfg.connect_timeout)
        await _hello(smtp)  # aiosmtplib does not EHLO on connect: no extensions known before
        stage = "tls"
        if await _secure(smtp, cfg):
            await _hello(smtp)  # RFC 3207: forget what was learnt before TLS
        stage = "auth"
        await _authenticate(smtp, cfg)
        attempt.tls = _tls_version(smtp)
        stage = "mail"
        mail_options = _mail_options(smtp, options, len(content))
        await smtp.mail(mail_from, options=mail_options, encoding="utf-8")
        stage = "rcpt"
        accepted = []
        for rcpt in rcpts:
            try:
                await smtp.rcpt(rcpt, encoding="utf-8")
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                attempt.replies[rcpt] = Reply.from_smtp(exc.code, exc.message, "rcpt")
        if not accepted:
            quitting = _quit_later(smtp, cfg)
            return attempt
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
        # QUIT after returning: the caller records the outcome a round trip sooner,
        # which narrows the window in which a crash makes a duplicate.
        quitting = _quit_later(smtp, cfg)
    except _Failed as failed:
        _fill(attempt, rcpts, failed.reply)
    except Exception as exc:  # every failure becomes a reply
        _fill(attempt, rcpts, _error_reply(exc, stage))
    finally:
        if not quitting:
            smtp.close()
    return attempt


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
