"""The spool: durable group commit, torn-record recovery, disk faults."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.records import Envelope, PlanEntry, StateLine
from relay.spool import FOOTER, WRITE_THRESHOLD, Spool, SpoolError, new_queue_id
from relay.spool.store import CHANGES_PER_PART
from tests.conftest import read_content

pytestmark = pytest.mark.timeout(30)


def envelope(qid: str) -> Envelope:
    plan = (PlanEntry("a@example.com", "legacy", "a@example.com", "primary", None, None, False),)
    return Envelope(
        queue_id=qid, received="2030-01-01T00:00:00.000Z", received_epoch=1893456000.0,
        mail_from="s@origin.test", rcpts=("a@example.com",), options=(), client_ip="127.0.0.1",
        message_id=None, size=0, forwarded=False, plan=plan, dsn=False,
    )  # fmt: skip


async def enqueue(spool: Spool, content: bytes, pieces: int = 3) -> str:
    qid = new_queue_id()
    msg = spool.begin(qid)
    step = max(1, len(content) // pieces)
    for i in range(0, len(content), step):
        await spool.write(msg, content[i : i + step])
    await spool.commit(msg, envelope(qid))
    return qid


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    s = Spool(tmp_path / "spool")
    await s.start()
    yield s
    await s.stop()


async def test_commit_then_load_round_trip(spool: Spool) -> None:
    content = b"Subject: x\r\n\r\n" + os.urandom(5000)
    qid = await enqueue(spool, content)
    assert [p.name for p in spool.queue.iterdir()] == [f"{qid}.msg"]  # no .tmp left
    stored = spool.load(qid)
    assert b'{"v":1,"queue_id":"' + qid.encode() in spool.msg_path(qid).read_bytes()
    assert stored.envelope == envelope(qid)
    assert stored.content_length == len(content) and stored.states == []
    assert read_content(spool, qid) == content


async def test_large_message_streams_through_the_file(spool: Spool) -> None:
    chunk = os.urandom(256 * 1024)
    qid = new_queue_id()
    msg = spool.begin(qid)
    for _ in range(12):  # 3 MiB: flushed to disk as it comes
        await spool.write(msg, chunk)
        assert msg.buffered < WRITE_THRESHOLD
    assert os.path.getsize(msg.path) >= 2 * WRITE_THRESHOLD
    await spool.commit(msg, envelope(qid))
    fh, length = spool.open_content(qid)
    with fh:
        assert length == 12 * len(chunk)
        assert fh.read(len(chunk)) == chunk


async def test_abort_leaves_nothing(spool: Spool) -> None:
    msg = spool.begin(new_queue_id())
    await spool.write(msg, b"x" * (WRITE_THRESHOLD + 10))
    assert os.path.exists(msg.path)
    await spool.abort(msg)
    assert list(spool.queue.iterdir()) == []


async def test_abort_while_a_write_is_in_its_thread_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes while a large write is in its thread: the session is cancelled
    and aborts at once, but the thread goes on; the discard waits for it, and the
    write never creates the file again after the discard."""
    from relay.spool.store import Incoming

    entered, discarding, release = threading.Event(), threading.Event(), threading.Event()
    real_flush, real_discard = Incoming._flush, Incoming.discard

    def slow_flush(self: Incoming, parts: list[bytes]) -> None:
        entered.set()
        release.wait(5)
        real_flush(self, parts)

    def discard(self: Incoming) -> None:
        discarding.set()
        real_discard(self)

    monkeypatch.setattr(Incoming, "_flush", slow_flush)
    monkeypatch.setattr(Incoming, "discard", discard)
    msg = spool.begin(new_queue_id())
    writing = asyncio.ensure_future(spool.write(msg, b"x" * (WRITE_THRESHOLD + 10)))
    await asyncio.to_thread(entered.wait, 5)
    writing.cancel()  # what the session's cancellation does to its write
    aborting = asyncio.ensure_future(spool.abort(msg))
    await asyncio.to_thread(discarding.wait, 5)  # the discard is in its thread
    release.set()
    await aborting  # after the write: it waited for it
    assert list(spool.queue.iterdir()) == []
    with pytest.raises(asyncio.CancelledError):
        await writing


async def test_abort_cancelled_at_once_still_discards(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session cancelled a second time while it aborts (an EOF, then the close)
    still removes its partial file: the discard is not cancelled with its caller."""
    from relay.spool.store import Incoming

    msg = spool.begin(new_queue_id())
    await spool.write(msg, b"x" * (WRITE_THRESHOLD + 10))
    assert os.path.exists(msg.path)
    done = threading.Event()
    real_discard = Incoming.discard

    def discard(self: Incoming) -> None:
        real_discard(self)
        done.set()

    monkeypatch.setattr(Incoming, "discard", discard)
    aborting = asyncio.ensure_future(spool.abort(msg))
    await asyncio.sleep(0)  # the abort has started: its thread call is queued
    aborting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await aborting
    assert await asyncio.to_thread(done.wait, 5)
    assert list(spool.queue.iterdir()) == []


async def test_sync_order_and_group_commit(spool: Spool) -> None:
    """Each message: data fdatasync'd, then the directory fsync'd, then commit() returns."""
    events: list[tuple[str, str]] = []
    spool.on_sync = lambda path: events.append(("sync", Path(path).name))

    async def one(i: int) -> str:
        qid = await enqueue(spool, b"m%d\r\n" % i)
        events.append(("done", qid))
        return qid

    qids = await asyncio.gather(*(one(i) for i in range(20)))
    dir_syncs = [i for i, e in enumerate(events) if e == ("sync", spool.queue.name)]
    for qid in qids:
        data = events.index(("sync", qid))
        done = events.index(("done", qid))
        assert any(data < d < done for d in dir_syncs), (qid, events)
    assert len(dir_syncs) < len(qids), "concurrent commits share a directory sync"


async def test_state_records_round_trip(spool: Spool) -> None:
    qid = await enqueue(spool, b"x\r\n")
    await spool.record(qid, [StateLine(0, "deferred", 1)])
    await spool.record(qid, [StateLine(0, "delivered", 2)])
    assert [s.status for s in spool.load(qid).states] == ["deferred", "delivered"]


async def test_a_new_message_waits_behind_one_part_of_a_backlogs_changes(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain's removals or a retry's appends come by the thousand: a message
    arriving meanwhile is committed after the part under way, not after all of
    them (its 250 waited behind every unlink of the backlog: fresh mail's p95
    during a drain)."""
    qids = await asyncio.gather(
        *(enqueue(spool, b"x\r\n") for _ in range(2 * CHANGES_PER_PART + 1))
    )
    first_part, rest, done = threading.Event(), threading.Event(), []
    append = spool._append_state

    def held_append(queue_id: str, lines: bytes) -> None:
        # the first part is under way until the message is handed over; the rest
        # waits until the message is committed
        (first_part if len(done) < CHANGES_PER_PART else rest).wait(10)
        append(queue_id, lines)
        done.append(queue_id)

    monkeypatch.setattr(spool, "_append_state", held_append)
    changes = asyncio.gather(*(spool.record(q, [StateLine(0, "deferred", 1)]) for q in qids))
    await asyncio.sleep(0.05)  # handed over: the thread holds its first part
    fresh = asyncio.ensure_future(enqueue(spool, b"fresh\r\n"))
    await asyncio.sleep(0.05)  # the message is handed over too
    first_part.set()
    try:
        await asyncio.wait_for(asyncio.shield(fresh), 5)
        assert len(done) == CHANGES_PER_PART  # one part, then the message
    finally:
        rest.set()
    await asyncio.gather(fresh, changes)
    assert sorted(done) == sorted(qids)
    assert all(len(spool.load(q).states) == 1 for q in qids)


async def test_stop_commits_what_was_submitted_then_refuses(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    await s.start()
    msgs = [s.begin(new_queue_id()) for _ in range(5)]
    for m in msgs:
        await s.write(m, b"x\r\n")
    waiting = [asyncio.create_task(s.commit(m, envelope(m.queue_id))) for m in msgs]
    await asyncio.sleep(0)  # submitted, not yet synced
    await s.stop()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)  # each waiter got its answer
    assert sorted(s.queue_ids()) == sorted(m.queue_id for m in msgs)
    late = s.begin(new_queue_id())
    with pytest.raises(SpoolError):
        await s.commit(late, envelope(late.queue_id))


# -- recovery -------------------------------------------------------------------------


def committed(tmp_path: Path, content: bytes, states: list[StateLine]) -> tuple[Path, str]:
    async def go() -> str:
        s = Spool(tmp_path / "src")
        await s.start()
        qid = await enqueue(s, content)
        for st in states:
            await s.record(qid, [st])
        await s.stop()
        return qid

    return tmp_path / "src", asyncio.run(go())


def copy_spool(src: Path, dst: Path) -> Spool:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return Spool(dst)


def offsets(total: int, rng: random.Random, n: int) -> Iterator[int]:
    yield from (0, 1, total - 1, total - FOOTER.size, total - FOOTER.size - 1)
    yield from (rng.randrange(total) for _ in range(n))


def test_recover_never_takes_a_torn_message(tmp_path: Path) -> None:
    rng = random.Random(1234)
    content = b"Received: x\r\n\r\n" + os.urandom(3000)
    states = [StateLine(0, "deferred", k, 1.5 * k) for k in range(1, 6)]
    src, qid = committed(tmp_path, content, states)
    msg_size = (src / "queue" / f"{qid}.msg").stat().st_size

    intact = copy_spool(src, tmp_path / "intact").recover()
    assert [m.queue_id for m in intact[0]] == [qid] and intact[1] == []

    for i, cut in enumerate(offsets(msg_size, rng, 60)):
        s = copy_spool(src, tmp_path / f"m{i}")
        os.truncate(s.queue / f"{qid}.msg", cut)
        good, bad = s.recover()
        assert good == [] and bad == [qid], cut  # moved aside, never delivered
        assert (s.corrupt / f"{qid}.msg").exists() and not (s.queue / f"{qid}.state").exists()


def test_recover_keeps_only_whole_state_lines(tmp_path: Path) -> None:
    states = [StateLine(0, "deferred", k, 10.0 * k, "451 x") for k in (1, 2)]
    states += [StateLine(0, "delivered", 3, reply="250 2.0.0 ok")]
    src, qid = committed(tmp_path, b"hello\r\n", states)
    raw = (src / "queue" / f"{qid}.state").read_bytes()
    line_ends = [i + 1 for i, b in enumerate(raw) if b == ord("\n")]
    for cut in range(len(raw) + 1):
        s = copy_spool(src, tmp_path / f"s{cut}")
        os.truncate(s.queue / f"{qid}.state", cut)
        good, bad = s.recover()
        assert bad == [] and [m.queue_id for m in good] == [qid]
        whole = sum(1 for e in line_ends if e <= cut)
        assert good[0].states == states[:whole], cut  # a prefix, never a torn record


def test_state_appended_after_a_torn_line_is_kept(tmp_path: Path) -> None:
    src, qid = committed(tmp_path, b"hello\r\n", [StateLine(0, "deferred", 1)])
    s = copy_spool(src, tmp_path / "torn")
    state = s.queue / f"{qid}.state"
    state.write_bytes(state.read_bytes() + b'{"i":0,"s":"defe')  # a crash mid-append
    s.recover()

    async def append() -> None:
        await s.start()
        await s.record(qid, [StateLine(0, "delivered", 2)])
        await s.stop()

    asyncio.run(append())
    assert [x.status for x in s.load(qid).states] == ["deferred", "delivered"]


def test_recover_rejects_flipped_bits_and_unknown_versions(tmp_path: Path) -> None:
    src, qid = committed(tmp_path, b"payload\r\n" * 50, [])
    size = (src / "queue" / f"{qid}.msg").stat().st_size
    rng = random.Random(7)
    for i in range(20):
        s = copy_spool(src, tmp_path / f"f{i}")
        path = s.queue / f"{qid}.msg"
        data = bytearray(path.read_bytes())
        data[rng.randrange(size)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        assert s.recover() == ([], [qid])


def test_recover_discards_unfinished_receptions(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    s.create()
    (s.queue / "ABC.tmp").write_bytes(b"half a message")
    (s.queue / "ORPHAN.state").write_bytes(b'{"i":0,"s":"deferred"}\n')
    assert s.recover() == ([], [])
    assert list(s.queue.iterdir()) == []


async def test_state_lines_are_written_not_synced_and_skipped_for_a_finished_message(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only message files and the directory are synced (a state line may be lost to
    a power loss, never to a crash: it is written before `record` returns); the
    state lines of a message removed in the same batch never reach the disk."""
    synced: list[str] = []
    release = threading.Event()

    def on_sync(path: str | Path) -> None:
        synced.append(Path(path).name)
        if Path(path).name.startswith(blocker_id):
            release.wait(5)  # the writing thread is busy: what comes next is one batch

    blocker_id = "~"  # nothing blocks yet
    spool.on_sync = on_sync
    qid = await enqueue(spool, b"x\r\n")
    await spool.record(qid, [StateLine(0, "deferred", 1)])
    assert (spool.queue / f"{qid}.state").read_bytes().count(b"\n") == 1  # written
    assert not any(name.endswith(".state") for name in synced), synced

    done = await enqueue(spool, b"y\r\n")
    opened: list[str] = []
    real_open = os.open

    def watch(path: str, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    blocker_id = new_queue_id()
    msg = spool.begin(blocker_id)
    await spool.write(msg, b"z\r\n")
    blocked = asyncio.ensure_future(spool.commit(msg, envelope(blocker_id)))
    while not any(name.startswith(blocker_id) for name in synced):
        await asyncio.sleep(0.01)
    finishing = asyncio.gather(
        spool.record(done, [StateLine(0, "delivered", 1)]), spool.remove(done)
    )
    assert spool._committer is not None
    committer = spool._committer
    while committer.gathered or committer.jobs.empty():  # both behind the busy thread
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(blocked, finishing)
    assert not any(p.endswith(f"{done}.state") for p in opened), opened
    assert not (spool.queue / f"{done}.msg").exists()


async def test_removal_unlinks_only_the_files_a_message_has(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message committed here and never given a state line has one file: its
    removal keeps that one as a spare (nothing unlinked); given state lines, its
    message file is kept too and the state file unlinked; recovered from an
    earlier run (which files it has is unknown), both files are unlinked."""
    unlinked: list[str] = []
    real_unlink = os.unlink

    def watch(path: Any, *args: Any, **kwargs: Any) -> None:
        unlinked.append(Path(path).name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", watch)
    bare = await enqueue(spool, b"x\r\n")
    stated = await enqueue(spool, b"y\r\n")
    await spool.record(stated, [StateLine(0, "deferred", 1)])
    await spool.remove(bare)
    await spool.remove(stated)
    assert unlinked == [f"{stated}.state"], unlinked
    assert list(spool.queue.iterdir()) == []
    # both files kept to be written over
    kept = sorted(spare.read_bytes()[:3] for spare in spool.spare.iterdir())
    assert kept == [b"x\r\n", b"y\r\n"]

    older = await enqueue(spool, b"z\r\n")
    await spool.stop()
    again = Spool(spool.root)  # a restart: what files a message has is not known
    [queued], _ = again.recover()
    assert queued.queue_id == older
    unlinked.clear()
    again.remove_now(older)
    assert unlinked == [f"{older}.msg", f"{older}.state"], unlinked
    await spool.start()  # for the fixture's stop


async def test_a_new_message_is_written_over_a_spare_once_its_removal_is_synced(
    spool: Spool,
) -> None:
    """A finished message's file is reused for a later message (same inode, cut to
    the new size), but only after a sync of queue/ has made its removal durable:
    the message of the very next batch gets a new file."""
    first = await enqueue(spool, b"first\r\n" * 1000)
    inode = spool.msg_path(first).stat().st_ino
    await spool.remove(first)
    [spare] = spool.spare.iterdir()
    assert spare.stat().st_ino == inode
    second = await enqueue(spool, b"second\r\n")  # its batch syncs queue/: spare usable after
    assert spool.msg_path(second).stat().st_ino != inode and spare.exists()
    content = b"Subject: third\r\n\r\nshort\r\n"
    third = await enqueue(spool, content)
    assert spool.msg_path(third).stat().st_ino == inode
    assert list(spool.spare.iterdir()) == []
    stored = spool.load(third)  # footer, lengths and both checksums hold
    assert stored.content_length == len(content) and read_content(spool, third) == content
    env = envelope(third).to_json()
    assert spool.msg_path(third).stat().st_size == len(content) + len(env) + FOOTER.size


async def test_spares_are_bounded_in_number_and_size(spool: Spool) -> None:
    """At most SPARES files wait in spare/, none over SPARE_MAX_SIZE: the rest are
    unlinked as before (a spare holds its disk space)."""
    from relay.spool.store import SPARE_MAX_SIZE, SPARES

    big = await enqueue(spool, b"b" * (SPARE_MAX_SIZE + 1), pieces=1)
    await spool.remove(big)
    assert list(spool.spare.iterdir()) == [] and not spool.msg_path(big).exists()
    qids = list(await asyncio.gather(*(enqueue(spool, b"m\r\n") for _ in range(SPARES + 5))))
    await asyncio.gather(*(spool.remove(q) for q in qids))
    assert len(list(spool.spare.iterdir())) == SPARES
    assert list(spool.queue.iterdir()) == []


async def test_spares_are_emptied_at_start(spool: Spool) -> None:
    """A spare may hold half of a message written over it when the relay died: it
    is never recovered, and restarting empties spare/."""
    qid = await enqueue(spool, b"x\r\n")
    await spool.remove(qid)
    assert len(list(spool.spare.iterdir())) == 1
    await spool.stop()
    again = Spool(spool.root)
    good, bad = again.recover()
    assert good == [] and bad == [] and list(again.spare.iterdir()) == []
    await spool.start()  # for the fixture's stop


def test_write_all_finishes_short_writes_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev may write less than asked (a signal, a nearly full disk): the rest follows."""
    from relay.spool.store import write_all

    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, parts: real(fd, [parts[0][:3]]))
    parts = [b"content", b"", b"envelope", b"footer!"]
    with open(tmp_path / "f", "wb") as fh:
        write_all(fh.fileno(), parts)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


async def test_log_lines_of_a_pass_are_on_file_before_its_jobs_reach_the_thread(
    spool: Spool, tmp_path: Path
) -> None:
    """The delivery log writes a pass's lines at its end; a state change submitted in
    the same pass goes to the writing thread only after them (`before_batch`), so a
    change on disk never precedes the event logged before it was submitted."""
    from relay.log import DeliveryLog

    path = tmp_path / "deliveries.jsonl"
    log = DeliveryLog(path, "node")
    spool.before_batch = log.flush_batch
    qid = await enqueue(spool, b"x\r\n")
    committer = spool._committer
    assert committer is not None
    seen: list[bool] = []

    class Handover:  # the thread's queue, noting what the log holds at each hand-over
        def __init__(self, jobs: Any) -> None:
            self.jobs = jobs

        def put(self, item: Any) -> None:
            seen.append(b'"deleted"' in path.read_bytes())
            self.jobs.put(item)

        def get(self) -> Any:
            return self.jobs.get()

        def get_nowait(self) -> Any:
            return self.jobs.get_nowait()

    committer.jobs = Handover(committer.jobs)  # type: ignore[assignment]
    recording = asyncio.ensure_future(spool.record(qid, [StateLine(0, "deleted", 1)]))
    await asyncio.sleep(0)  # the job is put first: the hand-over is due before the log's
    log.emit("deleted", queue_id=qid, rcpt="a@example.com", provider="legacy")
    await recording
    assert seen == [True]
    log.close()
