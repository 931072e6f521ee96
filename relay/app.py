"""Composition root for `relay serve`: settings → log → recover → ingress + scheduler.

Signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads the pilot list,
SIGUSR1 reopens the delivery log. With `workers: N > 1` the process started by
`relay serve` is a supervisor (relay/supervisor.py) and each worker is a Relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from relay import config
from relay.archive.writer import ArchiveWriter, retention
from relay.auth import Verifier as AuthVerifier
from relay.auth.arc import ArcKeyError
from relay.bounce import Bouncer
from relay.canary.sender import CanarySender
from relay.delivery import Reply
from relay.dsn import Action
from relay.filewatch import watch
from relay.ingress import Ingress, IngressHandler
from relay.log import DeliveryLog, oplog, setup_operational_log
from relay.metrics import Metrics, oldest_age
from relay.queue_admin import serve_control
from relay.resolver import Resolver
from relay.routing import PilotTable
from relay.scheduler import Clock, DeliveryState, Message, Scheduler, drain_budget
from relay.spool import Queued, Spool
from relay.spool.locks import SpoolLocked, lock_within, supervisor_lock
from relay.spool.workers import gather, worker_roots
from relay.startup import PidFile, StartupError, starting
from relay.supervisor import EXIT_WORKER_STARTUP, FORWARDED, Supervisor, worker_config
from relay.verify import RecipientCheck, RecipientList, Verifier
from relay.verify.cache import VerifyCache

_T = TypeVar("_T")


class PilotList:
    """The pilot table in force; an invalid edit is logged and the last good one stays."""

    def __init__(self, cfg: config.Config):
        self.cfg = cfg
        self.table = PilotTable.build(cfg.pilots, cfg.relay)

    def current(self) -> PilotTable:
        return self.table

    def reload(self) -> bool:
        try:
            pilots = config.load_pilots(self.cfg.pilots_path, self.cfg.pilots_shown, self.cfg.relay)
        except config.ConfigError as exc:
            for issue in exc.issues:
                oplog.error("pilot list edit refused; last good list stays", problem=str(issue))
            return False
        self.table = PilotTable.build(pilots, self.cfg.relay)
        oplog.info("pilot list reloaded", entries=len(pilots.pilots))
        return True

    async def watch(self) -> None:
        await watch(self.cfg.pilots_path, self.reload)


def auth_verifier(s: config.RelaySettings, resolver: Resolver) -> AuthVerifier | None:
    """The verifier `auth.verify` asks for; an unusable ARC key stops the start."""
    if not s.auth.verify:
        return None
    try:
        return AuthVerifier(s, resolver)
    except ArcKeyError as exc:
        raise StartupError("auth.arc.key_file", str(exc)) from None


class Relay:
    """One running relay: everything `relay serve` starts, and how it stops."""

    def __init__(
        self,
        cfg: config.Config,
        clock: Clock | None = None,
        reuse_port: bool = False,
        lock_wait: float = 0.0,
    ):
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.lock_wait = lock_wait  # seconds to wait for the spool lock (a worker's old self)
        s = cfg.relay
        with starting(f"delivery log {s.log}"):
            self.log = DeliveryLog.for_settings(s)
        self.spool = Spool(s.spool)
        self.spool.before_batch = self.log.flush_batch
        self.pilots = PilotList(cfg)
        resolver = Resolver(s.dns)  # one cache for MX and authentication lookups
        self.archive = ArchiveWriter(s, self.log.node) if s.archive.enabled else None
        self.scheduler = Scheduler(
            s, self.spool, self.log, clock=clock, on_notice=self._bounce, resolver=resolver,
            archiver=self.archive,
        )  # fmt: skip
        self.auth_verifier = auth_verifier(s, resolver)
        self.bouncer = Bouncer(
            self.spool, self.log, s.listen.hostname,
            lambda p: self.scheduler.provider_settings(p).nexthop, self.scheduler.clock.now,
            enqueue=self.scheduler.add, max_age=s.retry.max_age,
        )  # fmt: skip
        now: Callable[[], datetime] = (
            (lambda: datetime.fromtimestamp(clock.now(), UTC)) if clock else
            (lambda: datetime.now(UTC))
        )  # fmt: skip
        self.recipients = RecipientList(cfg) if cfg.recipients is not None else None
        self.verifier = (
            Verifier(s, VerifyCache(self.spool.verify_cache), self.scheduler)
            if s.verify_recipients else None
        )  # fmt: skip
        check = (
            RecipientCheck(s, self.recipients, self.verifier, self.pilots.current,
                           self.scheduler.clock.now)
            if self.recipients or self.verifier else None
        )  # fmt: skip
        self.handler = IngressHandler(
            s, self.spool, self.log, self.pilots.current, on_queued=self.scheduler.add, clock=now,
            auth_verifier=self.auth_verifier,
            recipients=check,
        )  # fmt: skip
        self.ingress = Ingress(self.handler)
        self.metrics = Metrics()
        self.log.observers.append(self.metrics.observe)
        self.metrics.live(self._snapshot)
        self.metrics.ready = lambda: self.port != 0 and not self.handler.shutting_down
        self.metrics_port = 0
        self._metrics_server: asyncio.Server | None = None
        self.stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.ExitStack()
        self.port = 0
        self.started = False

    def _snapshot(self) -> dict[str, Any]:
        """The live gauges, read from the metrics thread: copies of the queue only."""
        messages = list(self.scheduler.messages.values())
        return {
            "depth": self.scheduler.depth(),
            "connections": self.handler.conns.total,
            "oldest_age": oldest_age(m.received for m in messages),
            "log_dropped": self.log.dropped_total,
        }

    def _gather_workers(self) -> None:
        """One process again after a multi-worker run: take the worker spools' messages."""
        root = self.spool.root
        with supervisor_lock(root) as held:
            if not held:
                raise StartupError(f"spool {root}", "in use by a multi-worker relay")
            sources = [Spool(r) for r in worker_roots(root)]
            try:
                gather(sources, self.spool, self.cfg.relay.shutdown_timeout + 5)
            except SpoolLocked as exc:
                raise StartupError(f"spool {root}", str(exc)) from None

    async def _recover(self, records: Iterator[Queued | str], limit: float) -> tuple[int, bool]:
        """Spool records into the scheduler, RECOVERY_BATCH at a time read in a thread
        (a deep queue is never in memory whole), until `limit` are read; returns
        (how many were queued, whether records remain)."""
        queued = read = 0
        while read < limit:
            batch = await asyncio.to_thread(_take, records, RECOVERY_BATCH)
            if not batch:
                gc.freeze()
                return queued, False
            read += len(batch)
            for qid in (item for item in batch if isinstance(item, str)):
                oplog.error("torn or corrupt spool record moved to corrupt/", queue_id=qid)
            queued += self.scheduler.recover(item for item in batch if not isinstance(item, str))
            # The queue's objects live long: out of the cyclic GC's full passes, which
            # would otherwise walk every queued message (a pause that grows with the
            # queue; docs/performance.md "Outage"). Freed by reference counting as ever.
            gc.freeze()
        return queued, True

    async def _recover_rest(self, records: Iterator[Queued | str], queued: int) -> None:
        """A deep queue's remainder, while mail is accepted (docs/performance.md)."""
        started = time.monotonic()
        more, _ = await self._recover(records, math.inf)
        oplog.info("queue recovered", recovered=queued + more,
                   background_s=round(time.monotonic() - started, 1))  # fmt: skip

    async def _bounce(
        self, msg: Message, items: list[tuple[DeliveryState, Reply]], action: Action
    ) -> None:
        """The scheduler's `on_notice`: a DSN (the bouncer is built after the
        scheduler, since it queues the DSN with the scheduler's add)."""
        await self.bouncer.bounce(msg.queue_id, msg.env, items, action)

    def reload(self) -> None:
        """SIGHUP: the pilot list and the recipients file read again."""
        self.pilots.reload()
        if self.recipients is not None:
            self.recipients.reload()

    async def start(self) -> None:
        """Start everything; a failing step raises StartupError (stop() cleans up after it)."""
        root = self.spool.root
        with starting(f"spool {root}"):
            if self._stack.enter_context(lock_within(self.spool, self.lock_wait)) is None:
                raise StartupError(f"spool {root}", "in use by another relay")
            if self.cfg.relay.workers == 1 and worker_roots(root):
                await asyncio.to_thread(self._gather_workers)
            records = self.spool.recovery()
            recovered, more = await self._recover(records, RECOVER_BEFORE_LISTENING)
        if self.archive:
            with starting(f"archive {self.archive.store.root}"):
                await asyncio.to_thread(self.archive.start)
            self.spool.also_on_disk = (self.archive.store.root,)
        with starting(f"spool {root}"):
            await self.spool.start()
        if self.verifier is not None:
            await asyncio.to_thread(self.verifier.cache.load, self.scheduler.clock.now())
        self.scheduler.start()
        listen = self.cfg.relay.listen
        with starting(f"listen {listen.shown}"):
            self.port = await self.ingress.start(reuse_port=self.reuse_port)
        m = self.cfg.relay.metrics
        with starting(f"metrics {m.host}:{m.port}"):
            self._metrics_server = await self.metrics.serve(m.host, m.port)
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.pilots.watch(), name="pilot-watch"))
        if self.recipients is not None:
            task = watch(self.recipients.path, self.recipients.reload)
            self._tasks.append(asyncio.create_task(task, name="recipients-watch"))
        self._tasks.append(asyncio.create_task(self.log.run(), name="log-retry"))
        self._tasks.append(
            asyncio.create_task(serve_control(self.spool, self.scheduler), name="queue-control")
        )
        if self.archive:
            purge = retention(self.archive.store, self.cfg.relay.archive.retention_days, self.log)
            self._tasks.append(asyncio.create_task(purge, name="archive-retention"))
        if self.cfg.relay.canary.enabled:
            canary = CanarySender(self.cfg.relay.canary, self.port, self.log.node)
            self._tasks.append(asyncio.create_task(canary.run(), name="canary"))
        self.started = True
        if more:
            rest = self._recover_rest(records, recovered)
            self._tasks.append(asyncio.create_task(rest, name="recovery"))
        oplog.info("relay started", port=self.port, node=self.log.node, recovered=recovered,
                   recovering=more)  # fmt: skip

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        timeout = self.cfg.relay.shutdown_timeout
        await asyncio.gather(
            self.ingress.shutdown(drain_budget(timeout)), self.scheduler.drain(timeout)
        )
        if self._metrics_server:
            self._metrics_server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.verifier is not None:
            await self.verifier.close()
        await self.spool.stop()
        if self.auth_verifier:
            self.auth_verifier.close()
        if self.archive:
            self.archive.close()
        self.log.close()
        self._stack.close()
        if self.started:  # after a failed start the one-line StartupError says it all
            oplog.info("relay stopped")


async def serve(cfg: config.Config, worker: int | None = None) -> int:
    if worker is None:
        relay = Relay(cfg)
    else:
        wait = cfg.relay.shutdown_timeout + 5  # the previous worker I may still be draining
        relay = Relay(worker_config(cfg, worker), reuse_port=True, lock_wait=wait)
    try:
        await relay.start()
    except BaseException:
        await relay.stop()
        raise
    pid_file = PidFile(cfg.relay.pid_file) if worker is None else None
    if pid_file:
        pid_file.write()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, relay.reload)
    loop.add_signal_handler(signal.SIGUSR1, relay.log.reopen)
    if worker is not None:  # blocked by the supervisor until now: nothing is lost meanwhile
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    await stop.wait()
    oplog.info("shutting down", timeout=cfg.relay.shutdown_timeout)
    await relay.stop()
    if pid_file:
        pid_file.remove()
    return 0


RECOVERY_BATCH = 1000  # spool records read per thread call at start
# Records recovered before the listener opens (about 1 s here); a deeper queue is
# recovered on while mail is accepted (docs/performance.md "Outage")
RECOVER_BEFORE_LISTENING = 10_000


def _take(items: Iterator[_T], n: int) -> list[_T]:
    return list(itertools.islice(items, n))


EXIT_STARTUP = 1  # `relay: WHAT: WHY` on stderr; a worker's own startup failure too


def run(cfg: config.Config, worker: int | None = None) -> int:
    """`relay serve`: a startup failure is one line on stderr and exit 1, never a traceback."""
    setup_operational_log()
    try:
        if worker is None and cfg.relay.workers > 1:
            return Supervisor(cfg).run()
        return _run_relay(cfg, worker)
    except StartupError as exc:
        sys.stderr.write(f"relay: {exc}\n")
        return EXIT_STARTUP if worker is None else EXIT_WORKER_STARTUP


def _run_relay(cfg: config.Config, worker: int | None) -> int:
    if worker is not None:
        if cfg.relay.workers < 2 or not 0 <= worker < cfg.relay.workers:
            oplog.error("worker index out of range", worker=worker, workers=cfg.relay.workers)
            return 2
        if str(os.getppid()) != os.environ.get("RELAY_SUPERVISOR_PID"):
            oplog.error("--worker is for the supervisor's children only (or it is gone)")
            return 1
    try:
        import uvloop
    except ImportError:  # a platform without uvloop wheels: same behaviour, slower
        oplog.warning("uvloop is not installed; running on the asyncio event loop")
        return asyncio.run(serve(cfg, worker))
    return uvloop.run(serve(cfg, worker))
