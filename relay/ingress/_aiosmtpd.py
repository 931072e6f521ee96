"""The one place the ingress touches aiosmtpd's internals (checked against aiosmtpd 1.4.6).

aiosmtpd has no API for what the ingress needs around its command loop: a
streaming DATA reader, command limits per session, a reply on idle timeout,
the name of each command as it starts, an idle timer that a junk command
does not restart, ending a session from inside a command, and a cheaper
construction. `AiosmtpdSMTP` gives each private name it uses a
public method here, with the reason; nothing else in `relay/ingress/` names
one. pyproject.toml pins `aiosmtpd<1.5`: a new minor version means reading
this file against its `aiosmtpd/smtp.py` again before raising the bound.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import types
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd import smtp as _smtp_module

# Public in aiosmtpd (its `__all__`), imported here so the ingress has one door to it.
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from relay.dsn import MailDsn, RcptDsn
from relay.ingress.clienttext import printable
from relay.log import oplog
from relay.mailbox import PLAIN

__all__ = [
    "AiosmtpdSMTP", "DsnEnvelope", "Envelope", "Session", "TLSSetupException",
    "route_library_log", "syntax",
]  # fmt: skip
# The logger aiosmtpd writes to; its messages quote client commands raw.
_LIBRARY_LOGGER = "mail.log"


class _EscapedLog(logging.Handler):
    """aiosmtpd's warnings and errors as operational-log events, client text escaped.

    Without it Python's last-resort handler prints them raw on stderr: a
    command of terminal escapes or a TLS record would reach the terminal as is.
    """

    def emit(self, record: logging.LogRecord) -> None:
        log = oplog.error if record.levelno >= logging.ERROR else oplog.warning
        log("aiosmtpd", message=printable(record.getMessage()))


def route_library_log() -> None:
    """Send aiosmtpd's log (WARNING and up) to the operational log, escaped; once per process."""
    logger = logging.getLogger(_LIBRARY_LOGGER)
    if not any(isinstance(h, _EscapedLog) for h in logger.handlers):
        logger.addHandler(_EscapedLog(logging.WARNING))
        logger.propagate = False


class DsnEnvelope(Envelope):
    """aiosmtpd's envelope with the RFC 3461 parameters of MAIL and of each RCPT
    (relay/dsn.py), which aiosmtpd itself does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_dsn = MailDsn()
        self.rcpt_dsn: list[RcptDsn] = []  # one per `rcpt_tos` entry


class _CommandLimits(dict[str, int]):
    """Per-session command line limits that stay fixed.

    aiosmtpd keeps them in a class-level dict that every new connection clears
    and every EHLO raises (`['MAIL'] += 26`): after a few EHLOs any MAIL line
    passed, and one client's EHLO changed every other session's limit.
    """

    def __init__(self, default: int, limits: dict[str, int]) -> None:
        super().__init__()
        self.default = default
        for command, limit in limits.items():
            dict.__setitem__(self, command, limit)

    def __missing__(self, key: str) -> int:
        return self.default

    def __setitem__(self, key: str, value: int) -> None:
        pass  # ignore aiosmtpd's per-EHLO increments


class _CachedIntrospection:
    """What aiosmtpd's `SMTP.__init__` asks `inspect` and `dir` on every connection,
    computed once per class: it was 18 % of the event loop's time under load
    (py-spy, bench/dual_bench.sh). Answers are the same: only names starting
    with `auth_`, `handle_` and `smtp_` are looked up, and those live on classes.
    """

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}
        self._signatures: dict[Any, inspect.Signature] = {}

    def _class_names(self, obj: object) -> list[str]:
        cls = type(obj)
        if cls not in self._names:
            self._names[cls] = [n for n in dir(cls) if n.startswith(("auth_", "handle_", "smtp_"))]
        return self._names[cls]

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        return [(n, getattr(obj, n)) for n in self._class_names(obj) if n.startswith("auth_")]

    def dir(self, obj: object) -> list[str]:
        return self._class_names(obj)

    def signature(self, fn: Any) -> inspect.Signature:
        key = (type(fn), getattr(fn, "__func__", fn))
        if key not in self._signatures:
            self._signatures[key] = inspect.signature(fn)
        return self._signatures[key]


_introspection = _CachedIntrospection()
# `<plain mailbox>` with no comment after it: the path nearly every MAIL and RCPT
# carries, for which the `email` header parser (aiosmtpd's `_getaddr`: 12 % of
# the loop's time under load) gives this same answer.
_SIMPLE_PATH = re.compile(rf"[ \t]*<({PLAIN})>")
_Command = Callable[[Any, str | None], Awaitable[None]]
_announcing_by_class: dict[type, dict[str, _Command]] = {}


def _announcing(server: AiosmtpdSMTP) -> dict[str, _Command]:
    """Each `smtp_*` function of the server's class, calling `on_command` first.

    Built once per class: wrapping per connection doubled what a connection
    costs to set up (17 → 37 µs); binding the cached functions costs 1.6 µs.
    """
    cls = type(server)
    if cls not in _announcing_by_class:
        _announcing_by_class[cls] = {
            name: _announced(name, method.__func__) for name, method in server._smtp_methods.items()
        }
    return _announcing_by_class[cls]


def _announced(name: str, fn: _Command) -> _Command:
    @functools.wraps(fn)  # keeps `@syntax`'s attributes, which HELP reads
    async def run(self: AiosmtpdSMTP, arg: str | None) -> None:
        self.on_command(name)
        await fn(self, arg)

    return run


class AiosmtpdSMTP(SMTP):
    """aiosmtpd's `SMTP` protocol with the private parts the ingress uses behind names."""

    def __init__(
        self, handler: Any, *, command_limit: int, command_limits: dict[str, int], **kwargs: Any
    ) -> None:
        # Module globals `inspect` and `dir`: `SMTP.__init__` looks them up in
        # aiosmtpd.smtp's namespace at call time to build its command tables.
        # Only this (synchronous) construction sees the cached answers.
        module = vars(_smtp_module)
        saved = module["inspect"]
        module["inspect"], module["dir"] = _introspection, _introspection.dir
        try:
            super().__init__(handler, **kwargs)
        finally:
            module["inspect"] = saved
            del module["dir"]
        # `command_size_limits`: read per command by `_handle_client`; the class-level
        # dict it replaces is shared by all sessions (see `_CommandLimits`).
        self.command_size_limits = _CommandLimits(command_limit, command_limits)
        # `_smtp_methods`: the table `_handle_client` dispatches each command from,
        # built by `SMTP.__init__` (bound `smtp_*` methods); replaced by the same
        # methods wrapped so that `on_command` sees every command start.
        self._smtp_methods = {
            name: types.MethodType(fn, self) for name, fn in _announcing(self).items()
        }
        self._replaced_deadline: float | None = None

    def on_command(self, name: str) -> None:
        """A recognised command starts; the idle timer has just been restarted for it."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # `_getaddr`: how aiosmtpd's MAIL and RCPT take the path from their argument
        # (address, rest); the common case is answered without `email`'s parser,
        # with the same result and the same local-part limit (tests/test_mailbox_fastpath.py).
        m = _SIMPLE_PATH.match(arg) if arg else None
        if m is None or "(" in arg[m.end() :]:
            return super()._getaddr(arg)
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[m.end() :].lstrip(" \t")

    def _create_envelope(self) -> DsnEnvelope:
        # `_create_envelope`: where aiosmtpd makes each transaction's envelope (at
        # connect, RSET, EHLO and after DATA); ours also holds the DSN parameters.
        return DsnEnvelope()

    @property
    def tls_active(self) -> bool:
        """TLS is up on this connection (a second STARTTLS must be refused)."""
        # `_tls_protocol`: set by `smtp_STARTTLS`; aiosmtpd has no public flag, and
        # `session.ssl` is only filled in once the handshake is done.
        return self._tls_protocol is not None

    async def read_some(self, n: int) -> bytes:
        """Up to `n` octets from the client, as they come (EOF: empty)."""
        # `_reader`: the StreamReader aiosmtpd's command loop reads from; its own
        # DATA reads whole lines into memory, this one streams.
        return await self._reader.read(n)

    def unread(self, data: bytes) -> None:
        """Give pipelined commands read past the end of DATA back to the command loop."""
        # `StreamReader._buffer` (asyncio's): the bytearray `readuntil` consumes;
        # StreamReader has no public way to push data back.
        self._reader._buffer[0:0] = data  # type: ignore[attr-defined]

    async def write_raw(self, data: bytes) -> None:
        """Write reply lines as they are (CRLFs included) and wait for the buffer to drain."""
        # `_writer`: the StreamWriter aiosmtpd's `push` writes each line to.
        self._writer.write(data)
        await self._writer.drain()

    def restart_idle_timer(self) -> None:
        """The client is active: the idle timeout starts again."""
        # `_reset_timeout`: what aiosmtpd calls per command line; a long DATA is
        # many reads of ours, not one command.
        self._reset_timeout()

    def end_transaction(self) -> None:
        """After the reply to DATA: a new, empty envelope (what aiosmtpd's DATA does)."""
        # `_set_post_data_state`: aiosmtpd's own post-DATA reset.
        self._set_post_data_state()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # `_reset_timeout`: aiosmtpd restarts its idle timer here before every command;
        # the deadline it replaces is kept for `keep_idle_deadline`.
        replaced = self._timeout_handle
        super()._reset_timeout(duration)
        self._replaced_deadline = replaced.when() if replaced is not None else None

    def keep_idle_deadline(self) -> None:
        """The command just started is no sign of life: the idle deadline stays what it was."""
        # `_timeout_handle`, `_timeout_cb`: the idle timer aiosmtpd arms and what it calls.
        if self._replaced_deadline is None or self._timeout_handle is None:
            return
        self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_at(self._replaced_deadline, self._timeout_cb)

    def close_with(self, reply: str) -> None:
        """Send a last reply and close (without waiting on a client that does not read)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()

    def end_session(self, reply: str) -> None:
        """From inside a command: `close_with`, and nothing the client pipelined after it runs."""
        self.close_with(reply)
        # `_reader._buffer`: commands already read from the socket (see `unread`);
        # `_handler_coroutine`: the command loop, cancelled as aiosmtpd's own QUIT does.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def on_idle_timeout(self) -> None:
        """The idle timer fired; aiosmtpd closes the connection right after."""

    def _timeout_cb(self) -> None:
        # `_timeout_cb`: aiosmtpd's idle-timer callback; it closes without a reply,
        # and this override is the only way to send one first.
        self.on_idle_timeout()
        super()._timeout_cb()
