"""The stand-in provider's SMTP session: aiosmtpd's protocol with a byte-exact DATA
reader, enhanced codes and the Rule answers (see relay/testing/__init__.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, AnyStr, NoReturn

from aiosmtpd.smtp import (
    SMTP,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from relay import dsn
from relay.testing.rules import ReceivedMessage, Rule

if TYPE_CHECKING:
    from relay.testing.provider import Provider

log = logging.getLogger("relay.testing")

DEFAULT_SIZE_LIMIT = 32 * 1024 * 1024


def _new_queue_id() -> str:
    return secrets.token_hex(6).upper()


def abort_transport(transport: asyncio.BaseTransport | None) -> None:
    """Close without flushing (a TCP reset for the peer when possible)."""
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    elif transport is not None:
        transport.close()


def hostname_for(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-").lower() or "provider"
    return f"{label}.test"


# ----------------------------------------------------------------------- protocol

_LINE_TOO_LONG = "500 5.5.2 Line too long"
_TOO_MUCH_DATA = "552 5.3.4 Message size exceeds fixed maximum message size"


class Handler:
    """aiosmtpd handler hooks; the protocol instance (``server``) does the work."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def handle_HELO(
        self, server: ProviderSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        return await server.on_helo(hostname)

    async def handle_EHLO(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        return await server.on_ehlo(hostname, responses)

    async def handle_MAIL(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        return await server.on_mail(address, mail_options)

    async def handle_RCPT(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        return await server.on_rcpt(address, rcpt_options)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client gave up on the handshake
            log.info("%s: STARTTLS handshake failed: %r", self.provider.name, error.__cause__)
            return "454 4.7.0 TLS not available"  # not sent: aiosmtpd closes the connection
        self.provider.errors.append(error)
        log.warning("%s: error in session: %r", self.provider.name, error)
        return "451 4.3.0 Internal error in test provider"


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning it logs on every AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class ProviderSMTP(SMTP):
    """One connection to a :class:`Provider`."""

    def __init__(
        self, provider: Provider, connection: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.provider = provider
        self.connection = connection
        # aiosmtpd sizes its StreamReader from this attribute in __init__: it is the
        # longest line (without CRLF, plus one for a stuffed dot) readuntil() returns.
        self.line_length_limit = provider.max_line_length + 1
        self._forever: asyncio.Future[None] = loop.create_future()
        self._dsn_mail: list[str] = []  # this command's DSN parameters, as sent
        self._dsn_rcpt: list[str] = []
        self._rcpt_options: dict[str, list[str]] = {}  # the transaction's, per recipient
        super().__init__(
            provider._handler,
            data_size_limit=provider.size_limit,
            enable_SMTPUTF8=provider.smtputf8,
            decode_data=False,
            hostname=provider.hostname,
            ident=f"ESMTP {provider.name} (relay test provider)",
            tls_context=provider.tls_context if provider.starttls else None,
            require_starttls=provider.require_starttls,
            timeout=provider.timeout,
            # With auth: offered in the clear too (tests).  Without: never offered
            # (on_ehlo strips it, smtp_AUTH refuses).
            auth_require_tls=provider.auth is None,
            authenticator=provider._authenticate if provider.auth is not None else None,
            loop=loop,
        )
        self._smtp_methods = {
            name: self._recording(name, method) for name, method in self._smtp_methods.items()
        }

    # -- plumbing ---------------------------------------------------------------

    def _recording(
        self, name: str, method: Callable[[str | None], Coroutine[Any, Any, None]]
    ) -> Callable[[str | None], Coroutine[Any, Any, None]]:
        @functools.wraps(method)
        async def record_then_run(arg: str | None) -> None:
            self.provider._note_command(name, arg)
            await method(arg)

        return record_then_run

    def _create_session(self) -> Session:
        return _Session(self.loop)

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or self.provider.implicit_tls

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        if status[:3] in ("421", b"421") and self.transport is not None:
            self.transport.close()  # RFC 5321: 421 closes the channel

    async def _hang(self) -> NoReturn:
        """Never return: wait until the connection is lost or the provider stops."""
        await self._forever  # cancelled by connection_lost() / Provider.stop()
        raise asyncio.CancelledError  # pragma: no cover - the future is never resolved

    async def _drop(self) -> NoReturn:
        abort_transport(self.transport)
        await self._hang()

    async def _refuse(self, rule: Rule) -> str:
        """Carry out a non-accept rule: returns the reply for defer/reject, never for hang/drop."""
        if rule.action == "hang":
            await self._hang()
        if rule.action == "drop":
            await self._drop()
        return rule.reply()

    def _abort(self) -> None:
        abort_transport(self.transport)
        abort_transport(self._original_transport)
        if not self._forever.done():
            self._forever.cancel()

    def connection_lost(self, error: Exception | None) -> None:
        self.provider._protocols.discard(self)
        if not self._forever.done():
            self._forever.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        try:
            rule = self.provider._match("connect")
            if rule is not None and rule.action != "accept":
                await self.push(await self._refuse(rule))
                if self.transport is not None:
                    self.transport.close()
                return
            await super()._handle_client()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # The client went away abruptly; that is what the provider is for.
            log.debug("%s: connection %d lost: %r", self.provider.name, self.connection, exc)

    # -- commands ---------------------------------------------------------------

    async def on_helo(self, hostname: str) -> str:
        rule = self.provider._match("ehlo")
        if rule is not None and rule.action != "accept":
            return await self._refuse(rule)
        assert self.session is not None
        self.session.host_name = hostname
        return f"250 {self.hostname}"

    async def on_ehlo(self, hostname: str, responses: list[str]) -> list[str]:
        rule = self.provider._match("ehlo")
        if rule is not None and rule.action != "accept":
            return [await self._refuse(rule)]
        assert self.session is not None
        self.session.host_name = hostname
        greeting, *caps = (line[4:] for line in responses)
        keep = []
        for cap in caps:
            keyword = cap.split(" ", 1)[0].upper()
            if keyword == "AUTH" and self.provider.auth is None:
                continue
            if keyword == "8BITMIME" and not self.provider.eight_bit_mime:
                continue
            if keyword == "HELP":
                continue
            keep.append(cap)
        dsn = ["DSN"] if self.provider.dsn else []
        lines = [greeting, *keep, "PIPELINING", "ENHANCEDSTATUSCODES", *dsn, "HELP"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def smtp_AUTH(self, arg: str) -> None:
        if self.provider.auth is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        arg, self._dsn_mail = self._dsn_split(arg, dsn.MAIL_KEYWORDS)
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, self._dsn_rcpt = self._dsn_split(arg, dsn.RCPT_KEYWORDS)
        await super().smtp_RCPT(arg)

    def _dsn_split(self, arg: str | None, keywords: frozenset[str]) -> tuple[str | None, list[str]]:
        """With ``dsn=True`` the DSN parameters are taken as sent (aiosmtpd refuses
        them); without, they stay in the line and aiosmtpd answers 555, as a server
        without the extension does."""
        if arg is None or not self.provider.dsn:
            return arg, []
        return dsn.split_parameters(arg, keywords)

    async def on_mail(self, address: str, mail_options: list[str]) -> str:
        assert self.session is not None and self.envelope is not None
        if self.provider.auth is not None and not self.session.authenticated:
            return "530 5.7.0 Authentication required"
        if not self.provider.eight_bit_mime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 BODY=8BITMIME not supported"
        rule = self.provider._match("mail")
        if rule is not None and rule.action != "accept":
            return await self._refuse(rule)
        self.envelope.mail_from = address  # "<>" for the null sender (truthy on purpose)
        self.envelope.mail_options.extend([*mail_options, *self._dsn_mail])
        self._rcpt_options = {}
        return "250 2.1.0 Ok"

    async def on_rcpt(self, address: str, rcpt_options: list[str]) -> str:
        assert self.envelope is not None
        rule = self.provider._match("rcpt", rcpt=address)
        if rule is not None and rule.action != "accept":
            return await self._refuse(rule)
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(rcpt_options)
        self._rcpt_options[address] = list(self._dsn_rcpt)
        return "250 2.1.5 Ok"

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        rcpts = list(self.envelope.rcpt_tos)
        rule = self.provider._match("data", rcpts=rcpts)
        if rule is not None and rule.action != "accept":
            reply = await self._refuse(rule)
            self._set_post_data_state()
            await self.push(reply)
            return

        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, problem = await self._read_data()
        envelope = self.envelope
        self._set_post_data_state()
        if problem is not None:
            await self.push(problem)
            return
        envelope.original_content = envelope.content = content
        auth_data = self.session.auth_data
        message = ReceivedMessage(
            mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
            rcpts=rcpts,
            data=content,
            mail_options=list(envelope.mail_options),
            tls=self.tls_active,
            auth_user=(
                auth_data.login.decode("utf-8", "replace")
                if self.session.authenticated and isinstance(auth_data, LoginPassword)
                else None
            ),
            connection=self.connection,
            rcpt_options=dict(self._rcpt_options),
        )
        rule = self.provider._match("after_data", rcpts=rcpts, content=content)
        if rule is None or rule.action == "accept":
            message.queue_id = _new_queue_id()
            self.provider._record(message)  # before the 250: "accepted" means recorded
            reply = f"250 2.0.0 Ok: queued as {message.queue_id}"
            if rule is not None and (rule.code is not None or rule.text is not None):
                reply = f"{rule.code or 250} {rule.text or reply[4:]}"
            await self.push(reply)
            return
        if rule.action in ("hang", "drop"):
            self.provider._record_dropped(message)
        await self.push(await self._refuse(rule))

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read DATA up to the lone ``.`` line: (unstuffed content, error reply or None).

        Lines end only at CRLF (bare CR and LF stay inside the content, as with
        aiosmtpd).  Reading line by line keeps pipelined commands after the
        final dot in the reader for the command loop.
        """
        reader = self._reader
        limit = self.provider.size_limit
        max_len = self.provider.max_line_length
        parts: list[bytes] = []
        size = 0
        unreported = 0
        problem: str | None = None
        mid_line = False  # the start of the current line was consumed already
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                chunk = await reader.read(exc.consumed)
                size += len(chunk)
                problem = problem or _LINE_TOO_LONG
                parts.clear()
                mid_line = True
                continue
            except asyncio.IncompleteReadError:
                if self.transport is not None:
                    self.transport.close()
                await self._hang()
            if not mid_line and line == b".\r\n":
                return b"".join(parts), problem
            size += len(line)
            unreported += len(line)
            if unreported >= 1 << 16:  # a steady upload is not idle
                self._reset_timeout()
                unreported = 0
            if problem is None:
                if limit and size > limit:
                    problem = _TOO_MUCH_DATA
                    parts.clear()
                else:
                    if not mid_line and line.startswith(b"."):
                        line = line[1:]
                    if len(line) - 2 > max_len:
                        problem = _LINE_TOO_LONG
                        parts.clear()
                    else:
                        parts.append(line)
            mid_line = False


# ----------------------------------------------------------------------- provider
