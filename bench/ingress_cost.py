"""What the SMTP session machinery costs per inbound session, against a floor.

The relay's session class (`RelaySMTP`: the relay's own SMTP engine with its
dialogue and DATA reader; aiosmtpd's command loop until issue 20) with a policy
that accepts everything and stores nothing, beside a bare asyncio.Protocol that
gives the same replies and checks nothing: the floor a command loop could approach. Both are driven
in one process by the same client doing smtp-source's dialogue (a connection
per message: greeting, EHLO, MAIL, RCPT, DATA, 10 KiB, QUIT; no pipelining),
20 sessions at a time; the figure is CPU per session, client included (the
client's share is the same on both sides, so the difference is the server's).

Usage: python bench/ingress_cost.py [N=4000]   (loopback only, N bounded to 100,000)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.ingress.protocol import RelaySMTP, SessionLimits  # noqa: E402

SESSIONS = 20
BODY = (b"x" * 70 + b"\r\n") * 140  # about 10 KiB
EHLO_REPLY = (
    b"250-relay\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 HELP\r\n"
)


class _Sink:
    """A message that goes nowhere."""

    async def write(self, data: bytes) -> None:
        pass

    async def abort(self) -> None:
        pass

    async def finish(self, parser: object) -> str:
        return "250 2.0.0 Ok: queued as X"


class _AcceptAll:
    """The relay's SessionPolicy and engine handler, accepting everything."""

    shutting_down = False

    def admit(self, server: RelaySMTP) -> None:
        return None

    def release(self, server: RelaySMTP) -> None:
        pass

    async def data_refusal(self, server: RelaySMTP) -> None:
        return None

    def begin_message(self, server: RelaySMTP) -> _Sink:
        return _Sink()

    async def internal_error(self, server: RelaySMTP, error: Exception) -> str:
        return "451 4.3.0 internal error"

    def log_reject(self, *args: Any) -> None:
        pass

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        return "451 4.3.0 internal error"


class _Floor(asyncio.Protocol):
    """The same replies from a line splitter: no checks, no limits, no timers."""

    def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio.Transport
        self.transport = transport
        self.buf = b""
        self.in_data = False
        transport.write(b"220 relay ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        replies = {b"EHLO": EHLO_REPLY, b"MAIL": b"250 2.1.0 Ok\r\n", b"RCPT": b"250 2.1.5 Ok\r\n"}
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buf, self.in_data = self.buf[end + 5 :], False
                self.transport.write(b"250 2.0.0 Ok: queued as X\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            verb, self.buf = self.buf[:4].upper(), self.buf[end + 2 :]
            if verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(replies.get(verb, b"500 5.5.2 Error\r\n"))


async def _client(port: int, n: int) -> None:
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for command in (b"EHLO client.test", b"MAIL FROM:<a@origin.test>",
                        b"RCPT TO:<pilot@example.com>", b"DATA"):  # fmt: skip
            writer.write(command + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        writer.write(BODY + b".\r\n")
        await reader.readline()
        writer.write(b"QUIT\r\n")
        await reader.readline()
        writer.close()


async def _measure(kind: str, n: int) -> float:
    loop = asyncio.get_running_loop()
    if kind == "relay":
        limits = SessionLimits(10_240_000, 65_536, 300, False, 20, 100)
        policy = _AcceptAll()

        def factory() -> asyncio.BaseProtocol:
            return RelaySMTP(
                policy, limits, hostname="relay", ident="ESMTP relay", tls_context=None,
                timeout=300, loop=loop,
            )  # fmt: skip
    else:
        factory = _Floor
    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.process_time()
    await asyncio.gather(*(_client(port, n // SESSIONS) for _ in range(SESSIONS)))
    used = time.process_time() - started
    server.close()
    return used / (n // SESSIONS * SESSIONS) * 1e6


def main() -> None:
    n = min(int(sys.argv[1]) if len(sys.argv) > 1 else 4000, 100_000)
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    figures: dict[str, list[float]] = {"relay": [], "floor": []}
    for _ in range(2):
        for kind in figures:
            figures[kind].append(run(_measure(kind, n)))
    relay, floor = min(figures["relay"]), min(figures["floor"])
    print(f"{n} sessions, {SESSIONS} at a time, 10 KiB each, CPU per session (client included):")
    print(f"  relay's session class (its own engine):  {relay:5.0f} us")
    print(f"  bare protocol, same replies (the floor): {floor:5.0f} us")
    print(f"  difference, the server's machinery:      {relay - floor:5.0f} us")


if __name__ == "__main__":
    main()
