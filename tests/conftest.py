"""Shared fixtures: config files in a temp folder, free ports, the relay process."""

from __future__ import annotations

import asyncio
import json
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

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


def read_content(spool: Spool, queue_id: str) -> bytes:
    """A queued message's content, whole (the relay itself only ever streams it)."""
    fh, length = spool.open_content(queue_id)
    with fh:
        return fh.read(length)


def write_config(folder: Path, relay: str = "", pilots: str = PILOTS) -> Path:
    """A relay.yaml (SPEC defaults unless overridden) and its pilot file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot-users.yaml").write_text(pilots)
    cfg = folder / "relay.yaml"
    cfg.write_text(textwrap.dedent(relay) if relay else "domains: [example.com, dev.example.com]\n")
    return cfg


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A test certificate authority; providers' and the relay's certificates come from it."""
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """Server side TLS for a loopback provider, valid for 127.0.0.1 and localhost."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "config"


class RelayEnv:
    """A relay in this process between two loopback providers, plus helpers to drive it."""

    def __init__(
        self, folder: Path, legacy: Provider, new: Provider, extra: str, pilots: str,
        legacy_opts: str = "",
    ):  # fmt: skip
        self.folder = folder
        self.legacy = legacy
        self.new = new
        relay_yaml = (
            f"listen: {{port: 0}}\nnode: test-node\ndomains: [example.com, dev.example.com]\n"
            f"providers:\n  legacy: {{port: {legacy.port}{legacy_opts}}}\n"
            f"  new: {{port: {new.port}}}\n"
            "spool: ../var/spool\nlog: ../var/deliveries.jsonl\nshutdown_timeout: 5\n"
            "limits: {min_free_space: 0}\nmetrics: {port: 0}\n" + extra
        )
        self.config_path = write_config(folder / "config", relay_yaml, pilots)
        self.cfg = config.load(self.config_path)
        self.relay = Relay(self.cfg)

    @property
    def port(self) -> int:
        return self.relay.port

    async def send(
        self,
        rcpts: list[str],
        data: bytes = b"Subject: t\r\n\r\nhello\r\n",
        sender: str = "sender@example.org",
    ) -> str:
        """Send one message; return the queue id from the 250 reply."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False, timeout=10)
        await smtp.connect()
        try:
            errors, reply = await smtp.sendmail(sender, rcpts, data)
        finally:
            await smtp.quit()
        assert not errors, errors
        return reply.rsplit(" ", 1)[1]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.cfg.relay.log
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if kind is None or e["event"] == kind]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def wait_idle(self, timeout: float = 10) -> None:
        await self.wait_for(lambda: not self.relay.scheduler.messages, timeout, "empty queue")


@pytest.fixture
async def relay_env(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RelayEnv]]]:
    """Factory: `env = await relay_env(extra_yaml, pilots=...)` starts providers and relay."""
    envs: list[RelayEnv] = []
    providers: list[Provider] = []

    async def make(extra: str = "", pilots: str = PILOTS, legacy_opts: str = "") -> RelayEnv:
        legacy, new = Provider("legacy"), Provider("new")
        for p in (legacy, new):
            await p.start()
            providers.append(p)
        env = RelayEnv(tmp_path / f"env{len(envs)}", legacy, new, extra, pilots, legacy_opts)
        await env.relay.start()
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.relay.stop()
    for p in providers:
        await p.stop()
