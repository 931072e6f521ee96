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
