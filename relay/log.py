"""The delivery log (JSON lines, SPEC "Delivery log") and the operational log.

The delivery log is what `relay report` reads, so its vocabulary lives here.
Each event is appended and flushed at once (a few microseconds into the page
cache: cheaper than a thread hop); SIGUSR1 reopens the file for logrotate.
Message bodies, subjects and passwords never reach either log.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog


def utc_ts(t: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and Z, as every log event's `ts`."""
    t = t or datetime.now(UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _ts(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("ts", utc_ts())
    return event


class _ReopenableFile:
    """A line-buffered append handle that SIGUSR1 can swap for a fresh one."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self.fh: IO[str] = self._open()

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")  # noqa: SIM115
        if fh.tell() > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":  # a line torn by a crash: end it so ours stays whole
                fh.write(b"\n")
        fh.close()
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, line: str) -> None:
        with self._lock:
            self.fh.write(line)
            self.fh.flush()

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        with self._lock:
            old, self.fh = self.fh, self._open()
            old.close()

    def close(self) -> None:
        with self._lock:
            self.fh.close()


class DeliveryLog:
    """Writes delivery-log events; every event gets `event`, `ts` and `node`."""

    def __init__(self, path: Path, node: str):
        self.node = node
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # e.g. metrics
        self.file = _ReopenableFile(path)
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self.file),  # type: ignore[arg-type]
            processors=[_ts, structlog.processors.JSONRenderer(separators=(",", ":"))],
        )

    def emit(self, event: str, **fields: Any) -> None:
        self._log.msg(event, node=self.node, **fields)
        for observe in self.observers:
            observe(event, fields)

    def reopen(self) -> None:
        self.file.reopen()

    def close(self) -> None:
        self.file.close()


def setup_operational_log() -> None:
    """Operational messages (start, reload errors, crashes) as JSON on stderr."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _ts,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


oplog = structlog.get_logger("relay")
