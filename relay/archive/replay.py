"""`relay replay`: send archived (message, recipient) pairs again to one provider.

Choosing: every archived message received in the window (and for the users
asked, by their index hash) is decrypted; each of its recipients that the
*current* pilot list routes to the target provider is a candidate, kept unless
(`--only-missing`, the default) the delivery logs show that provider already
has it: a `delivery` of that (node, queue id, recipient) there with outcome
`delivered`, or a replay of it (`replayed` event) that was delivered or is still
under way (not finally failed or deleted). A second run therefore sends nothing.

Sending: each pair becomes a new message in the spool (new queue id; content
`X-Relay-Replay: NODE ORIG_ID` + the archived bytes; one plan entry with role
`replay`, which never bounces), so retries and crash safety are the spool's.
The spool is written through its own commit (file and directory fsync'd),
then the `replayed` event is logged. While a relay runs on the spool (it holds
`relay.lock`) it is asked to schedule each new message with a `pickup` control
request; it answers within a second or two. Without a running relay the
command takes the lock while it writes, and the next `relay serve` recovers
and sends them like any queued message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.archive import crypto
from relay.archive.store import ArchiveError, ArchiveStore, Entry, Record
from relay.archive.writer import user_address
from relay.config import Config
from relay.log import DeliveryLog, utc_ts
from relay.records import ControlRequest, Envelope, PlanEntry, Provider
from relay.report.inputs import read_events
from relay.routing import PilotTable, resolve_recipient, route
from relay.spool import Spool, new_queue_id
from relay.spool.control import ask_all
from relay.spool.locks import spool_lock
from relay.spool.workers import worker_root

HEADER = "X-Relay-Replay"
PICKUP_WAIT = 10.0  # seconds the running relay has to answer a batch of pickups
_FAILED = frozenset({"bounced", "expired"})

Pair = tuple[str, str, str]  # (node, queue id, recipient lowercased)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One archived pair the current pilot list routes to the target provider."""

    entry: Entry
    record: Record
    rcpt: str  # as in the original envelope
    plan: PlanEntry  # the replay's only delivery

    @property
    def original(self) -> Pair:
        return (self.record.node, self.entry.queue_id, self.rcpt.lower())

    def content(self) -> bytes:
        header = f"{HEADER}: {self.record.node} {self.entry.queue_id}\r\n".encode()
        return header + self.record.content


@dataclass
class Selection:
    candidates: list[Candidate]
    present: int  # pairs skipped because the provider has them (--only-missing)
    problems: list[str]  # archived messages that could not be read


def default_logs(log: Path) -> list[Path]:
    """The configured delivery log and its rotated files (log.1, log.2.gz, ...)."""
    return [p for p in [log, *log.parent.glob(log.name + ".*")] if p.is_file()]


def present_at(paths: Iterable[Path], provider: str) -> set[Pair]:
    """Pairs the delivery logs show `provider` has (or is being replayed to)."""
    delivered: set[Pair] = set()
    failed: set[Pair] = set()
    replays: dict[tuple[str, str], Pair] = {}  # replay (node, queue id) -> the original pair
    for ev in read_events(paths):
        kind, node, qid = ev.get("event"), ev.get("node"), ev.get("queue_id")
        rcpt = ev.get("rcpt")
        if not (isinstance(node, str) and isinstance(qid, str) and isinstance(rcpt, str)):
            continue
        pair = (node, qid, rcpt.lower())
        if kind == "replayed" and ev.get("provider") == provider:
            onode, oqid = ev.get("original_node"), ev.get("original_queue_id")
            if isinstance(onode, str) and isinstance(oqid, str):
                replays[(node, qid)] = (onode, oqid, rcpt.lower())
        elif kind == "delivery" and ev.get("provider") == provider:
            if ev.get("outcome") == "delivered":
                delivered.add(pair)
            elif ev.get("outcome") in _FAILED:
                failed.add(pair)
        elif kind == "deleted" and ev.get("provider") in (provider, None):
            failed.add(pair)
    present = set(delivered)
    for (node, qid), original in replays.items():
        mine = (node, qid, original[2])
        if mine in delivered or mine not in failed:  # delivered, or still under way
            present.add(original)
    return present


def select(
    cfg: Config,
    store: ArchiveStore,
    identities: Sequence[crypto.Identity],
    provider: Provider,
    since: float | None,
    until: float | None,
    groups: Sequence[str] = (),
    users: Sequence[str] = (),
    logs: Sequence[Path] | None = None,
    only_missing: bool = True,
    now: datetime | None = None,
) -> Selection:
    """The pairs to replay, oldest message first."""
    settings = cfg.relay
    table = PilotTable.build(cfg.pilots, settings)
    when = now or datetime.now(UTC)
    present = present_at(default_logs(settings.log) if logs is None else logs, provider)
    wanted_users = {store.user_hash(u) for u in users}
    out = Selection([], 0, [])
    for entry in store.select(since, until, users):
        try:
            record = crypto.load_record(store, entry, identities)
        except ArchiveError as exc:
            out.problems.append(f"{entry.queue_id}: {exc}")
            continue
        env = record.envelope
        for rcpt in dict.fromkeys(env.rcpts):
            if wanted_users and store.user_hash(user_address(rcpt, settings)) not in wanted_users:
                continue
            resolved = resolve_recipient(rcpt, settings)
            if resolved is None:
                continue
            r = route(resolved[0], table, when, resolved[1] or env.forwarded)
            for d in r.deliveries:
                if d.provider != provider or (groups and d.group not in groups):
                    continue
                orcpt = next((p.orcpt for p in env.plan if p.rcpt == rcpt), None)
                plan = PlanEntry(rcpt, d.provider, d.delivered_to, "replay", d.group, d.mode,
                                 d.pilot, orcpt=orcpt)  # fmt: skip
                candidate = Candidate(entry, record, rcpt, plan)
                if only_missing and candidate.original in present:
                    out.present += 1
                else:
                    out.candidates.append(candidate)
    return out


def replay_envelope(c: Candidate, queue_id: str, now: float, size: int) -> Envelope:
    env = c.record.envelope
    return Envelope(
        queue_id=queue_id, received=utc_ts(datetime.fromtimestamp(now, UTC)),
        received_epoch=now, mail_from=env.mail_from, rcpts=(c.rcpt,), options=env.options,
        client_ip=None, message_id=env.message_id, size=size, forwarded=False,
        plan=(c.plan,), dsn=False, ret=env.ret, envid=env.envid,
        # the header fields the original's copy to that provider had above it
        prepend=tuple((p, text) for p, text in env.prepend if p == c.plan.provider),
    )  # fmt: skip


def target_spool(cfg: Config) -> Spool:
    """The spool replays go into: the relay's, or worker 0's with `workers: N > 1`."""
    root = cfg.relay.spool
    return Spool(worker_root(root, 0) if cfg.relay.workers > 1 else root)


@dataclass
class Outcome:
    queued: list[tuple[Candidate, str]]  # with the new queue id
    picked_up: bool  # False: no relay ran (or it did not answer): sent at its next start


def enqueue(cfg: Config, candidates: Sequence[Candidate], rate: float) -> Outcome:
    """Queue the replays at most `rate` per second; see the module docstring."""
    spool = target_spool(cfg)
    log = DeliveryLog(cfg.relay.log, cfg.relay.node_name)
    try:
        with spool_lock(spool) as lock:
            return asyncio.run(_enqueue(spool, log, candidates, rate, running=lock is None))
    finally:
        log.close()


async def _enqueue(
    spool: Spool, log: DeliveryLog, candidates: Sequence[Candidate], rate: float, running: bool
) -> Outcome:
    out = Outcome([], picked_up=running)
    await spool.start()
    try:
        per_batch = max(1, int(rate))
        for start in range(0, len(candidates), per_batch):
            began = time.monotonic()
            batch = [await _commit(spool, log, c) for c in candidates[start : start + per_batch]]
            out.queued += batch
            if running:
                requests = [ControlRequest("pickup", qid, None) for _, qid in batch]
                answers = await asyncio.to_thread(ask_all, spool, requests, PICKUP_WAIT)
                out.picked_up &= all(a is not None and "count" in a for a in answers)
            if start + per_batch < len(candidates):
                await asyncio.sleep(max(0.0, len(batch) / rate - (time.monotonic() - began)))
    finally:
        await spool.stop()
    return out


async def _commit(spool: Spool, log: DeliveryLog, c: Candidate) -> tuple[Candidate, str]:
    qid = new_queue_id()
    content = c.content()
    incoming = spool.begin(qid)
    await spool.write(incoming, content)
    await spool.commit(incoming, replay_envelope(c, qid, time.time(), len(content)))
    log.emit(
        "replayed", queue_id=qid, original_node=c.record.node, original_queue_id=c.entry.queue_id,
        rcpt=c.rcpt, provider=c.plan.provider, delivered_to=c.plan.delivered_to,
        group=c.plan.group,
    )  # fmt: skip
    return c, qid
