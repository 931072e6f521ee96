"""The queue of one spool directory: messages in, state changes, recovery, removal.

Layout (see docs/spool.md for why):

    queue/<id>.tmp     a message being received (discarded at start-up)
    queue/<id>.msg     content, then the envelope record (relay.records), then a footer
    queue/<id>.state   append-only JSON lines: one per delivery state change
    spare/<n>          finished message files kept to be written over by new ones
                       (emptied at start-up; never a message)
    corrupt/           torn or unreadable records moved aside, never delivered
    control/           requests from `relay queue` to the running relay (control.py)
    verify.cache       recipient verification answers (relay/verify/cache.py owns the
                       format; the spool names the file, so each spool has its own)

Durability is by group commit: every message that finished DATA while the
previous batch was being synced is written, fdatasync'd and renamed by the
spool's writing thread in one batch that ends with a single fsync of the
queue directory. The 250 is sent only after that batch is done. State lines
and removals are written by the same thread, not synced (as Postfix marks
recipients done): a power loss may repeat a delivery, never lose one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import itertools
import os
import queue
import random
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from relay.records import (
    Envelope,
    Outline,
    StateLine,
    parse_envelope,
    parse_outline,
    parse_state_line,
)

FOOTER = struct.Struct(">4sQIII")  # magic, content length, envelope length, crcs
MAGIC = b"RLY1"
WRITE_THRESHOLD = 1 << 20  # bytes buffered in memory before a threaded write
# A batch with this many state appends or removals (a backlog draining) answers its
# messages first, then commits them CHANGES_PER_PART at a time (new messages between)
APPENDS_APART = 16
CHANGES_PER_PART = 256
# Contents of recently committed small messages kept in memory for their first
# deliveries, so that neither provider's copy opens the file (two opens, footer
# reads and preads per message); bounded, oldest dropped first.
RECENT_MAX_MESSAGE = 256 * 1024
RECENT_BYTES = 16 << 20
# A finished message's file (up to SPARE_MAX_SIZE) is renamed into spare/ and a new
# message is written over it: the inode and its blocks are reused, where making an
# inode and freeing one per message cost 60 µs of machine CPU a message here (ext4
# without a journal walks its recently deleted inodes on each create;
# docs/spool.md). At most SPARES files per spool wait there.
SPARES = 64
SPARE_MAX_SIZE = 256 * 1024


class SpoolError(Exception):
    """The spool cannot take the message; the client gets a 4xx, never a 250."""


# Queue ids need uniqueness, not secrecy: a generator seeded from os.urandom (per
# process, again after a fork) rather than os.urandom per id, whose getrandom
# call hands the GIL to the spool's thread on every message.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_queue_id() -> str:
    """Sortable by time, unique across nodes (48 random bits)."""
    return f"{int(time.time() * 1000):011X}{_ids.getrandbits(48):012X}"


@dataclass
class Incoming:
    """A message being received: content streams to `<id>.tmp` as it arrives.

    The file is a bare descriptor (os.open/os.write), not a Python file object:
    `open()` costs an fstat, an isatty ioctl and an lseek more per message, and
    each syscall of the writing thread is a GIL hand-over with the loop."""

    queue_id: str
    path: str  # `<id>.tmp`, or the spare it is written over (a string: no Path per message)
    # received content not yet in the file, as it came (joined once, at the end:
    # each copy of a 100 KiB message costs as much as a pass over it)
    chunks: list[bytes] = field(default_factory=list)
    buffered: int = 0
    size: int = 0
    crc: int = 0
    fd: int | None = None
    # a write in its thread and a discard exclude each other: a session cancelled
    # while its write is in the thread (the client gone) discards only once the
    # write is over, and no write (re)creates the file of a discarded message
    lock: threading.Lock = field(default_factory=threading.Lock)
    discarded: bool = False

    def discard(self) -> None:
        """Remove the partial file (a full disk never keeps its last free bytes in
        a `.tmp` until a restart)."""
        with self.lock:
            self.discarded = True
            self.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def take(self) -> list[bytes]:
        """The buffered chunks, handed over (the buffer is empty after)."""
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        return chunks

    def reuse(self, spare: str) -> None:
        """Write this message over `spare` (an existing file) instead of a new `.tmp`."""
        with self.lock:
            if self.discarded:
                raise OSError(f"{self.queue_id} was discarded")
            self.fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC)
            self.path = spare

    def _flush(self, parts: list[bytes]) -> None:
        with self.lock:
            if self.discarded:
                raise OSError(f"{self.queue_id} was discarded")
            if self.fd is None:
                self.fd = os.open(
                    self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
                )
            write_all(self.fd, parts)


@dataclass
class Stored:
    """A committed message as recovered from disk."""

    queue_id: str
    envelope: Envelope
    content_length: int
    states: list[StateLine]


@dataclass
class Queued:
    """A committed message as a restart queues it in short form (its envelope's
    outline and its states; the envelope itself stays in the file)."""

    queue_id: str
    outline: Outline
    states: list[StateLine]


@dataclass
class _Job:
    kind: str  # "msg" | "state" | "remove"
    future: asyncio.Future[None]
    incoming: Incoming | None = None
    content: bytes | None = None  # a message's whole content, when it was all in memory
    envelope: bytes = b""
    queue_id: str = ""
    lines: bytes = b""


class _Committer(threading.Thread):
    """The spool's one writing thread: it takes every job queued while it was busy
    as one batch and answers the loop once per batch (one wake-up each way, not a
    thread hop per message: under load the hops' futex traffic cost more CPU
    than the writes; docs/performance.md). The loop hands jobs over once per
    pass of its own (`put` gathers them): each hand-over wakes the thread."""

    def __init__(self, spool: Spool, loop: asyncio.AbstractEventLoop):
        super().__init__(name="spool-commit", daemon=True)
        self.spool = spool
        self.loop = loop
        self.jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self.gathered: list[_Job] = []  # on the loop, until `hand_over`

    def put(self, job: _Job) -> None:
        """On the loop: the job goes to the thread at the end of this pass of the loop."""
        if not self.gathered:
            self.loop.call_soon(self.hand_over)
        self.gathered.append(job)

    def hand_over(self) -> None:
        if self.gathered:
            if self.spool.before_batch is not None:
                self.spool.before_batch()
            self.jobs.put(self.gathered)
            self.gathered = []

    def finish(self) -> None:
        """Commit what was queued, then end (called in a thread, after `hand_over`)."""
        self.jobs.put(None)
        self.join()

    def run(self) -> None:
        messages: list[_Job] = []
        changes: collections.deque[_Job] = collections.deque()  # appends and removals
        last = False
        while True:
            if not messages and not changes:
                if last:
                    return
                last |= self._take(messages, changes, self.jobs.get())
            while True:  # everything queued meanwhile
                try:
                    item = self.jobs.get_nowait()
                except queue.Empty:
                    break
                last |= self._take(messages, changes, item)
            # a few changes go with the messages (one batch, one answer); with a
            # backlog's many (a drain's removals, a retry's appends), messages first,
            # answered as soon as they are durable, and the changes CHANGES_PER_PART
            # at a time, so a new message waits behind one part at most, never
            # behind thousands of unlinks
            if len(changes) < APPENDS_APART:
                part, messages = [*messages, *changes], []
                changes.clear()
            elif messages:
                part, messages = messages, []
            else:
                part = [changes.popleft() for _ in range(min(CHANGES_PER_PART, len(changes)))]
            if not self._commit(part):
                return

    @staticmethod
    def _take(
        messages: list[_Job], changes: collections.deque[_Job], item: list[_Job] | None
    ) -> bool:
        """Sort a hand-over into messages and changes, in order; True for the end."""
        if item is None:
            return True
        for job in item:
            (messages if job.kind == "msg" else changes).append(job)
        return False

    def _commit(self, jobs: list[_Job]) -> bool:
        try:
            errors = self.spool._commit_batch(jobs)
        except Exception as exc:  # a bug: fail the batch rather than hang its waiters
            errors = [exc] * len(jobs)
        try:
            self.loop.call_soon_threadsafe(self.spool._settle, jobs, errors)
        except RuntimeError:  # the loop is closed: nobody waits any more
            return False
        return True


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.queue = root / "queue"
        self.corrupt = root / "corrupt"
        self.control = root / "control"
        self.spare = root / "spare"
        self.verify_cache = root / "verify.cache"
        self._committer: _Committer | None = None
        self._free: tuple[float, int] = (0.0, 0)
        self._stopping = False
        # other directories whose disk must keep `min_free_space` too (the archive)
        self.also_on_disk: tuple[Path, ...] = ()
        # called on the loop before jobs go to the writing thread: the relay writes
        # the delivery log's lines of this pass first, so an event emitted before a
        # state change was submitted is on file before the change (a message whose
        # files are gone has its delivery events written)
        self.before_batch: Callable[[], None] | None = None
        # test seam: called after each fdatasync/fsync returns, with the queue id
        # for a message's file and the path for the directory
        self.on_sync: Callable[[str | Path], None] | None = None
        self._dir = str(self.queue)  # hot-path file names are built as strings, not Paths
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent: collections.OrderedDict[str, tuple[bytes, bool]] = collections.OrderedDict()
        self._recent_bytes = 0
        # messages committed by this process that have no state file (yet), with
        # their file's size: their removal skips the unlink of a file that is not
        # there, and may keep the file as a spare (writing thread only)
        self._stateless: dict[str, int] = {}
        # those of them given a state file since: the message file may still be a
        # spare (at 100 KiB most pilot messages get one: their copies end apart)
        self._stated: dict[str, int] = {}
        # spares to write over (path, size), and those renamed since the last sync
        # of queue/: written over only once their removal is durable, so a power
        # loss never brings back a finished message's name on a new one's content
        self._spares: list[tuple[str, int]] = []
        self._freed: list[tuple[str, int]] = []
        self._spare_names = itertools.count()
        self._queue_fd: int | None = None

    # -- setup ---------------------------------------------------------------

    def create(self) -> None:
        for d in (self.queue, self.corrupt, self.control, self.spare):
            d.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        self._queue_fd = await asyncio.to_thread(self._open_queue)
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._committer = _Committer(self, self._loop)
        self._committer.start()

    def _open_queue(self) -> int:
        """Create the directories; `queue/` stays open for the writing thread's syncs
        of it, one a batch (an open and a close less each time)."""
        self.create()
        return os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def stop(self) -> None:
        """Commit what was submitted (its waiters get their answer), then stop."""
        self._stopping = True
        committer, self._committer = self._committer, None
        if committer is not None:
            committer.hand_over()
            await asyncio.to_thread(committer.finish)
        fd, self._queue_fd = self._queue_fd, None
        if fd is not None:
            os.close(fd)

    def free_space(self) -> int:
        """Bytes free on the fullest of the disks the relay writes messages to."""
        stats = [os.statvfs(p) for p in (self.queue, *self.also_on_disk)]
        return min(st.f_bavail * st.f_frsize for st in stats)

    async def has_room(self, min_free: int) -> bool:
        """Free-space check cached for 1 s so a busy relay does not statvfs per command."""
        now = time.monotonic()
        if now - self._free[0] > 1.0:
            try:
                free = await asyncio.to_thread(self.free_space)
            except OSError:
                free = 0
            self._free = (now, free)
        return self._free[1] >= min_free

    # -- receiving -------------------------------------------------------------

    def begin(self, queue_id: str) -> Incoming:
        return Incoming(queue_id, self._file(queue_id, ".tmp"))

    async def write(self, msg: Incoming, data: bytes) -> None:
        msg.chunks.append(data)
        msg.buffered += len(data)
        msg.size += len(data)
        msg.crc = zlib.crc32(data, msg.crc)
        if msg.buffered >= WRITE_THRESHOLD:
            try:
                await asyncio.to_thread(msg._flush, msg.take())
            except OSError as exc:
                self._free = (0.0, 0)  # look at the disk again before the next MAIL
                raise SpoolError(str(exc)) from exc

    async def read_back(self, msg: Incoming, start: int) -> bytes:
        """What has been written of a message being received, from offset `start`
        (for a check that needs the whole message: DKIM). Read in a thread once
        part of it is in the file; the caller bounds the size it asks for."""
        flushed = msg.size - msg.buffered
        held = b"".join(msg.chunks)

        def read() -> bytes:
            head = b""
            if msg.fd is not None and flushed > start:
                head = os.pread(msg.fd, flushed - start, start)
            return head + held[max(0, start - flushed) :]

        if msg.fd is None:
            return read()
        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            raise SpoolError(str(exc)) from exc

    async def abort(self, msg: Incoming) -> None:
        """Discard a message being received. The discard runs to its end even if the
        caller is cancelled meanwhile (a session cancelled again while it cleans up:
        a cancelled thread call that had not started would never run)."""
        await asyncio.shield(asyncio.to_thread(msg.discard))

    async def commit(self, msg: Incoming, envelope: Envelope, plain: bool = False) -> None:
        """Make message + envelope durable; returns only once they are on disk.
        `plain`: no line of the content begins with "." (kept with the content
        held in memory: its deliveries need no dot-stuffing pass)."""
        whole = b"".join(msg.chunks) if msg.fd is None else None
        job = _Job("msg", self._future(), incoming=msg, content=whole, envelope=envelope.to_json())
        await self._submit(job)
        if whole is not None and len(whole) <= RECENT_MAX_MESSAGE:
            self._remember(msg.queue_id, whole, plain)

    def _remember(self, queue_id: str, content: bytes, plain: bool) -> None:
        self._recent[queue_id] = (content, plain)
        self._recent_bytes += len(content)
        while self._recent_bytes > RECENT_BYTES:
            _, (dropped, _) = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    def _forget(self, queue_id: str) -> None:
        held = self._recent.pop(queue_id, None)
        if held is not None:
            self._recent_bytes -= len(held[0])

    def recent_content(self, queue_id: str) -> tuple[bytes, bool] | None:
        """(content, plain) of a message committed lately, if it is still held in
        memory (read from the loop only); else None, and `open_content` reads the file."""
        return self._recent.get(queue_id)

    async def record(self, queue_id: str, states: list[StateLine]) -> None:
        """Append delivery state changes (batched like commits): written to the file
        before this returns, so a crash of the relay keeps them, but not fdatasync'd,
        as Postfix marks a recipient done: a power loss may undo the latest changes,
        so a delivery is repeated (at-least-once), never lost (docs/spool.md)."""
        lines = b"".join(s.to_line() for s in states)
        await self._submit(_Job("state", self._future(), queue_id=queue_id, lines=lines))

    async def remove(self, queue_id: str) -> None:
        """Every delivery is final: the message leaves the queue (after the state
        changes submitted before, in the same thread; docs/spool.md)."""
        self._forget(queue_id)
        await self._submit(_Job("remove", self._future(), queue_id=queue_id))

    def _future(self) -> asyncio.Future[None]:
        # the loop `start` ran in (asyncio.get_running_loop costs a getpid per call)
        assert self._loop is not None, "spool not started"
        return self._loop.create_future()

    async def _submit(self, job: _Job) -> None:
        if self._committer is None:
            raise SpoolError("spool stopped" if self._stopping else "spool not started")
        self._committer.put(job)
        await job.future

    def _settle(self, jobs: list[_Job], errors: list[Exception | None]) -> None:
        """On the loop, once per batch: each waiter gets its answer."""
        if any(errors):
            self._free = (0.0, 0)  # look at the disk again before the next MAIL
        for job, err in zip(jobs, errors, strict=True):
            if job.future.done():  # its waiter was cancelled
                continue
            if err is None:
                job.future.set_result(None)
            else:
                job.future.set_exception(SpoolError(str(err)))

    def _synced(self, path: str | Path) -> None:
        if self.on_sync:
            self.on_sync(path)

    def _commit_batch(self, jobs: list[_Job]) -> list[Exception | None]:
        """Write and sync every message file of the batch, then the directory once;
        append the state lines; remove the finished messages.

        The message files are all written and their writeback started before the
        first is synced: one ext4 journal commit then covers them all, where a
        write-and-sync per file made a commit each (10 files of 10 KiB: 3.6 →
        2.0 ms a batch, machine CPU 0.22 → 0.12 ms a message; a pool of
        concurrent fdatasyncs, tried before, took 3.7 ms and 0.16 ms for 20:
        docs/performance.md). A message's state changes in one batch are one
        append, in the order they were recorded; those of a message removed in
        the same batch are not written at all (its files go: nothing is left to
        read them). Removals come last.
        """
        removed = {job.queue_id for job in jobs if job.kind == "remove"}
        messages = [job for job in jobs if job.kind == "msg"]
        appends: dict[str, list[_Job]] = {}
        for job in jobs:
            if job.kind == "state" and job.queue_id not in removed:
                appends.setdefault(job.queue_id, []).append(job)
        failed: dict[int, Exception] = {}
        alone = len(messages) == 1
        for step in (lambda job: self._write_message(job, alone), self._sync_message):
            for job in messages:
                if id(job) in failed:
                    continue
                try:
                    step(job)
                except OSError as exc:
                    assert job.incoming is not None
                    job.incoming.discard()
                    failed[id(job)] = exc
        if len(failed) < len(messages):
            try:
                assert self._queue_fd is not None, "spool not started"  # the thread runs after
                os.fsync(self._queue_fd)
                self._synced(self.queue)
            except OSError as exc:  # a failed directory sync fails every message in it
                failed.update((id(job), exc) for job in messages)
            else:  # the removals renamed before are durable: their files may be reused
                self._spares += self._freed
                self._freed.clear()
        for queue_id, unit in appends.items():
            try:
                self._append_state(queue_id, b"".join(j.lines for j in unit))
            except OSError as exc:
                failed.update((id(job), exc) for job in unit)
        for queue_id in removed:
            try:
                self.remove_now(queue_id)
            except OSError as exc:
                failed.update(
                    (id(j), exc) for j in jobs if j.kind == "remove" and j.queue_id == queue_id
                )
        return [failed.get(id(job)) for job in jobs]

    def _write_message(self, job: _Job, alone: bool) -> None:
        """The rest of the content, the envelope and the footer; writeback started
        unless the message is alone in its batch (its fdatasync follows at once)."""
        msg = job.incoming
        assert msg is not None
        footer = FOOTER.pack(MAGIC, msg.size, len(job.envelope), msg.crc, zlib.crc32(job.envelope))
        chunks = msg.take()
        # a message held whole in memory comes as `content` (joined once, at commit)
        content = [job.content] if job.content is not None else chunks
        spare = self._spares.pop() if msg.fd is None and self._spares else None
        if spare is not None:
            msg.reuse(spare[0])
        msg._flush([*content, job.envelope, footer])
        assert msg.fd is not None
        if spare is not None and spare[1] > self._size(job):
            os.ftruncate(msg.fd, self._size(job))
        if not alone:
            start_writeback(msg.fd)

    @staticmethod
    def _size(job: _Job) -> int:
        assert job.incoming is not None
        return job.incoming.size + len(job.envelope) + FOOTER.size

    def _sync_message(self, job: _Job) -> None:
        msg = job.incoming
        assert msg is not None and msg.fd is not None
        os.fdatasync(msg.fd)
        self._synced(msg.queue_id)
        os.close(msg.fd)
        msg.fd = None
        os.rename(msg.path, self._file(msg.queue_id, ".msg"))
        self._stateless[msg.queue_id] = self._size(job)

    def _append_state(self, queue_id: str, lines: bytes) -> None:
        path = self._file(queue_id, ".state")
        size = self._stateless.pop(queue_id, None)
        if size is not None:
            self._stated[queue_id] = size
        # os.open, not open(): no buffer object, isatty probe or seek per append
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, [lines])
        finally:
            os.close(fd)

    # -- reading back ----------------------------------------------------------

    def _file(self, queue_id: str, suffix: str) -> str:
        return f"{self._dir}/{queue_id}{suffix}"

    def msg_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.msg"

    def open_content(self, queue_id: str) -> tuple[BinaryIO, int]:
        """An open file positioned at the content, and the content's length."""
        fh = open(self._file(queue_id, ".msg"), "rb")  # noqa: SIM115 - caller closes
        fh.seek(-FOOTER.size, os.SEEK_END)
        _, length, _, _, _ = FOOTER.unpack(fh.read(FOOTER.size))
        fh.seek(0)
        return fh, length

    def load(self, queue_id: str) -> Stored:
        """Read one committed message; raise ValueError (RecordError: a malformed
        envelope) when it is torn or corrupt."""
        env, clen = self._record(queue_id, check_content=True)
        envelope = parse_envelope(env)
        return Stored(queue_id, envelope, clen, self._read_states(queue_id, len(envelope.plan)))

    def _record(self, queue_id: str, check_content: bool) -> tuple[bytes, int]:
        """(the envelope record, the content length) of a `.msg` file, its footer and
        checksums checked (the content's only with `check_content`)."""
        fd = os.open(self._file(queue_id, ".msg"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            total = os.fstat(fd).st_size
            if total < FOOTER.size:
                raise ValueError("shorter than its footer")
            footer = os.pread(fd, FOOTER.size, total - FOOTER.size)
            magic, clen, elen, ccrc, ecrc = FOOTER.unpack(footer)
            if magic != MAGIC or clen + elen + FOOTER.size != total:
                raise ValueError("footer does not match the file")
            crc = offset = 0
            while check_content and offset < clen:
                chunk = os.pread(fd, min(clen - offset, 1 << 20), offset)
                if not chunk:
                    raise ValueError("content truncated")
                crc = zlib.crc32(chunk, crc)
                offset += len(chunk)
            env = os.pread(fd, elen, clen)
        finally:
            os.close(fd)
        if (check_content and crc != ccrc) or len(env) != elen or zlib.crc32(env) != ecrc:
            raise ValueError("checksum mismatch")
        return env, clen

    def load_envelope(self, queue_id: str) -> Envelope:
        """A queued message's envelope alone (its footer and record, checksum checked):
        what the scheduler reads back for a message it holds in short form."""
        return parse_envelope(self._record(queue_id, check_content=False)[0])

    def _read_states(self, queue_id: str, plan_size: int, trim: bool = False) -> list[StateLine]:
        """The recorded state changes. The part after the last LF is a torn append
        (a crash mid-write) and is not recorded; a whole line that does not parse,
        fails its checksum or names a delivery not in the plan raises RecordError:
        the message's state is unknown, so it is set aside (SPEC Part 2 "Faults").
        `trim` (at start): the torn tail is also cut off the file, so appends start clean."""
        path = self._file(queue_id, ".state")
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return []
        if trim and raw and not raw.endswith(b"\n"):
            with open(path, "rb+") as fh:
                fh.truncate(raw.rfind(b"\n") + 1)
                os.fdatasync(fh.fileno())
        return [parse_state_line(line, plan_size) for line in raw.split(b"\n")[:-1]]

    def queue_ids(self) -> Iterator[str]:
        """Committed messages' ids in arrival order (names, not Paths: a deep queue)."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:  # a spool never started
            return
        yield from sorted(n[:-4] for n in names if n.endswith(".msg"))

    def recover(self) -> tuple[list[Queued], list[str]]:
        """Scan the spool at start: committed messages, and ids moved to corrupt/."""
        good: list[Queued] = []
        bad: list[str] = []
        for item in self.recovery():
            if isinstance(item, str):
                bad.append(item)
            else:
                good.append(item)
        return good, bad

    def recovery(self) -> Iterator[Queued | str]:
        """`recover` one message at a time, for a deep queue: each message's outline
        and states (footer, both checksums and the state lines checked; the envelope
        is parsed in full when its next attempt loads it), or the id of one moved to
        corrupt/. Leftovers (`.tmp` files, spares, state files without a message)
        are tidied before the first."""
        self.create()
        for tmp in [*self.queue.glob("*.tmp"), *self.spare.iterdir()]:
            tmp.unlink(missing_ok=True)
        ids = list(self.queue_ids())
        known = set(ids)
        for state in self.queue.glob("*.state"):
            if state.stem not in known:
                state.unlink(missing_ok=True)
        for qid in ids:
            try:
                env, _ = self._record(qid, check_content=True)
                outline = parse_outline(env)
                states = self._read_states(qid, len(outline.providers), trim=True)
            except (ValueError, OSError):
                self.quarantine(qid)
                yield qid
            else:
                yield Queued(qid, outline, states)

    def quarantine(self, queue_id: str) -> None:
        self._forget(queue_id)
        self._stateless.pop(queue_id, None)
        self._stated.pop(queue_id, None)
        for suffix in (".msg", ".state"):
            src = self.queue / f"{queue_id}{suffix}"
            if src.exists():
                shutil.move(src, self.corrupt / src.name)

    def remove_now(self, queue_id: str) -> None:
        """Remove a finished message's files here and now (recovery, before the
        writing thread runs; while it runs, `remove` goes through it). The file of
        a message committed here may become a spare."""
        left: tuple[str, ...]
        if (size := self._stateless.pop(queue_id, None)) is not None:
            left = ()
        elif (size := self._stated.pop(queue_id, None)) is not None:
            left = (".state",)
        else:  # recovered from an earlier run: which files it has is unknown
            left = (".msg", ".state")
        if size is not None:
            with contextlib.suppress(FileNotFoundError):
                self._retire(self._file(queue_id, ".msg"), size)
        for suffix in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(queue_id, suffix))

    def _retire(self, path: str, size: int) -> None:
        """A finished message's file: into spare/ while there is room, else unlinked."""
        if size <= SPARE_MAX_SIZE and len(self._spares) + len(self._freed) < SPARES:
            spare = f"{self.spare}/{next(self._spare_names)}"
            try:
                os.rename(path, spare)
            except OSError:  # spare/ gone or unusable: the file goes as before
                pass
            else:
                self._freed.append((spare, size))
                return
        os.unlink(path)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: fdatasync alone does the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback, do not wait


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages out without waiting (Linux's
    sync_file_range; a hint: its fdatasync still follows and is what counts)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write every part, in order, with as few writes as the kernel allows (writev)."""
    pending = [p for p in parts if p]
    while pending:
        written = os.writev(fd, pending)
        while pending and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:  # a short write ended inside a part
            pending[0] = pending[0][written:]


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in the directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
