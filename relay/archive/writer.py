"""The scheduler's `archive` destination, and the running relay's daily retention purge.

Writing, in the writer's own threads (the event loop never waits on encryption
or fsync), by group commit as in the spool: every message that came while the
previous batch was written is one batch. Each record streams from the spool
file through age into `<day>/<id>.<pid>.tmp`; the batch's files are fdatasync'd
together, renamed `<id>.age`, their directories fsync'd and their index lines
appended with one write and one fdatasync. Only then is the reply 250 and the
delivery recorded, so a message leaves the spool only with its copy durable.
A crash before the rename leaves a `.tmp` (removed at the next start); after
it, the delivery is still open and the message is written again under the same
name (the index keeps the last line of an id). Cost: docs/archive.md.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
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
# the writer's own threads: one writes and encrypts a batch, these sync its files
SYNC_THREADS = 8


def user_address(rcpt: str, settings: RelaySettings) -> str:
    """The mailbox a recipient stands for: a forwarded copy's address mapped back
    to the real domain, so `--user alice@example.com` also finds what legacy forwarded."""
    resolved = resolve_recipient(rcpt, settings)
    return resolved[0] if resolved else rcpt


@dataclass
class _Job:
    envelope: Envelope
    opener: Opener
    done: asyncio.Future[Entry] | None = None  # None: written by `write`, in its caller
    entry: Entry | None = None
    tmp: Path | None = None
    out: BinaryIO | None = None  # the open `.tmp`, closed once synced
    error: Exception | None = None


class ArchiveWriter:
    """Writes archive files for the scheduler (`Scheduler(archiver=...)`)."""

    def __init__(self, settings: RelaySettings, node: str):
        self.settings = settings
        self.archive: ArchiveSettings = settings.archive
        self.node = node
        self.store = ArchiveStore(self.archive.dir, settings.recipient_delimiter)
        self.keys = self.archive.encrypt_to
        self.recipients = crypto.recipients(self.keys)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="archive")
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="archive-sync")
        self._jobs: list[_Job] = []
        self._committer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.create()
        self.store.key()

    async def __call__(self, envelope: Envelope, opener: Opener) -> Reply:
        """Archive one message; a 250 only once its file and index line are durable."""
        done: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(envelope, opener, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit(), name="archive-commit")
        try:
            entry = await done
        except Exception as exc:  # a full disk, a vanished spool file: retried, never bounced
            oplog.error("archive write failed", queue_id=envelope.queue_id, error=repr(exc))
            reason = f"archive write failed: {type(exc).__name__}: {exc}"
            return Reply(None, reason, "data", by="relay")
        return Reply.from_smtp(250, f"2.0.0 archived as {entry.file}", "data")

    async def _commit(self) -> None:
        """Group commit: every message that came while the last batch was written, in
        one thread call (one hop, however many messages)."""
        loop = asyncio.get_running_loop()
        while self._jobs:
            jobs, self._jobs = self._jobs, []
            try:
                await loop.run_in_executor(self._thread, self.write_batch, jobs)
            except Exception as exc:  # the index or a directory sync: the whole batch
                for job in jobs:
                    job.error = job.error or exc
            for job in jobs:
                assert job.done is not None
                if job.done.done():  # its attempt was cancelled (shutdown): nobody waits
                    continue
                if job.error is not None:
                    job.done.set_exception(job.error)
                else:
                    assert job.entry is not None
                    job.done.set_result(job.entry)

    def write(self, envelope: Envelope, opener: Opener) -> Entry:
        """One message on its own, in the caller's thread (commands and tests)."""
        job = _Job(envelope, opener)
        self.write_batch([job])
        if job.error is not None:
            raise job.error
        assert job.entry is not None
        return job.entry

    def write_batch(self, jobs: list[_Job]) -> None:
        """Each job's `.tmp` written, all fdatasync'd together (concurrent syncs share
        journal commits), renamed, their directories fsync'd, their index lines
        appended in one write. A job's own failure is its `error`; others go on."""
        for job in jobs:
            try:
                self._write_tmp(job)
            except Exception as exc:
                job.error = exc
                if job.tmp is not None:
                    job.tmp.unlink(missing_ok=True)
        written = [j for j in jobs if j.error is None]

        def sync(job: _Job) -> None:
            assert job.out is not None
            try:
                with job.out:
                    job.out.flush()
                    os.fdatasync(job.out.fileno())
            except OSError as exc:
                job.error = exc

        list(self._sync_pool.map(sync, written))
        done = []
        for job in written:
            assert job.tmp is not None and job.entry is not None
            if job.error is None:
                os.rename(job.tmp, self.store.path(job.entry))
                done.append(job.entry)
            else:
                job.tmp.unlink(missing_ok=True)
        for folder in {self.store.path(e).parent for e in done}:
            fsync_dir(folder)
        if done:
            self.store.append(*done)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
        self._sync_pool.shutdown(wait=False)

    def _write_tmp(self, job: _Job) -> None:
        """Encrypt into `<day>/<id>.<pid>.tmp` (not synced yet); set the job's index entry."""
        env = job.envelope
        day = datetime.fromtimestamp(env.received_epoch, UTC).strftime("%Y-%m-%d")
        folder = self.store.day_dir(day)
        name = env.queue_id + (ENCRYPTED if self.recipients else PLAIN)
        job.tmp = self.store.tmp_path(folder, env.queue_id)
        fh, length = job.opener()
        with fh:
            src = crypto.Joined(record_header(self.node, env), fh, length)
            job.out = out = open(job.tmp, "wb")  # noqa: SIM115 - closed by write_batch's sync
            try:
                if self.recipients:
                    crypto.encrypt(io.BufferedReader(src), out, self.recipients)
                else:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            except BaseException:
                out.close()
                raise
        groups = sorted({p.group for p in env.plan if p.group is not None})
        users = dict.fromkeys(
            self.store.user_hash(user_address(r, self.settings)) for r in env.rcpts
        )
        job.entry = Entry(
            env.queue_id, self.node, env.received, env.received_epoch, tuple(groups),
            tuple(users), length, src.sha256.hexdigest(), f"{day}/{name}", self.keys,
        )  # fmt: skip


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
