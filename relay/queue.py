"""`relay queue`: inspect and manage the spool, safe while `relay serve` runs.

The running relay is the only writer of delivery state. It holds an exclusive
lock on `spool/relay.lock`; while it does, `retry` and `delete` are requests
dropped into `spool/control/` that the relay carries out within 2 s, in order
with its own delivery attempts (a delete waits for an attempt in flight, so a
deleted delivery is never sent afterwards). With no relay running, the command
takes the lock and applies the change to the spool itself, through the same
scheduler code.

With `workers: N > 1` each worker process owns `spool/w<I>/` (its own lock,
queue and control/); these commands look at every worker spool plus the root,
and send a request about one message to the worker whose spool holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from relay.config import RelaySettings
from relay.log import DeliveryLog, oplog
from relay.scheduler import Message, Scheduler
from relay.spool import Spool

POLL = 0.25  # seconds between looks at control/ by the running relay
WAIT = 10.0  # seconds the command waits for the relay's answer


class QueueError(Exception):
    pass


@contextlib.contextmanager
def spool_lock(spool: Spool, wait: bool = False) -> Iterator[IO[str] | None]:
    """The relay's exclusive lock; yields None when someone else holds it."""
    spool.create()
    fh = open(spool.root / "relay.lock", "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fh
    finally:
        fh.close()


def worker_root(root: Path, index: int) -> Path:
    return root / f"w{index}"


def worker_roots(root: Path) -> list[Path]:
    """Existing worker spools `w<I>/` under the spool root, by index."""
    try:
        names = [n for n in os.listdir(root) if re.fullmatch(r"w\d+", n)]
    except FileNotFoundError:
        return []
    return [root / n for n in sorted(names, key=lambda n: int(n[1:])) if (root / n).is_dir()]


def all_spools(root: Path) -> list[Spool]:
    """The root spool and every worker spool, root first."""
    return [Spool(root)] + [Spool(r) for r in worker_roots(root)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_queued(src: Spool, dst: Spool) -> int:
    """Move every queued message (`.state` first, then `.msg`) from src to dst by rename.

    Idempotent and crash-safe: each file is always in exactly one of the two
    queues, and a message split by a crash mid-move is completed by the next
    call, which runs before any relay recovers either spool. Returns the
    number of messages moved; the caller holds both spools' locks.
    """
    try:
        names = os.listdir(src.queue)
    except FileNotFoundError:
        return 0
    dst.create()
    ids = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith((".msg", ".state"))})
    moved = 0
    for qid in ids:
        for suffix in (".state", ".msg"):
            source, target = src.queue / f"{qid}{suffix}", dst.queue / f"{qid}{suffix}"
            if not source.exists():
                continue
            if target.exists():
                oplog.error("queued file already in the target spool; left in place",
                            path=str(source), target=str(dst.root))  # fmt: skip
                continue
            os.rename(source, target)
        moved += 1
    if moved:
        _fsync_dir(dst.queue)
        _fsync_dir(src.queue)
        oplog.info("queued messages moved", messages=moved, source=str(src.root),
                   target=str(dst.root))  # fmt: skip
    return moved


def gather(sources: list[Spool], target: Spool, wait: float) -> int:
    """Move the queues of `sources` into `target`, each under its lock (waiting up to `wait`).

    The caller holds the target's lock. Raises QueueError when a source stays locked.
    """
    moved = 0
    for src in sources:
        if not src.queue.exists():
            continue
        with lock_within(src, wait) as lock:
            if lock is None:
                raise QueueError(f"the spool {src.root} is in use by another relay")
            moved += move_queued(src, target)
    return moved


@contextlib.contextmanager
def lock_within(spool: Spool, wait: float) -> Iterator[IO[str] | None]:
    """spool_lock, retried for up to `wait` seconds (an old worker may still be draining)."""
    deadline = time.monotonic() + wait
    while True:
        with spool_lock(spool) as lock:
            if lock is not None or time.monotonic() >= deadline:
                yield lock
                return
        time.sleep(0.1)


def load_scheduler(settings: RelaySettings, spool: Spool, log: DeliveryLog) -> Scheduler:
    """A scheduler holding the spool's current state (not started: nothing is sent)."""
    sched = Scheduler(settings, spool, log)
    for qid in spool.queue_ids():
        try:
            s = spool.load(qid)
        except (ValueError, OSError):
            continue  # torn, or removed while we read: the relay deals with it
        sched.add(s.queue_id, s.envelope, s.states)
    return sched


def describe(msg: Message, now: float, full: bool = False) -> dict[str, Any]:
    env = msg.envelope
    by_provider: dict[str, dict[str, int]] = {}
    for d in msg.deliveries:
        counts = by_provider.setdefault(d.provider, {})
        counts[d.status] = counts.get(d.status, 0) + 1
    open_due = [d.due for d in msg.deliveries if not d.final]
    out: dict[str, Any] = {
        "queue_id": msg.queue_id,
        "age_s": round(now - msg.received, 1),
        "sender": env.get("mail_from", ""),
        "received": env.get("received"),
        "states": by_provider,
        "next_attempt_in_s": round(max(0.0, min(open_due) - now), 1) if open_due else None,
        "dsn": bool(env.get("dsn")),
    }
    if full:
        out["rcpts"] = env.get("rcpts", [])
        out["message_id"] = env.get("message_id")
        out["client_ip"] = env.get("client_ip")
        out["size"] = env.get("size")
        out["deliveries"] = [
            {**d.plan, "status": d.status, "attempts": d.attempts,
             "next_attempt_in_s": round(max(0.0, d.due - now), 1) if not d.final else None,
             "last_reply": d.last}
            for d in msg.deliveries
        ]  # fmt: skip
    return out


# -- requests to the running relay ---------------------------------------------------


def request(spool: Spool, op: str, queue_id: str | None, provider: str | None) -> dict[str, Any]:
    name = f"{time.time_ns()}-{secrets.token_hex(4)}"
    tmp = spool.control / f"{name}.tmp"
    tmp.write_text(json.dumps({"op": op, "queue_id": queue_id, "provider": provider}))
    os.rename(tmp, spool.control / f"{name}.req")
    done = spool.control / f"{name}.done"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if done.exists():
            answer: dict[str, Any] = json.loads(done.read_text())
            done.unlink(missing_ok=True)
            return answer
        time.sleep(0.05)
    (spool.control / f"{name}.req").unlink(missing_ok=True)
    raise QueueError("the running relay did not answer within 10 s")


async def execute(
    sched: Scheduler, op: str, queue_id: str | None, provider: str | None
) -> dict[str, Any]:
    if queue_id is not None and queue_id not in sched.messages:
        raise QueueError(f"{queue_id}: not in the queue")
    if op == "retry":
        return {"count": await sched.retry(queue_id)}
    if op == "delete":
        if not queue_id:
            raise QueueError("delete needs a queue id")
        return {"count": await sched.delete(queue_id, provider)}
    raise QueueError(f"unknown operation {op!r}")


async def serve_control(spool: Spool, sched: Scheduler) -> None:
    """The running relay's side: carry out requests found in control/."""
    while True:
        for req in sorted(spool.control.glob("*.req")):
            try:
                body = json.loads(req.read_text())
                answer = await execute(
                    sched, body["op"], body.get("queue_id"), body.get("provider")
                )
            except (QueueError, ValueError, KeyError) as exc:
                answer = {"error": str(exc)}
            except FileNotFoundError:
                continue
            tmp = req.with_suffix(".tmp")
            tmp.write_text(json.dumps(answer))
            os.rename(tmp, req.with_suffix(".done"))
            req.unlink(missing_ok=True)
            oplog.info("queue request", request=req.stem, **answer)
        await asyncio.sleep(POLL)


def manage(
    settings: RelaySettings, op: str, queue_id: str | None, provider: str | None
) -> dict[str, Any]:
    """retry/delete from the command line, whether or not the relay (or a worker) runs."""
    spools = all_spools(settings.spool)
    if queue_id is None:
        count = 0
        for spool in spools:
            answer = _manage_one(settings, spool, op, None, provider)
            if "error" in answer:
                return answer
            count += answer["count"]
        return {"count": count}
    holder = next((s for s in spools if s.msg_path(queue_id).exists()), spools[0])
    return _manage_one(settings, holder, op, queue_id, provider)


def _manage_one(
    settings: RelaySettings, spool: Spool, op: str, queue_id: str | None, provider: str | None
) -> dict[str, Any]:
    with spool_lock(spool) as lock:
        if lock is None:
            return request(spool, op, queue_id, provider)
        return asyncio.run(_offline(settings, spool, op, queue_id, provider))


async def _offline(
    settings: RelaySettings, spool: Spool, op: str, queue_id: str | None, provider: str | None
) -> dict[str, Any]:
    log = DeliveryLog.for_settings(settings)  # hashes like the relay under log_privacy: hash
    await spool.start()
    try:
        return await execute(load_scheduler(settings, spool, log), op, queue_id, provider)
    finally:
        await spool.stop()
        log.close()


def _snapshot(settings: RelaySettings) -> dict[str, Message]:
    """Queued messages of the root spool and every worker spool."""
    messages: dict[str, Message] = {}
    log = DeliveryLog(Path(os.devnull), settings.node_name)
    try:
        for spool in all_spools(settings.spool):
            messages.update(load_scheduler(settings, spool, log).messages)
    finally:
        log.close()
    return messages


def list_messages(settings: RelaySettings) -> list[dict[str, Any]]:
    messages = _snapshot(settings)
    now = time.time()
    return [describe(m, now) for m in sorted(messages.values(), key=lambda m: m.received)]


def show_message(settings: RelaySettings, queue_id: str) -> dict[str, Any] | None:
    msg = _snapshot(settings).get(queue_id)
    return describe(msg, time.time(), full=True) if msg else None
