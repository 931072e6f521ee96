"""Shared fixtures on top of tests/harness.py: certificates, config folders, and
`relay_env`, an in-process relay between two loopback providers."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from relay.testing import Provider
from tests.harness import (
    PILOTS,
    RelayEnv,
    flow,
    read_content,
    relay_settings,
    write_config,
)
from tests.helpers_auth import zone as auth_zone
from tests.helpers_dns import LoopbackDNS

__all__ = ["PILOTS", "RelayEnv", "read_content", "write_config"]

# relay_env's relays: node and timeouts as the delivery tests expect them
ENV_PROFILE = {"listen": {"hostname": "relay.example.com"}, "shutdown_timeout": 5}


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


@pytest.fixture
async def relay_env(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RelayEnv]]]:
    """Factory: `env = await relay_env(extra_yaml, pilots=..., legacy_opts=", k: v")`
    starts two providers and a relay between them."""
    envs: list[RelayEnv] = []
    providers: list[Provider] = []

    async def make(extra: str = "", pilots: str = PILOTS, legacy_opts: str = "") -> RelayEnv:
        legacy, new = Provider("legacy"), Provider("new")
        for p in (legacy, new):
            await p.start()
            providers.append(p)
        settings = relay_settings(
            legacy.port, new.port, ENV_PROFILE, {"providers": {"legacy": flow(legacy_opts)}}, extra
        )
        env = RelayEnv.build(tmp_path / f"env{len(envs)}" / "config", settings, pilots, legacy, new)
        await env.relay.start()
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.stop()
    for p in providers:
        await p.stop()


@pytest.fixture
def auth_dns() -> Iterator[LoopbackDNS]:
    """The zone of tests/helpers_auth.py on a loopback DNS server; slow.example is never
    answered."""
    with LoopbackDNS(auth_zone(), silent=("slow.example",)) as server:
        yield server
