"""The scheduler's `archive` destination, and the running relay's daily retention purge.

Writing one message, in a thread (the event loop never waits on encryption or
fsync): the record streams from the spool file through age into
`<day>/<id>.tmp`, which is fdatasync'd, renamed `<id>.age` and its directory
fsync'd; then the index line is appended and fdatasync'd. Only then is the
reply 250 and the delivery recorded, so a message leaves the spool only with
its copy durable. A crash before the rename leaves a `.tmp` (removed at the
next start); after it, the delivery is still open and the message is written
again under the same name (the index keeps the last line of an id).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import BinaryIO

from relay.archive import crypto
from relay.archive.store import ENCRYPTED, PLAIN, ArchiveStore, Entry, record_header
from relay.config import ArchiveSettings, RelaySettings
from relay.delivery import Reply
from relay.log import DeliveryLog, oplog, utc_ts
from relay.records import Envelope
from relay.routing import resolve_recipient
from relay.spool.store import fsync_dir

DAY = 86_400.0
PURGE_EVERY = DAY  # seconds between retention purges of the running relay
Opener = Callable[[], tuple[BinaryIO, int]]  # the spool's content, as `Spool.open_content`


def user_address(rcpt: str, settings: RelaySettings) -> str:
    """The mailbox a recipient stands for: a forwarded copy's address mapped back
    to the real domain, so `--user alice@example.com` also finds what legacy forwarded."""
    resolved = resolve_recipient(rcpt, settings)
    return resolved[0] if resolved else rcpt


class ArchiveWriter:
    """Writes archive files for the scheduler (`Scheduler(archiver=...)`)."""

    def __init__(self, settings: RelaySettings, node: str):
        self.settings = settings
        self.archive: ArchiveSettings = settings.archive
        self.node = node
        self.store = ArchiveStore(self.archive.dir, settings.recipient_delimiter)
        self.keys = self.archive.encrypt_to
        self.recipients = crypto.recipients(self.keys)

    def start(self) -> None:
        self.store.create()
        self.store.key()

    async def __call__(self, envelope: Envelope, opener: Opener) -> Reply:
        """Archive one message; a 250 only once file and index line are durable."""
        try:
            entry = await asyncio.to_thread(self.write, envelope, opener)
        except Exception as exc:  # a full disk, a vanished spool file: retried, never bounced
            oplog.error("archive write failed", queue_id=envelope.queue_id, error=repr(exc))
            return Reply(None, f"archive write failed: {type(exc).__name__}: {exc}", "data")
        return Reply.from_smtp(250, f"2.0.0 archived as {entry.file}", "data")

    def write(self, envelope: Envelope, opener: Opener) -> Entry:
        day = datetime.fromtimestamp(envelope.received_epoch, UTC).strftime("%Y-%m-%d")
        folder = self.store.day_dir(day)
        name = envelope.queue_id + (ENCRYPTED if self.recipients else PLAIN)
        tmp = folder / f"{envelope.queue_id}.tmp"
        fh, length = opener()
        with fh:
            src = crypto.Joined(record_header(self.node, envelope), fh, length)
            with open(tmp, "wb") as out:
                if self.recipients:
                    crypto.encrypt(io.BufferedReader(src), out, self.recipients)
                else:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                out.flush()
                os.fdatasync(out.fileno())
        os.rename(tmp, folder / name)
        fsync_dir(folder)
        groups = sorted({p.group for p in envelope.plan if p.group is not None})
        users = dict.fromkeys(
            self.store.user_hash(user_address(r, self.settings)) for r in envelope.rcpts
        )
        entry = Entry(
            envelope.queue_id, self.node, envelope.received, envelope.received_epoch,
            tuple(groups), tuple(users), length, src.sha256.hexdigest(), f"{day}/{name}",
            self.keys,
        )  # fmt: skip
        self.store.append(entry)
        return entry


def purge_expired(store: ArchiveStore, retention_days: int, now: float) -> tuple[int, int, str]:
    """Remove what is older than the retention; (messages, bytes, the cut-off instant)."""
    before = now - retention_days * DAY
    removed = store.remove(lambda e: e.epoch < before)
    return len(removed), sum(e.size for e in removed), utc_ts(datetime.fromtimestamp(before, UTC))


def log_purge(log: DeliveryLog, count: int, size: int, before: str | None) -> None:
    log.emit("archive_purged", count=count, bytes=size,
             reason="retention" if before else "request", before=before)  # fmt: skip


async def retention(store: ArchiveStore, retention_days: int, log: DeliveryLog) -> None:
    """While the relay runs: purge at start and then once a day (`archive_purged`)."""
    while True:
        try:
            count, size, before = await asyncio.to_thread(
                purge_expired, store, retention_days, time.time()
            )
        except OSError as exc:
            oplog.error("archive purge failed", error=str(exc))
        else:
            if count:
                log_purge(log, count, size, before)
        await asyncio.sleep(PURGE_EVERY)
