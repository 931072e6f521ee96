"""Fixtures for the ingress tests: an in-process relay and a raw-socket SMTP client.

The relay under test runs on the test's event loop (`Relay.start()` with port 0).
Providers point at a loopback port that refuses connections unless a test
passes its own, so accepted mail stays in the spool where the test can read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.app import Relay
from tests.conftest import PILOTS, write_config

NODE = "test-node"
HOSTNAME = "relay.test"
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")


@dataclass
class SMTPReply:
    code: int
    lines: list[str]  # text of each line, without the code and separator

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.lines[-1])
        return m.group(1) if m else None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawClient:
    """SMTP at the byte level: send anything, read replies one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.greeting: SMTPReply | None = None

    @classmethod
    async def open(cls, port: int, *, greeting: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        c = cls(reader, writer)
        if greeting:
            c.greeting = await c.reply()
        return c

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5) -> SMTPReply:
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError(f"connection closed; lines so far: {lines!r}")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                code, sep, text = line[:3], line[3:4], line[4:]
                lines.append(text)
                if sep != "-":
                    return SMTPReply(int(code), lines)

    async def cmd(self, line: str | bytes, timeout: float = 5) -> SMTPReply:
        raw = line.encode() if isinstance(line, str) else line
        await self.send(raw + b"\r\n")
        return await self.reply(timeout)

    async def ehlo(self, name: str = "client.test") -> SMTPReply:
        r = await self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    async def transaction(
        self, rcpts: list[str], data: bytes, sender: str = "sender@origin.test"
    ) -> SMTPReply:
        """MAIL, RCPT..., DATA, content (already dot-stuffed, CRLF) and the final dot."""
        r = await self.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 250, r
        for rcpt in rcpts:
            r = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r
        r = await self.cmd("DATA")
        assert r.code == 354, r
        await self.send(data + b".\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5) -> bool:
        """True once the server has closed the connection (EOF after any pending bytes)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        return True

    async def starttls(self, ca: ssl.SSLContext) -> None:
        await self.writer.start_tls(ca, server_hostname=HOSTNAME)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def dead_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections for as long as the socket is kept."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def relay_yaml(
    legacy_port: int,
    new_port: int,
    *,
    limits: str = "",
    top: str = "",
    spool: str = "../var/spool",
    listen: str = "",
    domains: str = "[example.com, dev.example.com]",
) -> str:
    """relay.yaml for tests: `limits` lines go under `limits:`, `top` lines at the top level."""
    return (
        textwrap.dedent(f"""\
        listen: {{host: 127.0.0.1, port: 0, hostname: {HOSTNAME}{listen}}}
        node: {NODE}
        domains: {domains}
        forward_domains: {{fwd.example.com: example.com}}
        providers:
          legacy: {{port: {legacy_port}, connect_timeout: 1}}
          new: {{port: {new_port}, connect_timeout: 1}}
        spool: {spool}
        log: ../var/deliveries.jsonl
        shutdown_timeout: 1
        metrics: {{host: 127.0.0.1, port: 0}}
        retry: {{schedule: [3600]}}
        limits:
        """)
        + textwrap.indent(textwrap.dedent(limits), "  ")
        + ("" if "min_free_space" in limits else "  min_free_space: 0\n")
        + textwrap.dedent(top)
    )


@dataclass
class RelayEnv:
    """A running relay and the paths a test inspects."""

    relay: Relay
    folder: Path
    _dead: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def spool_queue(self) -> Path:
        return self.relay.spool.queue

    @property
    def log_path(self) -> Path:
        return self.relay.cfg.relay.log

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        out = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [e for e in out if kind is None or e["event"] == kind]

    async def client(self) -> RawClient:
        return await RawClient.open(self.port)

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.01)


RelayFactory = Callable[..., Awaitable[RelayEnv]]


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    """`await relay_factory(limits="max_recipients: 2\\n", ...)` → a started RelayEnv."""
    started: list[RelayEnv] = []

    async def make(
        *,
        limits: str = "",
        top: str = "",
        pilots: str = PILOTS,
        legacy_port: int | None = None,
        new_port: int | None = None,
        name: str = "relay",
        spool: str = "../var/spool",
        listen: str = "",
        domains: str = "[example.com, dev.example.com]",
        start: bool = True,
    ) -> RelayEnv:
        dead: list[socket.socket] = []
        if legacy_port is None:
            s, legacy_port = dead_port()
            dead.append(s)
        if new_port is None:
            s, new_port = dead_port()
            dead.append(s)
        folder = tmp_path / name / "config"
        text = relay_yaml(
            legacy_port, new_port, limits=limits, top=top, spool=spool, listen=listen,
            domains=domains,
        )  # fmt: skip
        path = write_config(folder, text, pilots)
        relay = Relay(config.load(path))
        env = RelayEnv(relay, folder, dead)
        started.append(env)
        if start:
            await relay.start()
        return env

    yield make
    for env in started:
        if env.relay.port:
            await env.relay.stop()
        for s in env._dead:
            s.close()


def spool_messages(queue: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(queue.glob("*.msg"))}
