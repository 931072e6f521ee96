"""Fixtures for the ingress tests: an in-process relay and a raw-socket SMTP client.

The relay under test runs on the test's event loop (`Relay.start()` with port 0).
Providers point at a loopback port that refuses connections unless a test
passes its own, so accepted mail stays in the spool where the test can read it.
"""

from __future__ import annotations

import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import (
    HOSTNAME,
    NODE,
    PILOTS,
    RawClient,
    RelayEnv,
    SMTPReply,
    dead_port,
    flow,
    relay_settings,
)

__all__ = [
    "HOSTNAME", "NODE", "RawClient", "RelayEnv", "SMTPReply", "dead_port", "relay_factory",
]  # fmt: skip
# the ingress tests' relays: providers at refused ports unless given, so accepted mail
# stays in the spool where the test reads it
INGRESS_PROFILE = {
    "forward_domains": {"fwd.example.com": "example.com"},
    "shutdown_timeout": 1,
    "retry": {"schedule": [3600]},
}


def ingress_settings(
    legacy_port: int,
    new_port: int,
    *,
    limits: str = "",
    top: str = "",
    spool: str = "../var/spool",
    listen: str = "",
    domains: str = "[example.com, dev.example.com]",
) -> dict[str, Any]:
    """relay.yaml for ingress tests: `limits` YAML goes under `limits:`, `top` YAML at the
    top level, `listen` is the tail of the listen mapping (", tls_cert: ...")."""
    return relay_settings(
        legacy_port, new_port, INGRESS_PROFILE,
        {"spool": spool, "domains": yaml.safe_load(domains), "listen": flow(listen),
         "limits": yaml.safe_load(textwrap.dedent(limits)) or {}},
        top, provider={"connect_timeout": 1},
    )  # fmt: skip


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
        settings = ingress_settings(
            legacy_port, new_port, limits=limits, top=top, spool=spool, listen=listen,
            domains=domains,
        )  # fmt: skip
        env = RelayEnv.build(tmp_path / name / "config", settings, pilots)
        env.dead = dead
        started.append(env)
        if start:
            await env.relay.start()
        return env

    yield make
    for env in started:
        await env.stop()


def spool_messages(queue: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(queue.glob("*.msg"))}
