"""A wall-clock step (NTP, VM resume) delays no due delivery by more than a second
once the clock is right again (SPEC Part 2 "Faults")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.scheduler import Clock
from relay.testing import Provider, Rule
from tests.harness import RelayEnv, relay_settings

pytestmark = pytest.mark.timeout(30)


class SteppedClock(Clock):
    """The machine's clock, which an operator (or NTP) can step; nobody is told."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


async def test_deferred_mail_waits_no_longer_after_a_step_back(tmp_path: Path) -> None:
    legacy, new = Provider("legacy"), Provider("new")
    legacy.add(Rule("defer", rcpt="zed@example.com", times=1))
    await legacy.start()
    await new.start()
    clock = SteppedClock()
    settings = relay_settings(legacy.port, new.port, {"retry": {"schedule": [2]}})
    relay = RelayEnv.build(tmp_path / "config", settings, clock=clock).relay
    await relay.start()
    try:
        import aiosmtplib

        await aiosmtplib.send(
            b"Subject: t\r\n\r\nhi\r\n", sender="s@origin.test", recipients=["zed@example.com"],
            hostname="127.0.0.1", port=relay.port, start_tls=False,
        )  # fmt: skip
        log = relay.cfg.relay.log
        async with asyncio.timeout(10):  # the deferral and its due time are recorded
            while b'"outcome":"deferred"' not in (log.read_bytes() if log.exists() else b""):
                await asyncio.sleep(0.01)
        (msg,) = relay.scheduler.messages.values()
        due_in = max(d.due for d in msg.deliveries) - time.time()  # 2 s ± 10 %
        clock.offset = -3600.0  # the clock jumps back an hour while the retry waits,
        passed = time.monotonic() + due_in + 0.5
        async with asyncio.timeout(10):  # and stays wrong past the retry's due time
            while time.monotonic() < passed:
                await asyncio.sleep(0.05)
        assert not legacy.messages
        clock.offset = 0.0  # and is put right again
        righted = time.monotonic()
        await legacy.wait_for_messages(1, timeout=10)
        late = time.monotonic() - righted
        assert late < 1.0 + 0.3, late  # MAX_WAIT, plus the attempt itself
    finally:
        await relay.stop()
        await legacy.stop()
        await new.stop()
