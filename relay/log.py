"""The delivery log (JSON lines, SPEC "Delivery log") and the operational log.

The delivery log is what `relay report` reads; its vocabulary (event names and
each event's fields) is declared in relay/records.py, and mypy checks every
`DeliveryLog.emit` against it. Each event is appended with one write(2) on an
O_APPEND descriptor (a few microseconds into the page cache: cheaper than a
thread hop), so worker processes sharing the file never interleave lines;
SIGUSR1 reopens the file for logrotate.
Message bodies, subjects and passwords never reach either log.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Unpack, overload

import structlog

from relay.records import (
    BounceSentEvent,
    DeletedEvent,
    DeliveryEvent,
    DiscardedEvent,
    Event,
    ReceivedEvent,
    RejectedEvent,
)


def utc_ts(t: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and Z, as every log event's `ts`."""
    t = t or datetime.now(UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _ts(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("ts", utc_ts())
    return event


class _ReopenableFile:
    """An O_APPEND descriptor written with one os.write per line; SIGUSR1 swaps it.

    One write per event on an O_APPEND file keeps lines whole even when several
    worker processes append to the same log.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self.fd = self._open()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o644)
        size = os.fstat(fd).st_size
        if size > 0:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                last = fh.read(1)
            if last not in (b"\n", b""):  # a line torn by a crash: end it so ours stays whole
                os.write(fd, b"\n")
        return fd

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        with self._lock:
            written = os.write(self.fd, data)
            while written < len(data):  # only on a full disk or a signal mid-write
                written += os.write(self.fd, data[written:])

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        with self._lock:
            old, self.fd = self.fd, self._open()
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


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

    @overload
    def emit(self, event: Literal["received"], **fields: Unpack[ReceivedEvent]) -> None: ...
    @overload
    def emit(self, event: Literal["discarded"], **fields: Unpack[DiscardedEvent]) -> None: ...
    @overload
    def emit(self, event: Literal["rejected"], **fields: Unpack[RejectedEvent]) -> None: ...
    @overload
    def emit(self, event: Literal["delivery"], **fields: Unpack[DeliveryEvent]) -> None: ...
    @overload
    def emit(self, event: Literal["deleted"], **fields: Unpack[DeletedEvent]) -> None: ...
    @overload
    def emit(self, event: Literal["bounce_sent"], **fields: Unpack[BounceSentEvent]) -> None: ...

    def emit(self, event: Event, **fields: Any) -> None:
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
