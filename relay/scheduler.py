"""When to deliver: due deliveries, backoff with jitter, expiry, per-provider caps.

Each provider has its own heap of due messages and its own workers (at most
`max_connections`), so one provider down, slow or rejecting never delays the
other. A delivery's state change is made durable in the spool before it is
logged; a message leaves the spool when every delivery is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from relay import dsn, retry
from relay.authhold import AuthHold
from relay.config import ProviderSettings, RelaySettings
from relay.delivery import Agent, Attempt, Content, Hosts, Reply
from relay.dsn import Action
from relay.log import DeliveryLog, oplog
from relay.records import FINAL, PROVIDERS, Envelope, PlanEntry, Provider, StateLine, Status
from relay.resolver import Resolver
from relay.spool import Queued, Spool, SpoolError

SMALL_MESSAGE = 64 * 1024  # bytes: read on the event loop rather than in a thread
# Due times are wall-clock (they are stored, and survive restarts); the waits between
# them are monotonic slices of at most this long, so after a wall-clock step (NTP,
# VM resume) no due delivery waits more than MAX_WAIT once the clock is right again.
MAX_WAIT = 1.0
# A safety net under the retry policy: more than LOOP_LIMIT attempts of one message
# at one provider within LOOP_WINDOW seconds (in this process) means a bug is
# re-sending it; the message is held for the first retry step and it is logged.
# Legitimate quick attempts (a `452 4.5.3` split, a reused connection found broken)
# stay far below: at most max_recipients / recipients-per-transaction.
LOOP_LIMIT = 20
LOOP_WINDOW = 60.0
RETRY_BATCH = 5000  # `relay queue retry` of every message: state appends per spool batch
# A message none of whose deliveries is due sooner than this is held in short form
# (Message.shorten) until its next attempt reads the envelope back.
SHORTEN_AFTER = 5.0
# The first of a message's two concurrent attempts to end, every delivery of it
# final, leaves its record to the other for at most this long: one removal then
# stands for both (no state file is made for the message at all), else it records
# its own line as before (docs/spool.md "One record for both copies").
SIBLING_WAIT = 0.25
# `provider: archive` has no SMTP host: only its number of concurrent writes is used
ARCHIVE_SLOTS = ProviderSettings(host="(archive)", max_connections=16)


def drain_budget(timeout: float) -> float:
    """How long work in flight may run at shutdown: `shutdown_timeout` less a margin
    (a quarter of it, at most 1 s) for recording state and exiting."""
    return max(0.0, timeout - min(1.0, timeout / 4))


class Clock:
    """Wall-clock seconds; tests substitute `relay.testing.FakeClock` to skip real backoff."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        return time.time()


@dataclass(slots=True)
class DeliveryState:
    """One plan entry's progress, as the state lines replayed so far say.

    `plan` is None while its message is held in short form (`Message.short`)."""

    index: int
    provider: Provider
    plan: PlanEntry | None
    status: Status = "pending"
    attempts: int = 0
    due: float = 0.0
    last: str | None = None  # the last reply, as text
    warned: bool = False  # a delay warning went out (`retry.delay_warning`)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def entry(self) -> PlanEntry:
        """The plan entry (its message is loaded: attempts, deletes and DSNs load it)."""
        assert self.plan is not None, "message held in short form"
        return self.plan

    def apply(self, line: StateLine) -> None:
        """Replay a recorded state change."""
        self.status = line.status
        if line.attempts is not None:
            self.attempts = line.attempts
        self.due = 0.0 if line.due is None else line.due
        if line.reply is not None:
            self.last = sys.intern(line.reply)  # the same few replies, once each
        self.warned |= line.warned

    def line(self) -> StateLine:
        """The state change to record for what this delivery is now."""
        return StateLine(self.index, self.status, self.attempts, self.due, self.last, self.warned)


_NONE: dict[str, Any] = {}  # the shared empty `locks`/`recent` (never changed in place)


@dataclass(slots=True)
class Message:
    """A queued message. Between attempts it is held in short form (`short`): the
    envelope and plan entries dropped, read back from the spool for its next
    attempt, so that a deep queue (a provider down for hours) costs a few hundred
    bytes a message (docs/performance.md "Outage")."""

    queue_id: str
    envelope: Envelope | None
    deliveries: tuple[DeliveryState, ...]  # a tuple: 40 bytes a message less than a list
    received: float  # the envelope's received_epoch, kept in short form too
    locks: dict[str, asyncio.Lock] = field(default_factory=lambda: _NONE)
    # attempts (and deletes) working on it: the last one out removes a finished
    # message, so no state line is appended after its files are gone
    busy: int = 0
    # monotonic start times of this process's recent attempts, per provider (LOOP_*)
    recent: dict[str, list[float]] = field(default_factory=lambda: _NONE)
    gone: bool = False  # its files are removed (by the attempt that finished it)

    @property
    def env(self) -> Envelope:
        assert self.envelope is not None, "message held in short form"
        return self.envelope

    def open(self, provider: Provider) -> list[DeliveryState]:
        return [d for d in self.deliveries if d.provider == provider and not d.final]

    def lock(self, provider: Provider) -> asyncio.Lock:
        if provider not in self.locks:
            self.locks = {**self.locks, provider: asyncio.Lock()}
        return self.locks[provider]

    def load(self, envelope: Envelope) -> None:
        """Back from short form, with the envelope read from the spool."""
        self.envelope = envelope
        for d in self.deliveries:
            d.plan = envelope.plan[d.index]

    def shorten(self, now: float) -> None:
        """Drop what the spool holds (and what no attempt uses now): `busy` is 0."""
        self.envelope = None
        self.drop_final()
        for d in self.deliveries:
            d.plan = None
        self.locks = _NONE
        recent = {p: ts for p, ts in self.recent.items() if ts and now - ts[-1] < LOOP_WINDOW}
        self.recent = recent or _NONE

    def drop_final(self) -> None:
        """Final deliveries leave the queue's memory (in short form): their outcome
        is in the spool and the log, and nothing in the running relay reads one
        again (attempts, retries, deletes and DSNs are about open deliveries; `relay
        queue` reads the spool). A deep queue after an outage of one provider holds
        a delivery a message, not two (bench/queue_memory.py)."""
        if any(d.final for d in self.deliveries):
            self.deliveries = tuple(d for d in self.deliveries if not d.final)

    @property
    def done(self) -> bool:
        return all(d.final for d in self.deliveries)


@dataclass(slots=True)
class _Event:
    """A delivery's outcome as logged: with its own attempt's TLS, remote id and time."""

    delivery: DeliveryState
    reply: Reply
    result: Attempt
    latency_ms: int


@dataclass(slots=True)
class _Held:
    """An attempt's outcome left to the message's other attempt in flight to record."""

    states: list[StateLine]
    events: list[_Event]
    recorded: asyncio.Future[None]


class Sender(Protocol):
    """One transaction (relay/delivery/pool.py `Agent.send`): provider, sender,
    recipients, content, MAIL parameters, HELO name, RCPT parameters; `written`
    is called once the connection may take the next transaction."""

    def __call__(
        self,
        cfg: ProviderSettings,
        mail_from: str,
        rcpts: list[str],
        content: Content,
        options: list[str],
        helo: str,
        rcpt_options: dict[str, list[str]],
        *,
        written: Callable[[], None] | None = None,
    ) -> Awaitable[Attempt]: ...


# a DSN due (relay/bounce.py): the message, the deliveries it is about, its action
Notify = Callable[["Message", list[tuple[DeliveryState, Reply]], Action], Awaitable[None]]
# writes a message's archive copy (relay/archive/writer.py); its reply is the outcome
Archiver = Callable[[Envelope, Callable[[], tuple[BinaryIO, int]]], Awaitable[Reply]]


async def _no_archive(envelope: Envelope, opener: object) -> Reply:
    """A message queued for the archive while it was enabled: final, never bounced."""
    return Reply(554, "5.3.0 archive disabled in the configuration", "data", "5.3.0", by="relay")


class Scheduler:
    def __init__(
        self,
        settings: RelaySettings,
        spool: Spool,
        log: DeliveryLog,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        sender: Sender | None = None,
        on_notice: Notify | None = None,
        resolver: Resolver | None = None,
        archiver: Archiver | None = None,
    ):
        """`on_notice`: called when deliveries' new states call for a DSN (a primary
        bounced or expired, a delay warning, `relayed`: `bounce.notice`); the app
        queues it. None where nothing is sent (`relay queue`). `resolver`: the app's,
        shared with the authentication checks (its cache with it).
        `archiver` writes the `archive` destination (SPEC Part 2 "Safety net")."""
        self.settings = settings
        self.spool = spool
        self.log = log
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        # cached provider connections (the default sender)
        self.agent = Agent(hosts=Hosts(resolver or Resolver(settings.dns)))
        self.sender: Sender = sender or self.agent.send
        self.on_notice = on_notice
        self.archiver: Archiver = archiver or _no_archive
        self.messages: dict[str, Message] = {}
        # per provider: retries, and first attempts (`_take` alternates between them)
        self._retries: dict[str, list[tuple[float, str]]] = {p: [] for p in PROVIDERS}
        self._fresh: dict[str, list[tuple[float, str]]] = {p: [] for p in PROVIDERS}
        self._turn = dict.fromkeys(PROVIDERS, 1)  # 1: the retries' turn first
        self._wake = {p: asyncio.Event() for p in PROVIDERS}
        self._workers: list[asyncio.Task[None]] = []
        self._slots: dict[tuple[str, tuple[str, ...], int], asyncio.Semaphore] = {}
        self._holds: dict[tuple[tuple[str, tuple[str, ...], int], str | None], AuthHold] = {}
        self._hold_of: dict[str, tuple[ProviderSettings, AuthHold]] = {}  # by provider name
        self._in_flight: set[asyncio.Task[None]] = set()
        # (queue id, provider) taken by a worker and not yet finished: at most one
        # attempt per message and provider, whatever stray heap entries exist.
        self._claimed: set[tuple[str, str]] = set()
        # outcomes waiting for the message's other attempt (`_leave_to_sibling`)
        self._held: dict[str, _Held] = {}
        self._stopping = False
        self.clock.listeners.append(self.wake)

    # -- configuration -------------------------------------------------------

    def provider_settings(self, provider: str) -> ProviderSettings:
        if provider == "bounce":
            return self.settings.bounce or self.settings.providers.legacy
        if provider == "archive":
            return ARCHIVE_SLOTS
        return getattr(self.settings.providers, provider)

    # -- queue contents ----------------------------------------------------------

    def add(self, queue_id: str, envelope: Envelope, states: Iterable[StateLine] = ()) -> bool:
        """Queue a committed message (new, or recovered with its state history).

        Returns False for a message whose deliveries are all final already.
        """
        deliveries = tuple(DeliveryState(i, p.provider, p) for i, p in enumerate(envelope.plan))
        return self._queue(Message(queue_id, envelope, deliveries, envelope.received_epoch), states)

    def _queue(self, msg: Message, states: Iterable[StateLine]) -> bool:
        for line in states:  # parse_state_line checked each index against the plan
            msg.deliveries[line.index].apply(line)
        for d in msg.deliveries:
            if d.status == "pending":  # never tried: due since it arrived (FIFO with retries)
                d.due = min(msg.received, self.clock.now())
        if msg.done:
            return False
        self.messages[msg.queue_id] = msg
        for provider in {d.provider for d in msg.deliveries if not d.final}:
            self._push(msg, provider)
        return True

    def recover(self, queued: Iterable[Queued]) -> int:
        """At start: queue what is unfinished, in short form (its first attempt reads
        the envelope), tidy away what a crash left finished; returns how many queued."""
        count = 0
        for q in queued:
            providers = q.outline.providers
            deliveries = tuple(DeliveryState(i, p, None) for i, p in enumerate(providers))
            msg = Message(q.queue_id, None, deliveries, q.outline.received_epoch)
            if self._queue(msg, q.states):
                msg.drop_final()
                count += 1
            else:
                self.spool.remove_now(q.queue_id)
        return count

    def _push(self, msg: Message, provider: Provider) -> None:
        open_ = msg.open(provider)
        if not open_:
            return
        due = min(d.due for d in open_)
        fresh = all(d.attempts == 0 for d in open_)
        heap = self._fresh[provider] if fresh else self._retries[provider]
        heapq.heappush(heap, (due, msg.queue_id))  # ids sort by arrival: FIFO at a tie
        self._wake[provider].set()

    def wake(self) -> None:
        for ev in self._wake.values():
            ev.set()

    def depth(self) -> dict[str, dict[str, int]]:
        """Open deliveries by provider and state; safe from another thread (the
        metrics scrape): it walks a copy of the queue, taken in one step."""
        out: dict[str, dict[str, int]] = {p: {"pending": 0, "deferred": 0} for p in PROVIDERS}
        for m in list(self.messages.values()):
            for d in m.deliveries:
                if not d.final:
                    out[d.provider]["deferred" if d.status == "deferred" else "pending"] += 1
        return out

    # -- running -------------------------------------------------------------------

    def start(self) -> None:
        for provider in PROVIDERS:
            for n in range(self.provider_settings(provider).max_connections):
                self._workers.append(
                    asyncio.create_task(self._worker(provider), name=f"deliver-{provider}-{n}")
                )

    async def drain(self, timeout: float) -> None:
        """Stop taking work; let attempts in flight finish, then cancel the rest.

        The wait ends a little before `timeout` (a quarter of it, at most 1 s) so
        that the whole shutdown, state records and process exit included, fits
        in `shutdown_timeout`. A cancelled attempt stays queued: its deliveries are
        retried after the restart (the provider may already have the message).
        """
        self._stopping = True
        self.wake()
        budget = drain_budget(timeout)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=budget)
        for t in self._workers + list(self._in_flight):
            t.cancel()
        await asyncio.gather(*self._workers, *self._in_flight, return_exceptions=True)
        self._workers.clear()
        await self.agent.close()

    async def _worker(self, provider: Provider) -> None:
        """One connection slot: takes a due message, hands it to an attempt, repeats.

        The slot is free again as soon as the provider has answered, or earlier,
        once the connection is handed to the next transaction (the final "."
        written to a provider with PIPELINING): recording the outcome (a state line
        fsync'd in the next spool batch, then the log) goes on without it, so the
        provider's connections are not held up by the disk.
        """
        loop = asyncio.get_running_loop()
        slot = self._slot(provider)
        while not self._stopping:
            msg = await self._take(provider)
            if msg is None:
                return
            async with slot:
                sent: asyncio.Future[None] = loop.create_future()
                task = loop.create_task(self.attempt(msg, provider, sent))
                self._in_flight.add(task)
                task.add_done_callback(functools.partial(self._attempt_done, msg.queue_id))
                task.add_done_callback(functools.partial(_resolve, sent))  # never started
                # `sent`, not the task: cancelling this worker (drain) leaves the
                # attempt running, so attempts in flight may finish
                await sent

    def _slot(self, provider: Provider) -> asyncio.Semaphore:
        """Connection slots per destination: with `bounce: null` DSNs go to the legacy
        host through the same `max_connections` as legacy's own mail."""
        cfg = self.provider_settings(provider)
        key = cfg.destination
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(cfg.max_connections)
        return self._slots[key]

    def auth_hold(self, provider: str) -> AuthHold:
        """The AUTH hold of the account `provider` logs in with (shared, like slots;
        recipient verification probes respect it too)."""
        cfg = self.provider_settings(provider)
        known = self._hold_of.get(provider)
        if known is not None and known[0] is cfg:  # several lookups an attempt
            return known[1]
        key = (cfg.destination, cfg.username)
        if key not in self._holds:
            self._holds[key] = AuthHold(cfg)
        self._hold_of[provider] = (cfg, self._holds[key])
        return self._holds[key]

    def _attempt_done(self, queue_id: str, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # one message's bug must not go unnoticed
            oplog.error("delivery attempt failed", queue_id=queue_id, error=repr(exc),
                        exc_info=exc)  # fmt: skip

    async def _take(self, provider: Provider) -> Message | None:
        """The next due message for `provider`, claimed; None when stopping.

        First attempts and retries have a heap each, taken in turn while both have
        due work (as Postfix's qmgr alternates its incoming and deferred queues):
        a backlog made due at once (`relay queue retry` after an outage) never
        makes fresh mail wait behind it, nor fresh mail the backlog."""
        heaps, wake = (self._fresh[provider], self._retries[provider]), self._wake[provider]
        while not self._stopping:
            now = self.clock.now()
            hold = self.auth_hold(provider)
            pause = hold.pause(now)
            if pause is None:
                first = self._turn[provider]
                for k in (first, 1 - first):
                    msg = self._due(heaps[k], provider, now)
                    if msg is not None:
                        self._turn[provider] = 1 - k
                        self._claimed.add((msg.queue_id, provider))
                        hold.taken()
                        return msg
            wake.clear()
            tops = [h[0][0] for h in heaps if h]
            delay = pause if pause is not None else (min(tops) - now) if tops else MAX_WAIT
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, min(delay, MAX_WAIT)))
        return None

    def _due(self, heap: list[tuple[float, str]], provider: Provider, now: float) -> Message | None:
        """The message at the top of `heap` if it is due (popped), else None; stale
        entries on the way are dropped, rescheduled ones pushed again."""
        while heap:
            due, qid = heap[0]
            msg = self.messages.get(qid)
            open_ = msg.open(provider) if msg else []
            if msg is None or not open_ or (qid, provider) in self._claimed:
                heapq.heappop(heap)  # stale: finished, deleted, or being attempted
                continue
            if min(d.due for d in open_) > due:  # rescheduled later since it was pushed
                heapq.heappop(heap)
                self._push(msg, provider)
                continue
            if due > now:
                return None
            heapq.heappop(heap)
            return msg
        return None

    # -- one attempt -------------------------------------------------------------------

    async def attempt(
        self, msg: Message, provider: Provider, sent: asyncio.Future[None] | None = None
    ) -> None:
        """One transaction at `provider` for the message's open deliveries there.

        `sent` is resolved once the provider's part is over (before the outcome
        is recorded). Whatever happens (an exception included), the message is
        afterwards either removed (every delivery final) or back in the
        provider's heap.
        """
        key = (msg.queue_id, provider)
        self._claimed.add(key)
        msg.busy += 1
        replies: list[Reply] = []
        try:
            async with msg.lock(provider):
                batch = msg.open(provider)
                if not batch or not await self._loaded(msg, batch):
                    return
                if self._looping(msg, provider):
                    self._hold(msg, batch, "attempt loop: more than LOOP_LIMIT attempts")
                    return
                result = await self._send(msg, provider, batch, sent)
                replies = list(result.replies.values())
                if sent is not None and not sent.done():
                    sent.set_result(None)
                try:
                    await self._record(msg, provider, batch, result)
                except Exception as exc:  # never an immediate resend: back off instead
                    self._hold(msg, batch, f"recording the outcome failed: {exc!r}", exc)
        finally:
            if self.auth_hold(provider).settle(replies, self.clock.now()):
                self.wake()  # the probe is back: the others may go, or wait for the hold
            if sent is not None and not sent.done():
                sent.set_result(None)
            self._claimed.discard(key)
            msg.busy -= 1
            if msg.done:
                await self._finish(msg)
            elif msg.queue_id in self.messages:
                self._push(msg, provider)
                self._maybe_shorten(msg)

    async def _loaded(self, msg: Message, batch: list[DeliveryState]) -> bool:
        """The message back from short form; False (the batch held) when the spool
        cannot give its envelope back."""
        if msg.envelope is not None:
            return True
        try:
            envelope = await asyncio.to_thread(self.spool.load_envelope, msg.queue_id)
        except OSError as exc:
            self._hold(msg, batch, f"envelope unreadable: {exc}")
            return False
        except ValueError as exc:  # checked whole only now (a restart read its outline)
            if self.messages.pop(msg.queue_id, None) is not None:
                await asyncio.to_thread(self.spool.quarantine, msg.queue_id)
                oplog.error("torn or corrupt spool record moved to corrupt/",
                            queue_id=msg.queue_id, error=str(exc))  # fmt: skip
            return False
        if msg.envelope is None:  # another attempt may have loaded it meanwhile
            msg.load(envelope)
        return True

    def _maybe_shorten(self, msg: Message) -> None:
        """Short form for a message nothing works on and none of whose deliveries is
        due within SHORTEN_AFTER seconds (a deferral, not a quick retry)."""
        if msg.busy or msg.envelope is None:
            return
        soon = self.clock.now() + SHORTEN_AFTER
        if all(d.final or d.due > soon for d in msg.deliveries):
            msg.shorten(time.monotonic())

    def _looping(self, msg: Message, provider: Provider) -> bool:
        now = time.monotonic()
        recent = [t for t in msg.recent.get(provider, ()) if now - t < LOOP_WINDOW]
        recent.append(now)
        msg.recent = {**msg.recent, provider: recent}
        return len(recent) > LOOP_LIMIT

    def _hold(
        self, msg: Message, batch: list[DeliveryState], why: str, exc: Exception | None = None
    ) -> None:
        """Defer the batch's open deliveries by at least the first retry step (in memory:
        the spool may be what failed; after a restart they are simply due)."""
        due = self.clock.now() + retry.backoff(self.settings.retry, 1, retry.jitter(self.rng))
        for d in batch:
            if not d.final:
                d.due = max(d.due, due)
        oplog.error("delivery held", queue_id=msg.queue_id, reason=why,
                    retry_in=round(due - self.clock.now(), 1), exc_info=exc)  # fmt: skip

    async def _finish(self, msg: Message) -> None:
        """Remove a message whose deliveries are all final, once nothing records for it.

        It stays in `messages` until its files are gone (the removal waits for the
        spool's writing thread), so an empty queue means an empty spool; `busy`
        keeps a second removal out meanwhile."""
        if msg.done and msg.busy == 0 and msg.queue_id in self.messages:
            if msg.gone:
                self.messages.pop(msg.queue_id, None)
                return
            msg.busy += 1
            try:
                await self.spool.remove(msg.queue_id)
            finally:
                msg.busy -= 1
                self.messages.pop(msg.queue_id, None)

    async def _send(
        self,
        msg: Message,
        provider: Provider,
        batch: list[DeliveryState],
        sent: asyncio.Future[None] | None = None,
    ) -> Attempt:
        """The transaction; `sent` resolved as soon as the connection is free for the
        next one (the final "." written on a pipelining provider), else after it."""
        rcpts = [d.entry.delivered_to for d in batch]
        env = msg.env
        # RFC 3461 parameters, for a provider that offers DSN: a shadow (or replayed)
        # copy is NOTIFY=NEVER (as Postfix sends BCC copies), so it never bounces
        rcpt_options = {
            d.entry.delivered_to: dsn.rcpt_options(
                "NEVER" if d.entry.role != "primary" else d.entry.notify, d.entry.orcpt
            )
            for d in batch
        }
        try:
            if provider == "archive":  # in a thread: encryption and fsync never block the loop
                opener = functools.partial(self.spool.open_content, msg.queue_id)
                return Attempt(dict.fromkeys(rcpts, await self.archiver(env, opener)))
            # Streamed from the spool file in chunks, never whole (SPEC: bounded memory),
            # unless the spool still holds it from its commit; a small message is read
            # on the loop, cheaper than a thread hop.
            held = self.spool.recent_content(msg.queue_id)
            if held is not None:
                content = Content.from_bytes(held[0], prefix=env.prepended(provider), plain=held[1])
            else:
                content = await Content.open(
                    functools.partial(self.spool.open_content, msg.queue_id),
                    inline=env.size <= SMALL_MESSAGE,
                    prefix=env.prepended(provider),
                )
            try:
                return await self.sender(
                    self.provider_settings(provider), env.mail_from, rcpts, content,
                    [*env.options, *dsn.mail_options(env.ret, env.envid)],
                    self.settings.listen.hostname, rcpt_options,
                    written=None if sent is None else functools.partial(_resolve, sent, None),
                )  # fmt: skip
            finally:
                content.close()
        except Exception as exc:  # our fault, not the provider's: retried, never bounced
            oplog.error("delivery attempt failed", queue_id=msg.queue_id, provider=provider,
                        error=repr(exc), exc_info=exc)  # fmt: skip
            reply = Reply(
                None, f"internal error: {type(exc).__name__}: {exc}", "connect", by="relay"
            )
            return Attempt({r: reply for r in rcpts})

    async def _record(
        self, msg: Message, provider: Provider, batch: list[DeliveryState], result: Attempt
    ) -> None:
        """Apply an attempt's replies: durable in the spool first, then logged."""
        now = self.clock.now()
        factor = retry.jitter(self.rng)
        progress = any(r.ok for r in result.replies.values())
        warn_after = self.settings.retry.delay_warning
        warn = warn_after is not None and now - msg.received >= warn_after
        latency = max(0, round((now - msg.received) * 1000))
        states: list[StateLine] = []
        events: list[_Event] = []
        notices: dict[Action, list[tuple[DeliveryState, Reply]]] = {}
        for d in batch:
            reply = result.replies.get(d.entry.delivered_to) or Reply(
                None, "no reply recorded for this recipient", "connect"
            )
            d.attempts += 1
            outcome = retry.classify(reply, progress)
            decision = retry.decide(
                outcome, d.attempts, msg.received, now, self.settings.retry, factor
            )
            d.status = decision.status
            if decision.due is not None:
                d.due = decision.due
            d.last = sys.intern(_reply_text(reply))
            action = dsn.notice(d.entry, d.status, result.dsn, warn and not d.warned)
            if action is not None and not msg.env.dsn:
                d.warned |= action == "delayed"
                notices.setdefault(action, []).append((d, reply))
            states.append(d.line())
            events.append(_Event(d, reply, result, latency))
        # The attempt that leaves every delivery final, alone on the message and
        # with no DSN to queue first: its removal stands for its state lines, which
        # are not written at all (a crash before it: the delivery is made again,
        # as it would be without the lines). With another attempt still recording
        # (the other provider's), the removal waits for it (`_finish`), so that a
        # message whose files are gone has every delivery event logged. (Removing
        # at once, with the other's state line dropped in the same batch, was
        # measured: no gain beyond this machine's noise, 1.38-1.48 vs 1.40-1.43 ms.)
        # The first of two concurrent attempts to end, all final, leaves its outcome
        # to the other (`_leave_to_sibling`): the one that takes it records both.
        held = self._held.pop(msg.queue_id, None)
        if (
            held is None
            and not notices
            and await self._leave_to_sibling(msg, provider, now, states, events)
        ):
            return
        if held is not None:  # the other attempt's outcome first: it came first
            states, events = held.states + states, held.events + events
        try:
            last = msg.done and not notices and msg.busy == (1 if held is None else 2)
            await self._apply(msg, last, states, events)
        finally:
            if held is not None:
                held.recorded.set_result(None)
        for action, items in notices.items():
            if self.on_notice is None:
                break
            try:
                await self.on_notice(msg, items, action)
            except Exception as exc:  # the delivery outcome stands; say so loudly
                oplog.error("bounce failed: no DSN sent", queue_id=msg.queue_id,
                            action=action, error=repr(exc), exc_info=exc)  # fmt: skip

    async def _leave_to_sibling(
        self,
        msg: Message,
        provider: Provider,
        now: float,
        states: list[StateLine],
        events: list[_Event],
    ) -> bool:
        """Leave this attempt's outcome (every delivery final) to the message's other
        attempt, in flight or due now, for at most SIBLING_WAIT: if that one ends the message,
        one removal stands for both and the message never gets a state file (on
        this machine's journal-less ext4 each file made and unlinked costs an inode
        allocation that walks the recently deleted ones). True once it recorded and
        logged this outcome; False: record it here. A kill meanwhile repeats this
        delivery, as one between a provider's reply and its record always did."""
        others = [d for d in msg.deliveries if not d.final and d.provider != provider]
        if not others or not all(e.delivery.final for e in events):
            return False
        # the other copy in flight, or due and waiting for a connection of its
        # provider (all busy: at 100 KiB under load, 2,678 of 3,000 messages got a
        # state file while only an attempt in flight counted; 204 now)
        if not any((msg.queue_id, d.provider) in self._claimed or d.due <= now for d in others):
            return False
        held = _Held(states, events, asyncio.get_running_loop().create_future())
        self._held[msg.queue_id] = held
        try:
            await asyncio.wait_for(asyncio.shield(held.recorded), SIBLING_WAIT)
        except TimeoutError:
            if self._held.get(msg.queue_id) is held:  # not taken: record it here
                del self._held[msg.queue_id]
                return False
            await held.recorded  # taken just now: being recorded
        return True

    async def _apply(
        self, msg: Message, last: bool, states: list[StateLine], events: list[_Event]
    ) -> None:
        """The outcome on disk (the removal, for the last attempt), then in the log."""
        try:
            if last:
                await self.spool.remove(msg.queue_id)
                msg.gone = True
            else:
                await self.spool.record(msg.queue_id, states)
        except SpoolError as exc:
            # The provider's answer is a fact whether or not it is on disk: log it.
            # After a crash the delivery is simply tried again (a duplicate at worst).
            oplog.error("delivery state not recorded", queue_id=msg.queue_id, error=str(exc))
        for e in events:
            d, reply = e.delivery, e.reply
            self.log.emit(
                "delivery", queue_id=msg.queue_id, **d.entry.to_dict(), outcome=d.status,
                smtp_code=reply.code, enhanced_code=reply.enhanced,
                smtp_response=reply.text, attempt=d.attempts, latency_ms=e.latency_ms,
                tls=e.result.tls, remote_id=e.result.remote_id if reply.ok else None,
                **({"by": reply.by} if reply.by else {}),
            )  # fmt: skip
        if last:  # its files are gone already: its events are not left for the pass's end
            self.log.flush_batch()

    # -- administration ------------------------------------------------------------------

    async def retry(self, queue_id: str | None = None) -> int:
        """Make open deliveries (of one message, or all) due now; returns how many.

        Recorded before they are pushed (so no attempt's state line comes first);
        the whole queue (after an outage: hundreds of thousands) in batches of
        RETRY_BATCH appends, so no spool batch holds them all."""
        now, count = self.clock.now(), 0
        if queue_id is None:
            messages = list(self.messages.values())
        else:
            messages = [self.messages[queue_id]] if queue_id in self.messages else []
        due = [(m, [d for d in m.deliveries if not d.final]) for m in messages]
        for start in range(0, len(due), RETRY_BATCH):
            chunk = due[start : start + RETRY_BATCH]
            for _, open_ in chunk:
                for d in open_:
                    d.due = now
            await asyncio.gather(*(
                self.spool.record(m.queue_id, [d.line() for d in open_])
                for m, open_ in chunk if open_
            ))  # fmt: skip
        for m, open_ in due:  # pushed once all is recorded: no attempt in between
            for provider in {d.provider for d in open_}:
                self._push(m, provider)
            count += len(open_)
        return count

    async def delete(self, queue_id: str, provider: Provider | None = None) -> int:
        """Remove open deliveries without a DSN; waits for an attempt in flight."""
        msg = self.messages.get(queue_id)
        if msg is None:
            return 0
        providers = [provider] if provider else sorted({d.provider for d in msg.deliveries})
        count = 0
        msg.busy += 1
        try:
            for p in providers:
                async with msg.lock(p):
                    batch = msg.open(p)
                    if batch and not await self._loaded(msg, batch):
                        continue  # its envelope unreadable: held (and logged), not deleted
                    for d in batch:
                        d.status = "deleted"
                    if batch:
                        await self.spool.record(
                            queue_id, [StateLine(d.index, "deleted", d.attempts) for d in batch]
                        )
                    for d in batch:
                        self.log.emit("deleted", queue_id=queue_id, rcpt=d.entry.rcpt, provider=p)
                    count += len(batch)
        finally:
            msg.busy -= 1
        await self._finish(msg)
        self._maybe_shorten(msg)
        return count


def _resolve(future: asyncio.Future[None], _: object) -> None:
    if not future.done():
        future.set_result(None)


def _reply_text(reply: Reply) -> str:
    return f"{reply.code} {reply.text}" if reply.code is not None else reply.text
