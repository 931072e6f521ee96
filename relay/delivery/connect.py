"""Opening a provider connection: connect, EHLO, STARTTLS and AUTH as configured.

Every failure becomes a `Failed` carrying the reply that stands for it, with
the stage that decides its class (TLS and AUTH faults are deferred, never
bounced: see `Reply.permanent`). A TLS failure without a provider's reply,
and AUTH not offered, are the relay's own policy at work: `by="relay"`.

`tls: starttls` is opportunistic as Postfix's "may" (measured with Postfix
3.7 against Exim 4.96): a provider that offers STARTTLS and then refuses it
(`454 TLS currently unavailable`) gets the mail in plaintext on the same
connection, one whose TLS handshake fails on a new plaintext connection;
never with a login configured (the password would go in clear).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException, SMTPServerDisconnected

from relay.config import ProviderSettings, TlsMode
from relay.delivery._aiosmtplib import SMTP
from relay.delivery.hosts import Host
from relay.delivery.reply import Failed, Reply, Stage, error_reply


@dataclass(eq=False)
class Session:
    """An open, greeted (and, as configured, secured and authenticated) connection."""

    smtp: SMTP
    cfg: ProviderSettings
    host: Host
    tls: str | None
    opened: float
    uses: int = 0
    dirty: bool = False  # a transaction may still be open there: RSET before the next MAIL
    idle: asyncio.TimerHandle | None = None
    # handed over (relay/delivery/transaction.py): the final read of the transaction
    # before, which the next one's replies wait behind; None once taken or read
    reading: asyncio.Future[None] | None = None


def tls_context(cfg: ProviderSettings) -> ssl.SSLContext:
    """`required`/`implicit` verify certificate and host name; `starttls` does not."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.tls == "starttls":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _HandshakeFailed(Failed):
    """STARTTLS was accepted but the TLS handshake failed: the connection is lost."""


async def open_session(cfg: ProviderSettings, host: Host, helo: str) -> Session:
    """Connect to `host`, EHLO, STARTTLS and AUTH as `cfg` says; raise `Failed` otherwise.

    TLS certificates are verified against the host's name, never its address.
    """
    try:
        return await _open(cfg, host, helo, cfg.tls)
    except _HandshakeFailed as failed:
        if not _plaintext_fallback(cfg):
            raise Failed(failed.reply) from failed
        return await _open(cfg, host, helo, "none")


def _plaintext_fallback(cfg: ProviderSettings) -> bool:
    """Opportunistic TLS that failed goes on in plaintext, unless a password would."""
    return cfg.tls == "starttls" and not cfg.username


async def _open(cfg: ProviderSettings, host: Host, helo: str, tls: TlsMode) -> Session:
    """`open_session` with STARTTLS as `tls` says (`none` for the plaintext fallback)."""
    smtp = SMTP(
        hostname=host.address,
        server_hostname=host.name,
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
        if tls != "none" and await _secure(smtp, cfg, host.name):
            await _hello_after_tls(smtp)
        stage = "auth"
        await _authenticate(smtp, cfg)
    except Failed:
        hang_up(smtp)  # refused in step (AUTH, STARTTLS, a policy): still a session to end
        raise
    except Exception as exc:  # every failure becomes a reply
        smtp.close()
        cause = exc.__cause__
        if stage == "connect" and isinstance(cause, ssl.SSLError):  # implicit TLS handshake
            raise Failed(Reply(None, f"TLS failed: {cause}", "tls", by="relay")) from exc
        raise Failed(error_reply(exc, stage)) from exc
    except BaseException:  # cancelled (shutdown)
        smtp.close()
        raise
    return Session(smtp, cfg, host, _tls_version(smtp), asyncio.get_running_loop().time())


def hang_up(smtp: aiosmtplib.SMTP) -> None:
    """QUIT written (not waited for), then closed: a client does not close the
    channel without QUIT (RFC 5321 §4.1.1.10), and the server logs a clean end
    rather than a lost connection."""
    if smtp.protocol is not None:
        with contextlib.suppress(Exception):
            smtp.protocol.write(b"QUIT\r\n")
    smtp.close()


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not smtp.is_connected or exc.code == 421:
            raise
        await smtp.helo()


async def _hello_after_tls(smtp: aiosmtplib.SMTP) -> None:
    """EHLO again (RFC 3207: forget what was learnt before TLS). A TLS 1.3 server's
    refusal of the handshake (a client certificate required) arrives only now, so a
    connection lost here is a failed handshake."""
    try:
        await _hello(smtp)
    except (SMTPServerDisconnected, ConnectionError, ssl.SSLError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise _HandshakeFailed(Reply(None, f"TLS failed: {cause}", "tls", by="relay")) from exc


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    transport = smtp.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
    return ssl_obj.version() if ssl_obj else None


async def _secure(smtp: aiosmtplib.SMTP, cfg: ProviderSettings, name: str) -> bool:
    """STARTTLS as `cfg.tls` says; True when the session was upgraded."""
    if cfg.tls not in ("starttls", "required"):
        return False  # none: never STARTTLS, even when offered; implicit: already TLS
    if not smtp.supports_extension("starttls"):
        if cfg.tls == "required":
            raise Failed(Reply(None, "STARTTLS not offered (tls: required)", "tls", by="relay"))
        return False
    try:
        await smtp.starttls(tls_context=tls_context(cfg), server_hostname=name)
    except SMTPResponseException as exc:
        if exc.code < 0:
            raise _HandshakeFailed(
                Reply(None, f"TLS failed: {exc.message}", "tls", by="relay")
            ) from exc
        if _plaintext_fallback(cfg):
            return False  # refused: the session is as before STARTTLS, go on in plaintext
        # a refused STARTTLS is a TLS failure: retried, never a bounce
        raise Failed(Reply.from_smtp(exc.code, exc.message, "tls")) from exc
    except (ssl.SSLError, SMTPException, OSError) as exc:
        raise _HandshakeFailed(Reply(None, f"TLS failed: {exc}", "tls", by="relay")) from exc
    return True


async def _authenticate(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    """One mechanism per attempt, so a wrong password cannot lock the account."""
    if not cfg.username:
        return
    if not smtp.supports_extension("auth"):
        raise Failed(Reply(None, "AUTH not offered by the provider", "auth", by="relay"))
    password = cfg.password() or ""
    try:
        if cfg.auth_mechanism == "login":
            await smtp.auth_login(cfg.username, password)
        else:
            await smtp.auth_plain(cfg.username, password)
    except SMTPResponseException as exc:
        raise Failed(Reply.from_smtp(exc.code, exc.message, "auth")) from None
