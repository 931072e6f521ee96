"""The delivery log (JSON lines, SPEC "Delivery log") and the operational log.

The delivery log is what `relay report` reads, so its vocabulary lives here.
Each event is appended with one write(2) on an O_APPEND descriptor (a few
microseconds into the page cache: cheaper than a thread hop), so worker
processes sharing the file never interleave lines; SIGUSR1 reopens the file
for logrotate.
Message bodies, subjects and passwords never reach either log. With
`log_privacy: hash` addresses and Message-IDs are written as pseudonyms
(relay.privacy). A `config` header event opens every file the log writes to
(at start and after each reopen), so a rotated file still says which provider
labels and which privacy its events were written with.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from relay import __version__
from relay.privacy import Pseudonymizer

if TYPE_CHECKING:
    from relay.config import RelaySettings


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
    """Writes delivery-log events; every event gets `event`, `ts` and `node`.

    `header` (the `config` event's fields) is written first into every file
    opened; `privacy` hashes the addresses of every other event before it is
    written (observers such as the metrics still see the event as it was).
    """

    def __init__(
        self,
        path: Path,
        node: str,
        header: dict[str, Any] | None = None,
        privacy: Pseudonymizer | None = None,
    ):
        self.node = node
        self.header = header
        self.privacy = privacy
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # e.g. metrics
        self.file = _ReopenableFile(path)
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self.file),  # type: ignore[arg-type]
            processors=[_ts, structlog.processors.JSONRenderer(separators=(",", ":"))],
        )
        self._write_header("start")

    @classmethod
    def for_settings(cls, s: RelaySettings) -> DeliveryLog:
        """The relay's log: its header says what `relay report`, reading logs only, needs."""
        header = {
            "version": __version__,
            "providers": {n: {"label": getattr(s.providers, n).label} for n in ("legacy", "new")},
            "log_privacy": s.log_privacy,
        }
        privacy = Pseudonymizer.from_env() if s.log_privacy == "hash" else None
        return cls(s.log, s.node_name, header, privacy)

    def _write_header(self, reason: str) -> None:
        if self.header is not None:
            self._log.msg("config", node=self.node, reason=reason, **self.header)

    def emit(self, event: str, **fields: Any) -> None:
        written = fields if self.privacy is None else self.privacy.event(fields)
        self._log.msg(event, node=self.node, **written)
        for observe in self.observers:
            observe(event, fields)

    def reopen(self) -> None:
        self.file.reopen()
        self._write_header("reopen")

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
