"""SIGUSR1 reopens the delivery log (logrotate) on a real `relay serve`."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiosmtplib
import pytest

from relay.testing import Provider
from tests.harness import free_port
from tests.relayproc import RelayProcess, write_relay_config

pytestmark = pytest.mark.timeout(60)


async def send(port: int, rcpt: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await smtp.connect()
    await smtp.sendmail("s@sender.test", [rcpt], b"Subject: x\r\n\r\nhi\r\n")
    await smtp.quit()


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def test_sigusr1_reopens_the_log_after_rotation(tmp_path: Path) -> None:
    legacy, new = Provider("legacy"), Provider("new")
    await legacy.start()
    await new.start()
    port = free_port()
    cfg = write_relay_config(tmp_path, port, legacy, new)
    relay = RelayProcess(cfg, port, tmp_path / "relay.err")
    log = tmp_path / "var" / "deliveries.jsonl"
    relay.start()
    try:
        await relay.wait_ready()
        await send(port, "zed@example.com")
        await legacy.wait_until(
            lambda: any(e["event"] == "delivery" for e in events(log)), what="first delivery"
        )
        rotated = log.with_name("deliveries.jsonl.1")
        log.rename(rotated)  # what logrotate does, then it signals the relay
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGUSR1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not log.exists() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await send(port, "yann@example.com")
        await legacy.wait_until(
            lambda: bool(events(log)) and any(e["event"] == "delivery" for e in events(log)),
            what="events in the new log",
        )
        old = {e["event"] for e in events(rotated)}
        assert {"received", "delivery"} <= old
        assert all(e.get("rcpt", "yann@example.com") == "yann@example.com"
                   for e in events(log) if e["event"] != "received")  # fmt: skip
        code, _ = await relay.terminate(10)
        assert code == 0
    finally:
        relay.stop_quietly()
        await legacy.stop()
        await new.stop()
