"""The one place that touches aiosmtplib's private names.

aiosmtplib stays the protocol engine (connecting, EHLO, STARTTLS, AUTH, reply
parsing), but it has no pipelining (DESIGN trap 10) and no streamed DATA
(trap 11), so our transaction needs a protocol that can take several replies
per write, a way to use it as the connection's protocol, and its flow control.
None of that is public API, so pyproject.toml bounds aiosmtplib to the
versions checked here.

Checked against aiosmtplib 5.1.3 (installed; tests/test_provider_conn.py
exercises every name below) and compared with the sources of 4.0.2, 5.0.0,
5.1.2 and the main branch of 2026-06-17. Before 5.1.3 there is no
`_set_response_exception` and no `_on_connection_lost`, and `_get_tls_context`
is not a coroutine; `_response_pending` is missing up to 5.1.2 and
`MAX_RESPONSE_LENGTH` before 5.1.2. So 5.1.3 is the first version this works
with, and even patch releases change these names: re-check every one of them
before widening the bound.

Private names used, and why:

- `aiosmtplib.email.quote_address` (a module outside `aiosmtplib.__all__`): the
  address quoting and validation aiosmtplib's own MAIL/RCPT apply (its defence
  against command injection, DESIGN trap 17), for our pipelined commands.
- `aiosmtplib.protocol.SMTPProtocol`, subclassed as `Protocol`, and its
  `_buffer`, `_read_response_from_buffer`, `_response_waiter`,
  `_set_response_exception`, `_response_pending`, `_loop`: to parse and queue
  every reply in a read instead of one (pipelining), with its own parser and
  errors, and to wait for a reply with a timer rather than `asyncio.wait_for`
  (`read_response` is aiosmtplib's otherwise: the same waiter, errors and reset).
- `aiosmtplib.protocol.MAX_RESPONSE_LENGTH`, `MAX_LINE_LENGTH`: the same bounds
  on an unparsed reply and a reply line that aiosmtplib applies.
- `SMTPProtocol._command_lock`: held for a whole transaction, so none of
  aiosmtplib's own commands can interleave with ours.
- `_connection_lost`, `_paused`, `_drain_helper` (aiosmtplib's copy of
  asyncio's FlowControlMixin): to drain after each chunk of streamed content.
- `SMTP._create_connection`, overridden, with `_get_tls_context`,
  `_get_default_port` and `_on_connection_lost`: the only way to make
  aiosmtplib's client connect with `Protocol` instead of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.email import quote_address as _quote_address
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol

from relay.mailbox import PLAIN_MAILBOX

__all__ = ["SMTP", "Protocol", "quote_address"]

_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def quote_address(address: str) -> str:
    """`<address>` for MAIL/RCPT, as aiosmtplib quotes and checks it; a plain mailbox
    (or the null path) directly: its `email.utils.parseaddr` round was 4 % of the
    loop's time under load, and gives the same for these (tests/test_mailbox_fastpath.py)."""
    if not address or PLAIN_MAILBOX.fullmatch(address):
        return f"<{address}>"
    return _quote_address(address)


class Protocol(SMTPProtocol):
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
        # replies to commands already written are still to come after this read:
        # acknowledge it at once (see `_acknowledge`)
        self.quickack = False
        self._socket: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._socket = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        replies = self.replies
        if replies is None:
            super().data_received(data)
            return
        if self.quickack:
            self._acknowledge()
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

    def _acknowledge(self) -> None:
        """Send the ACK of what was just read now, not up to 40 ms later (Linux's
        delayed ACK): a provider that wrote the reply to one transaction's "." and
        then, separately, those to the next one's commands (written behind the
        ".") holds the second write until the first is acknowledged (Nagle), and
        we have nothing to send that would carry the ACK sooner. Measured with
        Postfix's smtp-sink at 100 KiB: a 40 ms stall a message without it."""
        if _TCP_QUICKACK is not None and self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def _read_response_from_buffer(self) -> SMTPResponse | None:
        """aiosmtplib's parser, a one-line reply (nearly every one) taken directly:
        the same answer without its per-line bytearray (tests/test_provider_conn.py)."""
        buf = self._buffer
        end = buf.find(b"\n")
        if end < 0:
            return None
        if 4 <= end < MAX_LINE_LENGTH and buf[3:4] == b" " and buf[:3].isdigit():
            line = bytes(buf[: end + 1])
            del buf[: end + 1]
            text = line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            return SMTPResponse(int(line[:3]), text)
        return super()._read_response_from_buffer()

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        """aiosmtplib's, with a timer on its waiter instead of `asyncio.wait_for` (a
        future and two callbacks more per reply: 2 % of a loaded relay's loop)."""
        replies = self.replies
        waiter = self._response_waiter
        if replies and (waiter is None or not waiter.done()):
            return replies.popleft()  # the waiter, when done, holds an earlier one
        if waiter is None:
            raise SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        timer = None
        if timeout is not None and not waiter.done():
            timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._response_pending = False
            # a new waiter for the next reply (none once disconnected), as aiosmtplib's
            self._response_waiter = None if self.transport is None else self._loop.create_future()

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

    async def drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is full (flow control); raise if the
        connection is gone, so content is never written into the void."""
        if self._connection_lost:
            raise ConnectionResetError("Connection lost")
        if self._paused:
            async with asyncio.timeout(timeout):
                await self._drain_helper()


def _expire(waiter: asyncio.Future[SMTPResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))


class SMTP(aiosmtplib.SMTP):
    """aiosmtplib's client on `Protocol`, connecting to an address (`hostname`)
    while verifying implicit TLS against a name (`server_hostname`)."""

    def __init__(self, *, server_hostname: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_hostname = server_hostname

    def pipeline(self) -> tuple[Protocol, asyncio.Lock]:
        """The protocol to write our commands on, and the lock to hold meanwhile."""
        proto = self.protocol
        if not isinstance(proto, Protocol) or proto._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        return proto, proto._command_lock

    async def _create_connection(self, timeout: float | None) -> SMTPResponse:
        # aiosmtplib 5.1.3's own, for a host and port, with `Protocol` as the protocol.
        if self.loop is None:
            raise RuntimeError("No event loop set")
        protocol = Protocol(loop=self.loop, connection_lost_callback=self._on_connection_lost)
        tls = await self._get_tls_context() if self.use_tls else None
        host, port = self.hostname or "localhost", self.port or self._get_default_port()
        try:
            transport, _ = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: protocol, host=host, port=port, ssl=tls,
                    server_hostname=(self.server_hostname or host) if tls else None,
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
