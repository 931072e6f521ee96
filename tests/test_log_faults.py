"""The delivery log's disk fills up: mail keeps flowing (SPEC Part 2 "Faults").

Before this sink, a full log disk raised out of `DeliveryLog.emit`: clients
still got 250 but the message was never scheduled, a primary's 550 left the
queue without its DSN, and `550 5.7.1 Relaying denied` became a `451`.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.log import DeliveryLog
from relay.testing import Provider, Rule
from tests.harness import RelayEnv, relay_settings, tmpfs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def log_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "logfs", "64k") as mnt:
        yield mnt


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (4096, 1):  # whole blocks, then the last partial one
            try:
                while fh.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return filler


def pad(path: Path, room: int) -> None:
    """Blank lines up to `room` bytes before the end of the file's last 4 KiB page
    (tmpfs takes writes into an allocated page even when the disk is full)."""
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\n" * ((-size - room) % 4096))


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_events_kept_in_order_and_overflow_counted(log_fs: Path) -> None:
    path = log_fs / "d.jsonl"
    log = DeliveryLog(path, "n1", buffer=3)
    log.emit("deleted", queue_id="Q0", rcpt="a@example.com", provider="legacy")
    pad(path, 0)
    filler = fill(log_fs)
    for i in range(1, 6):  # nothing raises though nothing can be written
        log.emit("deleted", queue_id=f"Q{i}", rcpt="a@example.com", provider="legacy")
    assert log.dropped_total == 2 and len(log.pending) == 3
    filler.unlink()
    assert log.flush_pending()
    events = read_events(path)
    assert [e.get("queue_id") for e in events] == ["Q0", "Q1", "Q2", "Q3", None]
    summary = events[-1]
    assert summary["event"] == "log_events_dropped" and summary["count"] == 2
    assert summary["node"] == "n1" and summary["since"] <= summary["until"]
    log.close()


def test_a_line_cut_by_the_full_disk_is_completed(log_fs: Path) -> None:
    path = log_fs / "d.jsonl"
    log = DeliveryLog(path, "n1")
    log.emit("deleted", queue_id="Q0", rcpt="a@example.com", provider="legacy")
    pad(path, 50)  # room for part of the next line only
    filler = fill(log_fs)
    log.emit("deleted", queue_id="Q1", rcpt="a" * 300 + "@example.com", provider="legacy")
    assert path.stat().st_size % 4096 == 0 and not log.pending[0].startswith(b"{")  # cut
    filler.unlink()
    log.emit("deleted", queue_id="Q2", rcpt="b@example.com", provider="legacy")
    assert [e["queue_id"] for e in read_events(path)] == ["Q0", "Q1", "Q2"]
    log.close()


async def test_mail_flows_while_the_log_disk_is_full(tmp_path: Path, log_fs: Path) -> None:
    legacy, new = Provider("legacy"), Provider("new")
    legacy.add(Rule("reject", rcpt="gone@example.com", code=550, text="5.1.1 User unknown"))
    await legacy.start()
    await new.start()
    settings = relay_settings(legacy.port, new.port, {"log": f"{log_fs}/deliveries.jsonl"})
    relay = RelayEnv.build(tmp_path / "config", settings).relay
    await relay.start()
    try:
        filler = fill(log_fs)

        def session() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail("sender@example.org")
                denied = s.rcpt("x@elsewhere.org")
                s.rcpt("alice@example.com")
                s.rcpt("gone@example.com")
                accepted = s.data(b"Subject: t\r\n\r\nhello\r\n")
                health = urllib.request.urlopen(
                    f"http://127.0.0.1:{relay.metrics_port}/readyz", timeout=5
                )
                metrics = urllib.request.urlopen(
                    f"http://127.0.0.1:{relay.metrics_port}/metrics", timeout=5
                ).read()
                return denied, accepted, (health.status, metrics)

        denied, accepted, health = await asyncio.to_thread(session)
        assert denied[0] == 550 and denied[1].startswith(b"5.7.1 Relaying denied")
        assert accepted[0] == 250
        assert health[0] == 200
        assert b"\nrelay_log_events_dropped_total 0.0\n" in health[1]
        # scheduled and delivered without a restart, and the primary's 550 bounced
        await new.wait_for_messages(1)
        await legacy.wait_until(
            lambda: any(m.mail_from == "" for m in legacy.messages), what="the DSN"
        )
        assert legacy.received_for("alice@example.com")
        assert [m.rcpts for m in legacy.messages if m.mail_from == ""] == [["sender@example.org"]]
        await asyncio.sleep(0)
        assert relay.log.pending  # nothing of it reached the file yet

        filler.unlink()
        relay.log.flush_pending()
        events = read_events(relay.cfg.relay.log)
        kinds = [e["event"] for e in events]
        assert kinds[0] == "rejected" and kinds[1] == "received"
        assert kinds.count("bounce_sent") == 1
        outcomes = sorted(
            (e["provider"], e["rcpt"], e["outcome"]) for e in events if e["event"] == "delivery"
        )
        assert ("legacy", "gone@example.com", "bounced") in outcomes
        assert ("new", "alice@example.com", "delivered") in outcomes
        assert ("legacy", "alice@example.com", "delivered") in outcomes
    finally:
        await relay.stop()
        await legacy.stop()
        await new.stop()
