"""`Provider`: a scriptable SMTP server on a loopback address, and `ProviderThread`,
the same in a thread of its own for synchronous callers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

from relay.testing.rules import ReceivedMessage, Rule
from relay.testing.server import DEFAULT_SIZE_LIMIT, Handler, ProviderSMTP, hostname_for

log = logging.getLogger("relay.testing")

_T = TypeVar("_T")


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
        dsn: bool = False,
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
        self.dsn = dsn  # offers DSN (RFC 3461) and takes RET/ENVID/NOTIFY/ORCPT
        self.max_line_length = max_line_length
        self.size_limit = size_limit
        self.timeout = timeout
        self.hostname = hostname or hostname_for(name)

        self.rules: list[Rule] = []
        self.messages: list[ReceivedMessage] = []
        # called with each message accepted, e.g. to file it in a mail store (relay.dovecot)
        self.on_message: Callable[[ReceivedMessage], None] | None = None
        self.dropped_after_data: list[ReceivedMessage] = []
        self.connections = 0
        self.auth_attempts: list[tuple[str, str]] = []
        self.commands: list[str] = []
        self.errors: list[Exception] = []

        self._handler = Handler(self)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._protocols: set[ProviderSMTP] = set()

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

    def _new_connection(self) -> ProviderSMTP:
        # Counted here, not in connection_made(): STARTTLS runs that again.
        assert self._loop is not None
        self.connections += 1
        protocol = ProviderSMTP(self, self.connections, self._loop)
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
