"""`relay queue`: inspect and manage the spool, safe while `relay serve` runs.

The running relay is the only writer of delivery state. It holds an exclusive
lock on `spool/relay.lock`; while it does, `retry` and `delete` (and the
`pickup` of a message `relay replay` committed into its queue) are requests
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
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from relay.config import RelaySettings
from relay.log import DeliveryLog, oplog
from relay.records import PROVIDERS, ControlAnswer, ControlRequest, Provider, RecordError
from relay.scheduler import Message, Scheduler
from relay.spool import Spool, control
from relay.spool.locks import spool_lock
from relay.spool.workers import all_spools

POLL = 0.25  # seconds between looks at control/ by the running relay
WAIT = 10.0  # seconds the command waits for the relay's answer
# ... about a whole queue: a retry after an outage records hundreds of thousands of
# state lines first (190,000 a worker: about 12 s on this machine, bench/outage.py)
WAIT_ALL = 300.0


class QueueError(Exception):
    pass


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
    """`relay queue list` (one line each) and `show` (`full`) as JSON."""
    env = msg.env  # offline: every message loaded (load_scheduler)
    by_provider: dict[str, dict[str, int]] = {}
    for d in msg.deliveries:
        counts = by_provider.setdefault(d.provider, {})
        counts[d.status] = counts.get(d.status, 0) + 1
    open_due = [d.due for d in msg.deliveries if not d.final]
    out: dict[str, Any] = {
        "queue_id": msg.queue_id,
        "age_s": round(now - msg.received, 1),
        "sender": env.mail_from,
        "received": env.received,
        "states": by_provider,
        "next_attempt_in_s": round(max(0.0, min(open_due) - now), 1) if open_due else None,
        "dsn": env.dsn,
    }
    if full:
        out["rcpts"] = list(env.rcpts)
        out["message_id"] = env.message_id
        out["client_ip"] = env.client_ip
        out["size"] = env.size
        out["deliveries"] = [
            {**d.entry.to_dict(), "status": d.status, "attempts": d.attempts,
             "next_attempt_in_s": round(max(0.0, d.due - now), 1) if not d.final else None,
             "last_reply": d.last}
            for d in msg.deliveries
        ]  # fmt: skip
    return out


# -- requests to the running relay ---------------------------------------------------


def request(spool: Spool, op: str, queue_id: str | None, provider: str | None) -> ControlAnswer:
    """Ask the relay running on `spool` to carry out a retry or delete."""
    wait = WAIT if queue_id is not None else WAIT_ALL
    answer = control.ask(spool, ControlRequest(op, queue_id, provider), wait)
    if answer is None:
        raise QueueError(f"the running relay did not answer within {wait:.0f} s")
    return answer


async def execute(sched: Scheduler, req: ControlRequest) -> ControlAnswer:
    if req.op == "pickup":
        return {"count": await pickup(sched, req.queue_id)}
    if req.queue_id is not None and req.queue_id not in sched.messages:
        raise QueueError(f"{req.queue_id}: not in the queue")
    if req.op == "retry":
        return {"count": await sched.retry(req.queue_id)}
    if req.op == "delete":
        if not req.queue_id:
            raise QueueError("delete needs a queue id")
        if req.provider is not None and req.provider not in PROVIDERS:
            raise QueueError(f"unknown provider {req.provider!r}")
        return {"count": await sched.delete(req.queue_id, cast(Provider | None, req.provider))}
    raise QueueError(f"unknown operation {req.op!r}")


async def pickup(sched: Scheduler, queue_id: str | None) -> int:
    """Schedule a message another command (`relay replay`) committed into this spool's
    queue while the relay ran; 0 when it is known already or gone (sent meanwhile)."""
    if not queue_id or not re.fullmatch(r"[0-9A-F]+", queue_id):
        raise QueueError(f"pickup needs a queue id, not {queue_id!r}")
    if queue_id in sched.messages:
        return 0
    try:
        stored = await asyncio.to_thread(sched.spool.load, queue_id)
    except FileNotFoundError:
        return 0
    except (ValueError, OSError) as exc:
        raise QueueError(f"{queue_id}: unusable ({exc})") from None
    return int(sched.add(stored.queue_id, stored.envelope, stored.states))


async def serve_control(spool: Spool, sched: Scheduler) -> None:
    """The running relay's side: carry out requests found in control/."""
    while True:
        for path in control.pending(spool):
            answer: ControlAnswer
            try:
                answer = await execute(sched, control.read(path))
            except (QueueError, RecordError) as exc:
                answer = {"error": str(exc)}
            except FileNotFoundError:
                continue
            control.answer(path, answer)
            oplog.info("queue request", request=path.stem, **answer)
        await asyncio.sleep(POLL)


def manage(
    settings: RelaySettings, op: str, queue_id: str | None, provider: str | None
) -> ControlAnswer:
    """retry/delete from the command line, whether or not the relay (or a worker) runs."""
    spools = all_spools(settings.spool)
    if queue_id is None:  # every worker at once: each answers for its own spool
        with ThreadPoolExecutor(len(spools)) as pool:
            answers = list(pool.map(lambda s: _manage_one(settings, s, op, None, provider), spools))
        errors = [a for a in answers if "error" in a]
        return errors[0] if errors else {"count": sum(a.get("count", 0) for a in answers)}
    holder = next((s for s in spools if s.msg_path(queue_id).exists()), spools[0])
    return _manage_one(settings, holder, op, queue_id, provider)


def _manage_one(
    settings: RelaySettings, spool: Spool, op: str, queue_id: str | None, provider: str | None
) -> ControlAnswer:
    with spool_lock(spool) as lock:
        if lock is None:
            return request(spool, op, queue_id, provider)
        return asyncio.run(_offline(settings, spool, op, queue_id, provider))


async def _offline(
    settings: RelaySettings, spool: Spool, op: str, queue_id: str | None, provider: str | None
) -> ControlAnswer:
    log = DeliveryLog.for_settings(settings)  # hashes like the relay under log_privacy: hash
    await spool.start()
    try:
        request = ControlRequest(op, queue_id, provider)
        return await execute(load_scheduler(settings, spool, log), request)
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
