"""A connection handed over at the final "." (relay/delivery/pool.py, transaction.py).

The next transaction writes MAIL, RCPT and DATA behind the previous one's ".",
before its reply came (RFC 2920 §3.1: content may begin a group), and reads its
replies after that reply. A raw server proves the order on the wire by holding
its reply to "." until the next MAIL has arrived: a client that waited for the
reply first would hang there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from relay.config import ProviderSettings
from relay.delivery.pool import Agent
from relay.delivery.reply import Attempt

pytestmark = pytest.mark.timeout(30)

RCPT = "a@example.com"


class Behind:
    """Answers every command in a write of its own. For the messages in `hold`
    (numbered from 1 over all connections) the reply to "." is held until the
    next line has arrived; `dot_codes` gives a message's reply to "." (250 else);
    at the message in `drop`, it closes the connection instead of answering "."
    (once the next line is there)."""

    def __init__(
        self, hold: set[int], dot_codes: dict[int, int] | None = None, drop: int = 0
    ) -> None:
        self.hold, self.dot_codes, self.drop = hold, dot_codes or {}, drop
        self.bodies: list[bytes] = []
        self.lines: list[bytes] = []  # every line the server read, in order
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1

        async def say(line: bytes) -> None:
            writer.write(line)
            await writer.drain()

        async def read() -> bytes:
            line = await reader.readline()
            self.lines.append(line)
            return line

        try:
            await say(b"220 behind ESMTP\r\n")
            await read()
            await say(b"250-behind\r\n250-PIPELINING\r\n250 SIZE 99999999\r\n")
            pending: bytes | None = None
            while True:
                line = pending if pending is not None else await read()
                pending = None
                if not line or line.startswith(b"QUIT"):
                    await say(b"221 bye\r\n")
                    return
                if line.startswith((b"MAIL", b"RCPT", b"RSET")):
                    await say(b"250 2.0.0 ok\r\n")
                    continue
                assert line == b"DATA\r\n", line
                await say(b"354 go ahead\r\n")
                body = bytearray()
                while (line := await read()) != b".\r\n":
                    assert line, "connection closed inside DATA"
                    body += line
                self.bodies.append(bytes(body))
                n = len(self.bodies)
                if n in self.hold or n == self.drop:
                    pending = await read()  # the next transaction, written behind the "."
                if n == self.drop:
                    writer.transport.abort()
                    return
                code = self.dot_codes.get(n, 250)
                await say(
                    b"%d 2.0.0 Ok: queued as P%d\r\n" % (code, n)
                    if code == 250
                    else b"%d no\r\n" % code
                )
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server:
            self.server.close()


def body(n: int) -> bytes:
    return b"Subject: m%d\r\n\r\nmessage %d\r\n" % (n, n)


async def chain(agent: Agent, port: int, count: int) -> list[Attempt]:
    """`count` transactions, each started when the one before hands the connection
    over (as the scheduler's slot does): one slot's worth of work."""
    cfg = ProviderSettings(
        host="127.0.0.1", port=port, connect_timeout=2, command_timeout=2, data_timeout=2
    )
    tasks: list[asyncio.Task[Attempt]] = []

    def start(n: int) -> None:
        follow: Callable[[], None] | None = (lambda: start(n + 1)) if n < count else None
        tasks.append(
            asyncio.create_task(
                agent.send(cfg, "s@example.org", [RCPT], body(n), [], "relay.test", written=follow)
            )
        )

    start(1)
    # each task starts the next before its own end: once those known are done,
    # every one they started is known too
    while not (len(tasks) == count and all(t.done() for t in tasks)):
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return [t.result() for t in tasks]


async def test_the_next_transaction_is_written_behind_the_final_dot() -> None:
    server = Behind(hold={1, 2, 3, 4})
    await server.start()
    agent = Agent()
    try:
        attempts = await chain(agent, server.port, 5)
        assert [a.replies[RCPT].code for a in attempts] == [250] * 5
        assert [a.remote_id for a in attempts] == ["P1", "P2", "P3", "P4", "P5"]
        assert server.bodies == [body(n) for n in range(1, 6)]
        assert server.connections == 1  # one connection carried all five
        assert not any(line.startswith(b"RSET") for line in server.lines)  # "." ends each
    finally:
        await agent.close()
        await server.stop()


async def test_each_transaction_gets_its_own_final_reply() -> None:
    """A refusal of the first message's content is the first's; the one written
    behind it is accepted, and neither reply goes to the other."""
    server = Behind(hold={1}, dot_codes={1: 554})
    await server.start()
    agent = Agent()
    try:
        first, second = await chain(agent, server.port, 2)
        assert (first.replies[RCPT].code, first.replies[RCPT].stage) == (554, "after_data")
        assert (second.replies[RCPT].code, second.remote_id) == (250, "P2")
        assert server.connections == 1
    finally:
        await agent.close()
        await server.stop()


async def test_a_connection_lost_before_the_first_reply_defers_it_and_resends_the_next() -> None:
    """The provider may have the first message (its "." was written): a deferral
    with no reply. The one behind it cannot have been taken (no 354 came): it goes
    again at once on a new connection, within the same attempt."""
    server = Behind(hold=set(), drop=1)
    await server.start()
    agent = Agent()
    try:
        first, second = await chain(agent, server.port, 2)
        reply = first.replies[RCPT]
        assert (reply.code, reply.stage, reply.permanent) == (None, "after_data", False)
        assert (second.replies[RCPT].code, second.remote_id) == (250, "P2")
        assert server.connections == 2
        assert server.bodies == [body(1), body(2)]
    finally:
        await agent.close()
        await server.stop()
