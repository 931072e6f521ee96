"""A scriptable loopback SMTP server that stands in for a mail provider.

Used by the test suite and by ``relay demo`` in place of the real providers
(legacy, new).  It records what it receives byte for byte and answers as its
:class:`Rule` list says: accept, defer (4xx), reject (5xx), hang (never answer)
or drop (close the connection without an answer), at any stage of the session.

It only ever listens on a loopback address.

Two ways to run it::

    async with Provider("legacy") as legacy:        # in a running event loop
        ...
        await legacy.wait_for_messages(1)

    with ProviderThread("new") as new:               # for synchronous callers
        ...                                          # (own loop, own thread)
        new.wait_for_messages(1)

Built on aiosmtpd's ``SMTP`` protocol with these changes: DATA is read by our
own reader (lines up to ``max_line_length`` pass and are recorded byte-exact,
nothing is decoded), replies carry enhanced status codes, the EHLO reply also
advertises PIPELINING and ENHANCEDSTATUSCODES, and a client that disconnects
abruptly produces no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import secrets
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, AnyStr, Literal, NoReturn, TypeVar, get_args

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

__all__ = [
    "Provider",
    "ProviderThread",
    "ReceivedMessage",
    "Rule",
]

log = logging.getLogger(__name__)

Action = Literal["accept", "defer", "reject", "hang", "drop"]
Stage = Literal["connect", "ehlo", "mail", "rcpt", "data", "after_data"]

ACTIONS: tuple[str, ...] = get_args(Action)
STAGES: tuple[str, ...] = get_args(Stage)
_RCPT_STAGES = ("rcpt", "data", "after_data")

DEFAULT_SIZE_LIMIT = 32 * 1024 * 1024

_T = TypeVar("_T")


# --------------------------------------------------------------------------- data


@dataclass
class ReceivedMessage:
    """One transaction the provider accepted (or swallowed, see ``dropped_after_data``)."""

    mail_from: str
    """Envelope sender; ``""`` for the null sender ``<>``."""
    rcpts: list[str]
    """The recipients the provider accepted, in RCPT order."""
    data: bytes
    """DATA content after dot-unstuffing, line endings as sent, without the final ``.\\r\\n``."""
    mail_options: list[str]
    """MAIL FROM parameters, upper-cased by aiosmtpd, e.g. ``["SIZE=123", "BODY=8BITMIME"]``."""
    tls: bool
    """The session was under TLS (STARTTLS or implicit)."""
    auth_user: str | None
    """The user the session authenticated as, if any."""
    connection: int
    """1-based index of the TCP connection that carried the message."""
    queue_id: str = ""
    """The id given in the ``250 2.0.0 Ok: queued as <id>`` reply ("" if never accepted)."""


# Default (code, text) per (action, stage); anything not listed uses the action default.
_DEFAULT_REPLIES: dict[tuple[str, str], tuple[int, str]] = {
    ("defer", "connect"): (421, "4.3.2 Service not available, try again later"),
    ("reject", "connect"): (554, "5.7.1 Connection refused"),
    ("reject", "ehlo"): (550, "5.7.1 Client host rejected"),
    ("reject", "mail"): (550, "5.7.1 Sender address rejected"),
    ("reject", "rcpt"): (550, "5.1.1 User unknown"),
    ("reject", "data"): (550, "5.7.1 Transaction rejected"),
    ("reject", "after_data"): (550, "5.7.1 Message rejected"),
}
_ACTION_DEFAULTS: dict[str, tuple[int, str]] = {
    "defer": (451, "4.3.0 Try again later"),
    "reject": (550, "5.7.1 Rejected"),
}


@dataclass
class Rule:
    """How the provider answers at one stage of the session.

    Rules are evaluated in list order and the first match wins; a stage with no
    matching rule is accepted.  ``times`` limits how often a rule applies
    (``applied`` counts the uses), so ``Rule("defer", rcpt="b@x", times=1)``
    defers the first RCPT for ``b@x`` and accepts the next.

    * ``stage="connect"``: the greeting.  defer → ``421`` and close, reject →
      ``554`` and close.
    * ``"ehlo"`` (also HELO), ``"mail"``, ``"rcpt"`` (one answer per recipient).
    * ``"data"``: the answer to the DATA command itself.
    * ``"after_data"``: the answer after the final ``.``.  Only an accept
      records the message in ``Provider.messages``; hang and drop record it in
      ``Provider.dropped_after_data`` (the provider may have it, the client
      never got an answer).  ``code``/``text`` of an accept rule replace the
      ``250 2.0.0 Ok: queued as <id>`` reply there (and are ignored elsewhere).

    ``rcpt`` matches one recipient at the rcpt stage, and any recipient of the
    transaction at the data/after_data stages (case-insensitive).  ``contains``
    matches the message content (after_data only).  A reply whose code is 421
    closes the connection after it is sent, as RFC 5321 says.
    """

    action: Action
    stage: Stage = "rcpt"
    rcpt: str | None = None
    contains: bytes | None = None
    code: int | None = None
    text: str | None = None
    times: int | None = None
    applied: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Rule.action must be one of {ACTIONS}, not {self.action!r}")
        if self.stage not in STAGES:
            raise ValueError(f"Rule.stage must be one of {STAGES}, not {self.stage!r}")
        if self.rcpt is not None and self.stage not in _RCPT_STAGES:
            raise ValueError(f"Rule.rcpt only applies at stages {_RCPT_STAGES}")
        if self.contains is not None and self.stage != "after_data":
            raise ValueError("Rule.contains only applies at stage 'after_data'")
        if self.code is not None and not 200 <= self.code <= 599:
            raise ValueError(f"Rule.code must be an SMTP reply code, not {self.code}")
        if self.times is not None and self.times < 0:
            raise ValueError("Rule.times must be >= 0 or None")

    @property
    def used_up(self) -> bool:
        return self.times is not None and self.applied >= self.times

    def matches(
        self,
        stage: str,
        *,
        rcpt: str | None = None,
        rcpts: Sequence[str] = (),
        content: bytes | None = None,
    ) -> bool:
        if self.stage != stage or self.used_up:
            return False
        if self.rcpt is not None:
            wanted = self.rcpt.lower()
            if stage == "rcpt":
                if rcpt is None or rcpt.lower() != wanted:
                    return False
            elif all(r.lower() != wanted for r in rcpts):
                return False
        return self.contains is None or (content is not None and self.contains in content)

    def reply(self) -> str:
        """The reply line for a defer/reject (also used for hang/drop in error messages)."""
        default_code, default_text = _DEFAULT_REPLIES.get(
            (self.action, self.stage), _ACTION_DEFAULTS.get(self.action, (250, "2.0.0 Ok"))
        )
        if self.contains is not None and self.action == "reject":
            default_text = "5.7.1 Message content rejected"
        code = self.code if self.code is not None else default_code
        text = self.text
        if text is None:
            text = default_text
            if str(code)[0] != text[0]:  # keep the enhanced code's class in step with the code
                text = str(code)[0] + text[1:]
        return f"{code} {text}"


def _new_queue_id() -> str:
    return secrets.token_hex(6).upper()


def _abort_transport(transport: asyncio.BaseTransport | None) -> None:
    """Close without flushing (a TCP reset for the peer when possible)."""
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    elif transport is not None:
        transport.close()


def _hostname_for(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-").lower() or "provider"
    return f"{label}.test"


# ----------------------------------------------------------------------- protocol

_LINE_TOO_LONG = "500 5.5.2 Line too long"
_TOO_MUCH_DATA = "552 5.3.4 Message size exceeds fixed maximum message size"


class _Handler:
    """aiosmtpd handler hooks; the protocol instance (``server``) does the work."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def handle_HELO(
        self, server: _ProviderSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        return await server.on_helo(hostname)

    async def handle_EHLO(
        self,
        server: _ProviderSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        return await server.on_ehlo(hostname, responses)

    async def handle_MAIL(
        self,
        server: _ProviderSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        return await server.on_mail(address, mail_options)

    async def handle_RCPT(
        self,
        server: _ProviderSMTP,
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


class _ProviderSMTP(SMTP):
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
        _abort_transport(self.transport)
        await self._hang()

    async def _refuse(self, rule: Rule) -> str:
        """Carry out a non-accept rule: returns the reply for defer/reject, never for hang/drop."""
        if rule.action == "hang":
            await self._hang()
        if rule.action == "drop":
            await self._drop()
        return rule.reply()

    def _abort(self) -> None:
        _abort_transport(self.transport)
        _abort_transport(self._original_transport)
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
        lines = [greeting, *keep, "PIPELINING", "ENHANCEDSTATUSCODES", "HELP"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def smtp_AUTH(self, arg: str) -> None:
        if self.provider.auth is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

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
        self.envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def on_rcpt(self, address: str, rcpt_options: list[str]) -> str:
        assert self.envelope is not None
        rule = self.provider._match("rcpt", rcpt=address)
        if rule is not None and rule.action != "accept":
            return await self._refuse(rule)
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(rcpt_options)
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


class Provider:
    """A scriptable SMTP server on a loopback address; see the module docstring."""

    def __init__(
        self,
        name: str = "provider",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth: dict[str, str] | None = None,
        smtputf8: bool = True,
        eight_bit_mime: bool = True,
        max_line_length: int = 1_000_000,
        size_limit: int | None = DEFAULT_SIZE_LIMIT,
        timeout: float = 300.0,
        hostname: str | None = None,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"Provider only listens on a loopback address, not {host!r}")
        if (starttls or implicit_tls) and tls_context is None:
            raise ValueError("starttls/implicit_tls need a tls_context")
        if starttls and implicit_tls:
            raise ValueError("choose starttls or implicit_tls, not both")
        if require_starttls and not starttls:
            raise ValueError("require_starttls needs starttls=True")
        self.name = name
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls
        self.auth = auth
        self.smtputf8 = smtputf8
        self.eight_bit_mime = eight_bit_mime
        self.max_line_length = max_line_length
        self.size_limit = size_limit
        self.timeout = timeout
        self.hostname = hostname or _hostname_for(name)

        self.rules: list[Rule] = []
        self.messages: list[ReceivedMessage] = []
        # called with each message accepted, e.g. to file it in a mail store (relay.dovecot)
        self.on_message: Callable[[ReceivedMessage], None] | None = None
        self.dropped_after_data: list[ReceivedMessage] = []
        self.connections = 0
        self.auth_attempts: list[tuple[str, str]] = []
        self.commands: list[str] = []
        self.errors: list[Exception] = []

        self._handler = _Handler(self)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._protocols: set[_ProviderSMTP] = set()

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port}" if self._server is not None else "stopped"
        return f"<Provider {self.name} {state}>"

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Listen (on ``port``, or a free port when 0; ``self.port`` is then set).

        A stopped provider can be started again: it listens on the same port.
        """
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._server = await self._loop.create_server(
            self._new_connection,
            host=self.host,
            port=self.port,
            ssl=self.tls_context if self.implicit_tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s: listening on %s:%d", self.name, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and close every live connection, hung ones included."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        protocols = list(self._protocols)
        self._protocols.clear()
        for protocol in protocols:
            protocol._abort()
        tasks = [
            task
            for protocol in protocols
            if (task := protocol._handler_coroutine) is not None and not task.done()
        ]
        if tasks:
            await asyncio.sleep(0)  # let connection_lost() run
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()
        log.info("%s: stopped", self.name)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> Provider:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _new_connection(self) -> _ProviderSMTP:
        # Counted here, not in connection_made(): STARTTLS runs that again.
        assert self._loop is not None
        self.connections += 1
        protocol = _ProviderSMTP(self, self.connections, self._loop)
        self._protocols.add(protocol)
        self._notify()
        return protocol

    # -- rules ------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        """Append a rule (evaluated after the existing ones); returns it."""
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove all rules: everything is accepted again."""
        self.rules.clear()

    def _match(
        self,
        stage: str,
        *,
        rcpt: str | None = None,
        rcpts: Sequence[str] = (),
        content: bytes | None = None,
    ) -> Rule | None:
        for rule in list(self.rules):
            if rule.matches(stage, rcpt=rcpt, rcpts=rcpts, content=content):
                rule.applied += 1
                return rule
        return None

    # -- records ----------------------------------------------------------------

    def received_for(self, rcpt: str) -> list[ReceivedMessage]:
        """Accepted messages that have ``rcpt`` among their accepted recipients."""
        wanted = rcpt.lower()
        return [m for m in self.messages if any(r.lower() == wanted for r in m.rcpts)]

    def clear_records(self) -> None:
        """Forget what was received (messages, commands, counters); rules stay."""
        self.messages.clear()
        self.dropped_after_data.clear()
        self.auth_attempts.clear()
        self.commands.clear()
        self.errors.clear()
        self.connections = 0

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.messages)} message(s) accepted, "
            f"{len(self.dropped_after_data)} dropped after DATA, "
            f"{self.connections} connection(s), last commands {self.commands[-8:]}"
        )

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _record(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)
        self._notify()

    def _record_dropped(self, message: ReceivedMessage) -> None:
        self.dropped_after_data.append(message)
        self._notify()

    def _note_command(self, name: str, arg: str | None) -> None:
        if arg is None:
            line = name
        elif name == "AUTH":
            mechanism, *rest = arg.split() or [""]
            line = f"AUTH {mechanism}" + (" <redacted>" if rest else "")
        else:
            line = f"{name} {arg}"
        self.commands.append(line)
        self._notify()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        self.auth_attempts.append((mechanism, user))
        self._notify()
        users = self.auth or {}
        ok = user in users and secrets.compare_digest(
            users[user].encode("utf-8"), password.encode("utf-8")
        )
        # A failure without message makes aiosmtpd answer "535 5.7.8 ...".
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # -- waiting ----------------------------------------------------------------

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> None:
        """Wait (event-based) until ``predicate()`` holds; re-checked on every change."""
        if self._changed is None:
            raise RuntimeError(f"{self!r} was never started")
        changed = self._changed

        async def until() -> None:
            while not predicate():
                changed.clear()
                await changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {what}; {self.summary()}"
            ) from None

    async def wait_for_messages(self, n: int, timeout: float = 10) -> None:
        """Wait until at least ``n`` messages were accepted."""
        await self.wait_until(lambda: len(self.messages) >= n, timeout, f"{n} message(s)")

    async def wait_for_connections(self, n: int, timeout: float = 10) -> None:
        """Wait until at least ``n`` connections were accepted."""
        await self.wait_until(lambda: self.connections >= n, timeout, f"{n} connection(s)")


# ------------------------------------------------------------------------ threads


class ProviderThread:
    """A :class:`Provider` running in its own event loop in a background thread.

    For synchronous callers (``relay demo``, tests that drive subprocesses)::

        with ProviderThread("legacy") as legacy:
            legacy.provider.add(Rule("defer", times=1))
            ...
            legacy.wait_for_messages(2)
            assert legacy.provider.messages[0].rcpts == [...]

    Keyword arguments go to :class:`Provider`.  Reading the provider's records
    and appending rules from another thread is safe; use :meth:`call` or
    :meth:`run` for anything more involved.
    """

    def __init__(self, name: str = "provider", **kwargs: Any) -> None:
        self.provider = Provider(name, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.provider.host

    @property
    def port(self) -> int:
        return self.provider.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.provider.messages

    def start(self) -> ProviderThread:
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.provider.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.provider.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=serve, name=f"provider-{self.provider.name}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self

    def stop(self, timeout: float = 10) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(RuntimeError):  # loop already gone
            asyncio.run_coroutine_threadsafe(self.provider.stop(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run a coroutine in the provider's loop and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("ProviderThread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[..., _T], *args: Any, timeout: float | None = 10) -> _T:
        """Call a plain function in the provider's loop thread and return its result."""

        async def call_it() -> _T:
            return fn(*args)

        return self.run(call_it(), timeout)

    def wait_for_messages(self, n: int, timeout: float = 10) -> None:
        """Block until at least ``n`` messages were accepted (TimeoutError otherwise)."""
        self.run(self.provider.wait_for_messages(n, timeout), timeout + 5)

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> None:
        self.run(self.provider.wait_until(predicate, timeout, what), timeout + 5)

    def __enter__(self) -> ProviderThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
