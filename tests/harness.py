"""The one test harness: one relay.yaml builder, one in-process relay, one subprocess.

* `relay_settings()` builds every relay.yaml a test runs a relay with: a dict of
  SPEC keys (so a key can never be written twice), the suite's loopback
  defaults, then the test's overrides merged in (dicts, or YAML text).
  `write_config()` writes raw YAML text, for the tests of the YAML parser itself.
* `RelayEnv` is a relay running in the test's event loop (`Relay.start()`,
  port 0), with the paths and helpers a test inspects; the `relay_env` fixture
  (tests/conftest.py) puts it between two loopback `Provider`s, the
  `relay_factory` fixture (tests/helpers_ingress.py) in front of refused ports.
* `RelayProcess` (tests/relayproc.py) is a real `python -m relay serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import subprocess
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from relay import config
from relay.app import Relay
from relay.spool import Spool
from relay.testing import Provider

PILOTS = """\
new_domains:
  example.com: example-new.com
  dev.example.com: dev.example-new.com
pilots:
  - address: alice@example.com
    group: sales
  - address: bob@example.com
    group: support
    mode: new-only
    new_address: robert@example-new.com
  - address: "*@dev.example.com"
    group: dev
  - address: carol@example.com
    group: marketing
    cutover_at: 2031-03-01T18:00:00+01:00
  - address: dave@example.com
    group: support
    mode: legacy-only
"""

NODE = "test-node"
HOSTNAME = "relay.test"

Override = Mapping[str, Any] | str | None


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


def write_config(folder: Path, relay: str = "", pilots: str = PILOTS) -> Path:
    """relay.yaml from raw text (SPEC defaults unless given) and its pilot file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot-users.yaml").write_text(pilots)
    cfg = folder / "relay.yaml"
    cfg.write_text(textwrap.dedent(relay) if relay else "domains: [example.com, dev.example.com]\n")
    return cfg


def merged(base: Mapping[str, Any], override: Override) -> dict[str, Any]:
    """`base` with `override` (a dict, or YAML text of one) merged in, mappings deeply."""
    if isinstance(override, str):
        override = yaml.safe_load(textwrap.dedent(override)) or {}
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def flow(fragment: str) -> dict[str, Any]:
    """Keys written as the tail of a YAML flow mapping, e.g. `", tls: starttls"`."""
    text = fragment.strip().lstrip(",")
    return yaml.safe_load("{" + text + "}") if text.strip() else {}


def relay_settings(
    legacy_port: int, new_port: int, *overrides: Override, provider: Override = None
) -> dict[str, Any]:
    """The settings of a relay under test: loopback defaults, then `overrides` in order.

    `provider` keys go to both providers (e.g. timeouts); a test's own
    `providers: {legacy: {...}}` override comes on top.
    """
    settings: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "hostname": HOSTNAME},
        "node": NODE,
        "domains": ["example.com", "dev.example.com"],
        "providers": {
            "legacy": merged({"port": legacy_port}, provider),
            "new": merged({"port": new_port}, provider),
        },
        "spool": "../var/spool",
        "log": "../var/deliveries.jsonl",
        "shutdown_timeout": 2,
        "limits": {"min_free_space": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "workers": 1,  # tests look into spool/queue/; tests/test_workers.py runs N
    }
    for override in overrides:
        settings = merged(settings, override)
    return settings


def write_relay(folder: Path, settings: Mapping[str, Any], pilots: str = PILOTS) -> Path:
    """Write `settings` as relay.yaml (plus the pilot file) into `folder`."""
    return write_config(folder, yaml.safe_dump(dict(settings)), pilots)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str, options: str = "") -> Iterator[Path]:
    """A small tmpfs at `mountpoint` (a full or read-only disk for fault tests; root
    may mount one, else the test is skipped), unmounted afterwards."""
    import pytest

    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = ",".join(o for o in (options, f"size={size}") if o)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mountpoint)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections for as long as the socket is kept."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def read_content(spool: Spool, queue_id: str) -> bytes:
    """A queued message's content as the providers will get it (tests only)."""
    fh, length = spool.open_content(queue_id)
    with fh:
        return fh.read(length)


@dataclass
class RelayEnv:
    """A relay in this process (between `legacy` and `new` when they are given)."""

    relay: Relay
    folder: Path  # the config folder
    legacy: Provider | None = None
    new: Provider | None = None
    dead: list[socket.socket] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        folder: Path,
        settings: Mapping[str, Any],
        pilots: str = PILOTS,
        legacy: Provider | None = None,
        new: Provider | None = None,
        **relay_kwargs: Any,
    ) -> RelayEnv:
        relay = Relay(config.load(write_relay(folder, settings, pilots)), **relay_kwargs)
        return cls(relay, folder, legacy, new)

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def cfg(self) -> config.Config:
        return self.relay.cfg

    @property
    def config_path(self) -> Path:
        return self.folder / "relay.yaml"

    @property
    def spool_queue(self) -> Path:
        return self.relay.spool.queue

    @property
    def log_path(self) -> Path:
        return self.relay.cfg.relay.log

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        out = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        return [e for e in out if kind is None or e["event"] == kind]

    def content(self, queue_id: str) -> bytes:
        return read_content(self.relay.spool, queue_id)

    async def send(
        self,
        rcpts: list[str],
        data: bytes = b"Subject: t\r\n\r\nhello\r\n",
        sender: str = "sender@example.org",
    ) -> str:
        """Send one message with aiosmtplib; return the queue id from the 250 reply."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False, timeout=10)
        await smtp.connect()
        try:
            errors, reply = await smtp.sendmail(sender, rcpts, data)
        finally:
            await smtp.quit()
        assert not errors, errors
        return reply.rsplit(" ", 1)[1]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def client(self) -> RawClient:
        return await RawClient.open(self.port)

    async def wait_idle(self, timeout: float = 10) -> None:
        await self.wait_for(lambda: not self.relay.scheduler.messages, timeout, "empty queue")

    async def stop(self) -> None:
        if self.relay.port:
            await self.relay.stop()
        for s in self.dead:
            s.close()
