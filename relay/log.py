"""The delivery log (JSON lines, SPEC "Delivery log") and the operational log.

The delivery log is what `relay report` reads; its vocabulary (event names and
each event's fields) is declared in relay/records.py, and mypy checks every
`DeliveryLog.emit` against it. Each event is appended with one write(2) on an
O_APPEND descriptor (a few microseconds into the page cache: cheaper than a
thread hop), so worker processes sharing the file never interleave lines;
SIGUSR1 reopens the file for logrotate.
Message bodies, subjects and passwords never reach either log. With
`log_privacy: hash` addresses and Message-IDs are written as pseudonyms
(relay.privacy). A `config` header event opens every file the log writes to
(at start and after each reopen), so a rotated file still says which provider
labels and which privacy its events were written with.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack, overload

import structlog

from relay import __version__, jsonenc
from relay.privacy import Pseudonymizer
from relay.records import (
    ArchivePurgedEvent,
    BounceSentEvent,
    DeletedEvent,
    DeliveryEvent,
    DiscardedEvent,
    Event,
    LogEventsDroppedEvent,
    ReceivedEvent,
    RejectedEvent,
    ReplayedEvent,
)

if TYPE_CHECKING:
    from relay.config import RelaySettings


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def utc_ts(t: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and Z, as every log event's `ts`. The text up
    to the second is formatted once a second (strftime per event was 2.7 % of a
    loaded relay's time)."""
    global _second
    if t is None:  # now: from time.time(), no datetime object (a third of the cost)
        now = time.time()
        second, ms = int(now), int(now % 1 * 1000)
        if _second[0] != second:
            _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
        return f"{_second[1]}{ms:03d}Z"
    t = t.astimezone(UTC)
    second = int(t.timestamp())
    if _second[0] != second:
        _second = (second, t.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_second[1]}{t.microsecond // 1000:03d}Z"


def _ts(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("ts", utc_ts())
    return event


class _ReopenableFile:
    """An O_APPEND descriptor written with one os.write per line; SIGUSR1 swaps it.

    One write per event on an O_APPEND file keeps lines whole even when several
    worker processes append to the same log. `write` raises OSError (full disk,
    I/O error) with the number of bytes that did reach the file.
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

    def write(self, data: bytes) -> int:
        """Append `data`; returns len(data), or raises PartialWrite with what got through."""
        with self._lock:
            written = 0
            try:
                while written < len(data):  # short only on a full disk or a signal
                    written += os.write(self.fd, data[written:])
            except OSError as exc:
                raise PartialWrite(written, exc) from exc
            return written

    def reopen(self) -> None:
        with self._lock:
            old, self.fd = self.fd, self._open()
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class PartialWrite(Exception):
    def __init__(self, written: int, error: OSError):
        super().__init__(str(error))
        self.written = written
        self.error = error


LOG_BUFFER = 10_000  # events kept in memory while the log cannot be written
RETRY_EVERY = 1.0  # seconds between attempts to write what is kept
COMPLAIN_EVERY = 60.0  # seconds between operational-log lines while failing


class DeliveryLog:
    """Writes delivery-log events; every event gets `event`, `ts` and `node`.

    A sink that never fails its caller: acceptance, scheduling, delivery and
    DSNs must not depend on a log write (SPEC Part 2 "Faults"). When a write
    fails (disk full, I/O error) the event is kept, in order, up to
    `buffer` events, and written once the file takes writes again (the next
    event, or `flush_pending` which the running relay calls every second);
    beyond the bound events are counted in `dropped` and one `log_events_dropped`
    event says how many once writing resumes. Observers (metrics) see every
    event whether or not it reached the file, and as it was: `privacy` hashes
    the addresses of what is written. `header` (the `config` event's fields) is
    written first into every file opened.
    """

    def __init__(
        self,
        path: Path,
        node: str,
        buffer: int = LOG_BUFFER,
        *,
        header: dict[str, Any] | None = None,
        privacy: Pseudonymizer | None = None,
    ):
        self.node = node
        self.header = header
        self.privacy = privacy
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # e.g. metrics
        self.file = _ReopenableFile(path)
        self.buffer = buffer
        self.pending: deque[bytes] = deque()
        self.dropped = 0  # since writing last resumed
        self.dropped_total = 0
        self._complained = -COMPLAIN_EVERY
        self._dropped_since: str | None = None
        # lines of this pass of the event loop, written together at its end: one
        # write for the pass instead of one per event (each write lets the spool's
        # thread take the GIL; docs/performance.md)
        self._batch: list[bytes] = []
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
        return cls(s.log, s.node_name, s.log_buffer, header=header, privacy=privacy)

    def _write_header(self, reason: str) -> None:
        if self.header is not None:
            self._send(_encode(self.node, "config", {"reason": reason, **self.header}))

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
    @overload
    def emit(self, event: Literal["replayed"], **fields: Unpack[ReplayedEvent]) -> None: ...
    @overload
    def emit(
        self, event: Literal["archive_purged"], **fields: Unpack[ArchivePurgedEvent]
    ) -> None: ...

    @overload
    def emit(
        self, event: Literal["log_events_dropped"], **fields: Unpack[LogEventsDroppedEvent]
    ) -> None: ...

    @overload
    def emit(self, event: Literal["placement"], **fields: Any) -> None: ...  # relay/probe/

    def emit(self, event: Event, **fields: Any) -> None:
        written = fields if self.privacy is None else self.privacy.event(fields)
        self._send(_encode(self.node, event, written))
        for observe in self.observers:
            observe(event, fields)

    def _send(self, line: bytes) -> None:
        if self._batch:
            self._batch.append(line)
            return
        if self.pending and not self.flush_pending():
            self._keep(line)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a command, a test): written now
            self._write(line)
            return
        self._batch.append(line)
        loop.call_soon(self.flush_batch)

    def flush_batch(self) -> None:
        """Write the lines of this pass of the loop (at its end; before a reopen or close)."""
        if not self._batch:
            return
        lines, self._batch = self._batch, []
        if self.pending and not self.flush_pending():
            for line in lines:  # kept (and counted) one event at a time
                self._keep(line)
        else:
            self._write(b"".join(lines))

    def _write(self, line: bytes) -> bool:
        try:
            self.file.write(line)
            return True
        except PartialWrite as exc:
            self._keep(line[exc.written :], first=True)
            self._failing(exc.error)
            return False

    def _keep(self, line: bytes, first: bool = False) -> None:
        if first or len(self.pending) < self.buffer:
            self.pending.append(line)
            return
        if not self.dropped:
            self._dropped_since = utc_ts()
        self.dropped += 1
        self.dropped_total += 1

    def _failing(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._complained >= COMPLAIN_EVERY:
            self._complained = now
            oplog.error(
                "delivery log not writable; events kept in memory",
                path=str(self.file.path), error=error.strerror or str(error),
                kept=len(self.pending), dropped=self.dropped_total,
            )  # fmt: skip

    def flush_pending(self) -> bool:
        """Write what was kept, in order; True when nothing is left."""
        while self.pending:
            line = self.pending[0]
            try:
                self.file.write(line)
            except PartialWrite as exc:
                self.pending[0] = line[exc.written :]
                self._failing(exc.error)
                return False
            self.pending.popleft()
        if self.dropped:
            count, self.dropped = self.dropped, 0
            self.emit("log_events_dropped", count=count, since=self._dropped_since, until=utc_ts())
            return not self.pending
        return True

    async def run(self) -> None:
        """While the relay runs: retry kept events every second."""
        while True:
            await asyncio.sleep(RETRY_EVERY)
            if self.pending:
                self.flush_pending()

    def reopen(self) -> None:
        self.flush_batch()  # what was emitted before the signal goes to the old file
        try:
            self.file.reopen()
        except OSError as exc:  # keep the old descriptor; the next SIGUSR1 tries again
            self._failing(exc)
            return
        self._write_header("reopen")

    def close(self) -> None:
        self.flush_batch()
        self.flush_pending()
        self.file.close()


def _encode(node: str, event: str, fields: dict[str, Any]) -> bytes:
    """One JSON line: node first, then the event's fields, then `event` and `ts`
    (the order structlog's renderer produced before, so old and new lines read alike;
    one JSON encoding instead of a processor chain per event)."""
    record = {"node": node, **fields, "event": event}
    record.setdefault("ts", utc_ts())
    return jsonenc.line(record) + b"\n"


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
