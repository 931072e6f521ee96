"""The delivery log file: appended per event, whole lines even after a crash."""

from __future__ import annotations

from pathlib import Path

from relay.log import DeliveryLog


def test_log_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"event":"received","queue_id":"A"}\n{"event":"deliv')  # killed mid-write
    log = DeliveryLog(path, "n1")
    log.emit("deleted", queue_id="B", rcpt="x@example.com", provider="legacy")
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"event":"deliv' and b'"queue_id":"B"' in lines[2] and lines[3] == b""


def test_utc_ts_formats_every_instant_as_strftime_does() -> None:
    """The once-a-second prefix cache never serves one second's text for another
    (same second of another minute, day or year; other time zones; going back)."""
    from datetime import UTC, datetime, timedelta, timezone

    from relay.log import utc_ts

    base = datetime(2026, 12, 31, 23, 59, 58, 999_500, tzinfo=UTC)
    instants = [base + timedelta(milliseconds=k * 250) for k in range(12)]
    instants += [base + timedelta(days=d) for d in (-365, 1, 31)] + [
        base,
        base - timedelta(seconds=1),
    ]
    instants.append(base.astimezone(timezone(timedelta(hours=-5))))
    for t in instants:
        u = t.astimezone(UTC)
        assert utc_ts(t) == u.strftime("%Y-%m-%dT%H:%M:%S.") + f"{u.microsecond // 1000:03d}Z", t
