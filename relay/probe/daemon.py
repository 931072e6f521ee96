"""`relay probe -c FILE`: follow the delivery log, look into mailboxes, log placements.

One `ProviderProbe` per probed provider, each with its own heap of due looks,
its own rounds and its own threads (IMAPClient is synchronous), so one
provider's outage or slow server never delays the other's looks. A round takes
every look due, groups them by mailbox and opens one session per mailbox
(at most `max_sessions` at once). Rounds of one provider are at least
`round_every` apart (a quarter of the first delay, at most 30 s), so a day of
mail makes a bounded number of logins, not one per copy.

Canaries are looked for sooner: their looks end at `canary.timeout` (then
missing, also when never delivered: a canary's looks start at its `received`
event); while one is awaited, a look every `canary.poll` seconds, and with IMAP
IDLE in the canary mailbox (relay/probe/watch.py) a look as soon as the server
tells of new mail. Such early looks keep the copy's schedule; rounds for them
are `URGENT_GAP` apart.

Waits are on events: the log follower wakes on file-system changes (watchfiles,
with a one-second safety net), the rounds on the next due time of an injectable
clock (relay.scheduler.Clock; tests advance a FakeClock). SIGTERM lets the
round in flight finish, saves the state and exits 0; SIGHUP re-reads the pilot
list; SIGUSR1 reopens the placement log.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import watchfiles

from relay import config
from relay.app import PilotList
from relay.canary import CANARY_GROUP
from relay.log import DeliveryLog, oplog, setup_operational_log, utc_ts
from relay.probe.config import ProbeProvider
from relay.probe.errors import ProbeError
from relay.probe.follow import LogFollower
from relay.probe.imap import Found, ImapSession
from relay.probe.metrics import ProbeMetrics
from relay.probe.state import Look, ProbeState
from relay.probe.tokens import TokenSource, token_source
from relay.probe.watch import CanaryWatch
from relay.routing import PilotTable
from relay.scheduler import Clock

MAX_WAIT = 1.0  # seconds per wait slice (wall-clock steps, as in relay.scheduler)
SAVE_EVERY = 1.0  # seconds between state writes while events keep coming
MAX_ROUND_EVERY = 30.0
URGENT_GAP = 0.5  # seconds between rounds while a canary is looked for early (IDLE, polls)

T = TypeVar("T")
SessionFactory = Callable[[ProbeProvider, str, "TokenSource | None"], ImapSession]


class Pilots(PilotList):
    """The relay's pilot list in force, also re-read whenever its file's mtime changes.

    The probe has no file watcher of its own: it asks before each batch of
    events and each round, which is when it needs the list.
    """

    def __init__(self, cfg: config.Config):
        super().__init__(cfg)
        self._stamp = self._mtime()

    def _mtime(self) -> float:
        try:
            return self.cfg.pilots_path.stat().st_mtime
        except OSError:
            return 0.0

    def current(self) -> PilotTable:
        stamp = self._mtime()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()
        return self.table


def is_canary(look: Look, found: Found | None) -> bool:
    """A canary by its pair's group, or by its X-Relay-Canary header if the log lacks the group."""
    return look.group == CANARY_GROUP or (found is not None and found.canary is not None)


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _ts(epoch: float) -> str:
    return utc_ts(datetime.fromtimestamp(epoch, UTC))


class ProviderProbe:
    """The looks at one provider."""

    def __init__(self, name: str, settings: ProbeProvider, probe: Probe):
        self.name = name
        self.settings = settings
        self.probe = probe
        self.tokens = token_source(settings.oauth) if settings.auth == "xoauth2" else None
        self.heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(
            settings.max_sessions, thread_name_prefix=f"probe-{name}"
        )
        self.last_round = float("-inf")
        self.in_round = False
        self.rounds = 0
        c = probe.cfg.relay.canary
        mailbox = getattr(c.mailboxes, name, None)
        # the one mailbox the probe may write to (delete verified canaries in)
        self.canary_login = None if mailbox is None else settings.login_for(mailbox)
        self.canaries: set[str] = set()  # keys of the open canary looks
        self.urgent: set[str] = set()  # keys to look at before they are due
        self.poll_every = c.poll
        self.last_poll = float("-inf")
        self.watch = None
        if c.enabled and c.idle and self.canary_login is not None:
            self.watch = CanaryWatch(name, self.canary_login, self._session, c.idle_renew,
                                     self._watch_failed)  # fmt: skip

    def add(self, look: Look) -> None:
        due = look.due(self.probe.state.schedule(look))
        heapq.heappush(self.heap, (due, next(self._seq), look.key))
        if look.canary:
            self.canaries.add(look.key)
        self.wake.set()

    def new_look(self, look: Look) -> None:
        """A copy just read from the log; a canary is looked for at once while IDLE watches
        (it may have landed before its `delivery` event was read)."""
        self.add(look)
        if look.canary and not look.pending and self.watch is not None and self.watch.watching:
            self.look_now([look.key])

    def look_now(self, keys: list[str]) -> None:
        """Look for these copies in the next round, before they are due (not a step of their
        schedule: not found, they keep it)."""
        now = self.probe.clock.now()
        for key in keys:
            self.urgent.add(key)
            heapq.heappush(self.heap, (now, next(self._seq), key))
        if keys:
            self.wake.set()

    def awaited(self) -> list[str]:
        """The open canary looks of delivered copies (what IDLE and polls look for)."""
        looks = self.probe.state.looks
        self.canaries = {k for k in self.canaries if k in looks}
        return [k for k in self.canaries if not looks[k].pending]

    def canary_mail(self) -> None:
        """IDLE saw a message land in the canary mailbox (or a session began)."""
        self.look_now(self.awaited())

    def _watch_failed(self, exc: ProbeError) -> None:
        self.probe.metrics.errors.labels(self.name, exc.reason).inc()
        oplog.warning("canary IDLE failed", provider=self.name, reason=exc.reason,
                      detail=exc.detail)  # fmt: skip

    def _next_poll(self) -> float:
        return self.last_poll + self.poll_every if self.awaited() else float("inf")

    def _next_round(self) -> float:
        gap = URGENT_GAP if self.urgent else self.probe.round_every
        return max(self.oldest_due() or float("inf"), self.last_round + gap)

    def oldest_due(self) -> float | None:
        while self.heap and self.heap[0][2] not in self.probe.state.looks:
            heapq.heappop(self.heap)
        return self.heap[0][0] if self.heap else None

    def idle(self) -> bool:
        """No round running and none due by the clock (tests advance a FakeClock, then wait)."""
        now = self.probe.clock.now()
        return not self.in_round and min(self._next_round(), self._next_poll()) > now

    def _take_due(self, now: float) -> list[Look]:
        state = self.probe.state
        due: dict[str, Look] = {}  # a key pushed twice is looked at once
        while self.heap and self.heap[0][0] <= now:
            _, _, key = heapq.heappop(self.heap)
            look = state.looks.get(key)
            if look is not None and (key in self.urgent or look.due(state.schedule(look)) <= now):
                due[key] = look
            self.urgent.discard(key)
        return list(due.values())

    async def run(self) -> None:
        clock = self.probe.clock
        while not self.probe.stopping:
            now = clock.now()
            if self._next_poll() <= now:  # short polls for the awaited canaries
                self.last_poll = now
                self.look_now(self.awaited())
            start = self._next_round()
            if start <= now:
                due = self._take_due(now)
                if due:
                    self.last_round = now
                    self.in_round = True
                    try:
                        await self.round(due)
                    except Exception as exc:  # a bug in one round must not stop the probe
                        oplog.error("probe round failed", provider=self.name, error=repr(exc),
                                    exc_info=exc)  # fmt: skip
                        for look in due:  # looked at again next round, not lost
                            if look.key in self.probe.state.looks:
                                self.add(look)
                    finally:
                        self.in_round = False
                continue
            self.wake.clear()
            wait = min(start, self._next_poll()) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=min(wait, MAX_WAIT))

    async def round(self, due: list[Look]) -> None:
        """Look for every due copy: one session per mailbox, then log or reschedule each."""
        self.rounds += 1
        self.probe.metrics.rounds.labels(self.name).inc()
        state = self.probe.state
        by_login: dict[str, list[Look]] = {}
        for look in due:
            if not state.may_probe(look.rcpt):  # opted out (`probe: false`) since delivery
                state.finish(look)
                state.skipped += 1
                continue
            if look.pending:  # its deadline, and still not delivered
                self.probe.emit(look, "missing", detail="not delivered")
                state.finish(look)
                continue
            by_login.setdefault(self.settings.login_for(look.delivered_to), []).append(look)
        loop = asyncio.get_running_loop()
        jobs = {
            login: loop.run_in_executor(self.executor, self._look, login, looks)
            for login, looks in by_login.items()
        }
        verified: list[Found] = []
        for login, job in jobs.items():
            try:
                found, error = await job, None
            except ProbeError as exc:
                found, error = {}, exc
                self.probe.metrics.errors.labels(self.name, exc.reason).inc()
                oplog.warning("probe look failed", provider=self.name, reason=exc.reason,
                              detail=exc.detail)  # fmt: skip
            for look in by_login[login]:
                copy = found.get(look.key)
                self._settle(look, copy, error)
                if copy is not None and login == self.canary_login and is_canary(look, copy):
                    verified.append(copy)
        self.probe.changed()
        if verified and self.probe.delete_canaries:
            await self._delete(verified)

    async def _delete(self, copies: list[Found]) -> None:
        """Verified canaries, their placement logged, leave the canary mailbox."""
        assert self.canary_login is not None
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            self.executor, self._session, self.canary_login, lambda s: s.delete(copies)
        )
        try:
            deleted = await job
        except ProbeError as exc:  # they stay; the mailbox is not looked at for them again
            self.probe.metrics.errors.labels(self.name, exc.reason).inc()
            oplog.warning("canary not deleted", provider=self.name, reason=exc.reason,
                          detail=exc.detail, copies=len(copies))  # fmt: skip
            return
        oplog.info("canaries deleted", provider=self.name, deleted=deleted, copies=len(copies))

    def _look(self, login: str, looks: list[Look]) -> dict[str, Found]:
        """In a worker thread: one session in one mailbox."""
        return self._session(login, lambda s: s.find([lk.wanted() for lk in looks]))

    def _session(self, login: str, work: Callable[[ImapSession], T]) -> T:
        """In a worker thread: `work` in one session, its commands counted as they are sent."""
        session = self.probe.session_factory(self.settings, login, self.tokens)
        session.transcript.listener = self._count
        with session:
            return work(session)

    def _count(self, command: str) -> None:
        self.probe.metrics.commands.labels(self.name, command).inc()

    def _settle(self, look: Look, found: Found | None, error: ProbeError | None) -> None:
        looks_at = self.probe.state.schedule(look)
        last = look.step >= len(looks_at) - 1
        if found is not None:
            self.probe.emit(look, found.folder, detail=found.name, found=found)
        elif look.due(looks_at) > self.probe.clock.now():  # an early look: its schedule goes on
            self.add(look)
            return
        elif last:
            if error is not None:
                self.probe.emit(look, "unknown", detail=error.detail)
            else:
                self.probe.emit(look, "missing")
        else:
            look.step += 1
            look.error = None if error is None else error.detail
            self.add(look)
            return
        self.probe.state.finish(look)


class Probe:
    """The running probe: state, follower, one ProviderProbe per provider, metrics."""

    def __init__(
        self,
        cfg: config.Config,
        clock: Clock | None = None,
        session_factory: SessionFactory = ImapSession,
    ):
        self.cfg = cfg
        self.settings = cfg.relay.placement
        self.clock = clock or Clock()
        self.session_factory = session_factory
        self.round_every = min(MAX_ROUND_EVERY, self.settings.delays[0] / 4)
        self.delete_canaries = cfg.relay.canary.delete_after_verify
        self.pilots = Pilots(cfg)
        self.state = ProbeState(self.settings, cfg.relay, self.pilots.current, self.clock.now)
        self.out = DeliveryLog(self.settings.log, cfg.relay.node_name)
        self.metrics = ProbeMetrics()
        self.metrics.live(self.lag, lambda: len(self.state.looks))
        self.metrics.ready = lambda: self.started and not self.stopping
        self.providers = {
            name: ProviderProbe(name, p, self) for name, p in self.settings.providers.items()
        }
        self.clock.listeners.append(self._wake_all)
        self.follower: LogFollower | None = None
        self.stopping = False
        self.started = False
        self.metrics_port = 0
        self._dirty = asyncio.Event()
        self._stop_follow = asyncio.Event()
        self._runs: list[asyncio.Task[None]] = []  # the providers' rounds: drained on stop
        self._aux: list[asyncio.Task[None]] = []  # follower and state writer: cancelled
        self._metrics_server: asyncio.Server | None = None

    # -- life cycle

    async def start(self) -> None:
        if not self.state.load(self.settings.state_path):
            self.state.remember_logged(self.settings.log)
        self.follower = LogFollower(self.cfg.relay.log, self.state.position)
        for look in self.state.looks.values():
            if look.provider in self.providers:
                self.providers[look.provider].add(look)
        self.ingest_available()
        m = self.cfg.relay.metrics
        self._metrics_server = await self.metrics.serve(m.host, self.settings.metrics_port)
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self._aux = [
            asyncio.create_task(self._follow(), name="probe-follow"),
            asyncio.create_task(self._save_loop(), name="probe-state"),
            asyncio.create_task(self.out.run(), name="probe-log"),  # retries after a full disk
        ]
        self._runs = [
            asyncio.create_task(p.run(), name=f"probe-{n}") for n, p in self.providers.items()
        ]
        self._runs += [
            asyncio.create_task(p.watch.run(p.canary_mail), name=f"probe-idle-{n}")
            for n, p in self.providers.items()
            if p.watch is not None
        ]
        self.started = True
        oplog.info("probe started", providers=sorted(self.providers),
                   open_looks=len(self.state.looks), metrics_port=self.metrics_port)  # fmt: skip

    async def stop(self) -> None:
        """Drain: the rounds in flight finish, then the state is saved and the log closed."""
        self.stopping = True
        self._stop_follow.set()
        self._wake_all()
        for p in self.providers.values():
            if p.watch is not None:
                p.watch.stop.set()  # each IDLE session ends within IDLE_SLICE
        if self._runs:
            await asyncio.wait(self._runs)
        for t in self._aux:
            t.cancel()
        await asyncio.gather(*self._runs, *self._aux, return_exceptions=True)
        for p in self.providers.values():
            p.executor.shutdown(wait=True)
            if p.watch is not None:
                p.watch.close()
        self.ingest_available()
        self._save()
        if self.follower is not None:
            self.follower.close()
        self.out.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        oplog.info("probe stopped", open_looks=len(self.state.looks))

    def idle(self) -> bool:
        return all(p.idle() for p in self.providers.values())

    def _wake_all(self) -> None:
        for p in self.providers.values():
            p.wake.set()

    # -- following the delivery log

    def ingest_available(self) -> int:
        """Read what the log has gained and schedule each probed copy delivered; events read."""
        assert self.follower is not None
        n = 0
        for ev in self.follower.read():
            n += 1
            for look in self.state.ingest(ev):
                self.providers[look.provider].new_look(look)
        self.state.position = self.follower.position
        if n:
            self.changed()
        return n

    async def _follow(self) -> None:
        log = self.cfg.relay.log
        log.parent.mkdir(parents=True, exist_ok=True)
        async for _ in watchfiles.awatch(
            log.parent, watch_filter=lambda _, p: Path(p).name.startswith(log.name),
            stop_event=self._stop_follow, debounce=20, step=10, rust_timeout=1000,
            yield_on_timeout=True, recursive=False,
        ):  # fmt: skip
            self.ingest_available()

    # -- results and state

    def emit(
        self, look: Look, folder: str, *, detail: str | None = None, found: Found | None = None
    ) -> None:
        now = self.clock.now()
        fields: dict[str, Any] = {
            "ts": _ts(now), "node": look.node, "queue_id": look.queue_id, "rcpt": look.rcpt,
            "provider": look.provider, "delivered_to": look.delivered_to, "group": look.group,
            "folder": folder, "detail": detail, "match": found.match if found else None,
            "provider_time": found.provider_time if found else None,
            "looked_after_s": round(now - look.delivered, 3),
            "verdict": found.verdict if found else None, "received": look.received,
        }  # fmt: skip
        if look.auth_class:
            fields["auth_class"] = look.auth_class
        canary = is_canary(look, found)
        if canary:
            fields["canary"] = True
        self.out.emit("placement", **fields)
        if not canary:
            self.metrics.placements.labels(look.provider, folder).inc()
            return
        arrived = found.provider_time if found else None
        roundtrip = None if arrived is None else _epoch(arrived) - look.delivered
        self.metrics.canary(look.provider, folder, roundtrip, now)

    def lag(self) -> float:
        now = self.clock.now()
        due = [d for p in self.providers.values() if (d := p.oldest_due()) is not None]
        return max(0.0, now - min(due)) if due else 0.0

    def changed(self) -> None:
        self._dirty.set()

    def _save(self) -> None:
        self.state.prune()
        try:
            self.state.save(self.settings.state_path)
        except OSError as exc:  # kept in memory; the next save tries again
            oplog.error("probe state not saved", path=str(self.settings.state_path),
                        error=exc.strerror or str(exc))  # fmt: skip

    async def _save_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._save()
            await asyncio.sleep(SAVE_EVERY)  # at most one write a second, however busy


def run(cfg: config.Config) -> int:
    """The daemon in the foreground until SIGTERM/SIGINT; exit 0 after draining."""
    setup_operational_log()

    async def main() -> None:
        probe = Probe(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, probe.pilots.reload)
        loop.add_signal_handler(signal.SIGUSR1, probe.out.reopen)
        await probe.start()
        await stop.wait()
        await probe.stop()

    asyncio.run(main())
    return 0
