"""How to talk to one provider once: one SMTP transaction, per-recipient replies.

This module classifies and reports; it decides nothing about retries (that is
the scheduler's job). aiosmtplib's exceptions are mapped to `Reply` values
here, at one boundary.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from relay.config import ProviderSettings

Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "after_data"]
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b\s*")
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
        """5xx is final, except at AUTH: a configuration fault, deferred (SPEC)."""
        return self.code is not None and self.code >= 500 and self.stage != "auth"


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
    """One transaction carrying `rcpts`; a reply for every one of them."""
    smtp = aiosmtplib.SMTP(
        hostname=cfg.host,
        port=cfg.port,
        local_hostname=helo,
        timeout=cfg.command_timeout,
        use_tls=cfg.tls == "implicit",
        start_tls=False,
        tls_context=tls_context(cfg) if cfg.tls != "none" else None,
    )
    attempt = Attempt({})
    stage: Stage = "connect"
    try:
        await smtp.connect(timeout=cfg.connect_timeout)
        await _secure(smtp, cfg)
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
            await _quit(smtp)
            return attempt
        stage = "data"
        resp = await smtp.data(content, timeout=cfg.data_timeout)
        done = Reply.from_smtp(resp.code, resp.message, "after_data")
        m = _QUEUED_AS.search(resp.message)
        attempt.remote_id = m.group(1) if m else None
        for rcpt in accepted:
            attempt.replies[rcpt] = done
        await _quit(smtp)
    except _Failed as failed:
        _fill(attempt, rcpts, failed.reply)
        smtp.close()
    except (TimeoutError, SMTPException, OSError, ssl.SSLError, ValueError) as exc:
        if isinstance(exc, aiosmtplib.SMTPDataError) and stage == "data":
            stage = "after_data" if exc.code != 354 else "data"
        elif stage == "data":
            # a break after DATA was sent: the provider may have the message
            stage = "after_data"
        _fill(attempt, rcpts, _error_reply(exc, stage))
        smtp.close()
    return attempt


def _fill(attempt: Attempt, rcpts: list[str], reply: Reply) -> None:
    for rcpt in rcpts:
        attempt.replies.setdefault(rcpt, reply)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit(timeout=5)
    except (TimeoutError, SMTPException, OSError):
        smtp.close()


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    transport = smtp.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
    return ssl_obj.version() if ssl_obj else None


async def _secure(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    if cfg.tls not in ("starttls", "required"):
        return
    if not smtp.supports_extension("starttls"):
        if cfg.tls == "required":
            raise _Failed(Reply(None, "STARTTLS not offered (tls: required)", "tls"))
        return
    try:
        await smtp.starttls(tls_context=tls_context(cfg), server_hostname=cfg.host)
    except (ssl.SSLError, SMTPException, OSError) as exc:
        raise _Failed(Reply(None, f"TLS failed: {exc}", "tls")) from exc


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
