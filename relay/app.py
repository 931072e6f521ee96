"""Composition root for `relay serve`: settings → log → recover → ingress + scheduler.

Signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads the pilot list,
SIGUSR1 reopens the delivery log.

With `workers: N > 1` the process started by `relay serve` is a supervisor: it
gathers messages queued outside the N worker spools into `spool/w0/`, starts N
`relay serve --worker I` children (each a normal Relay on `spool/w<I>/`,
sharing the listening port through SO_REUSEPORT, with its share of each
provider's connections and its metrics on `metrics.port + I`), forwards the
signals above to them and restarts one that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import watchfiles

from relay import config
from relay import queue as q
from relay.bounce import Bouncer
from relay.delivery import Reply
from relay.ingress import Ingress, IngressHandler
from relay.log import DeliveryLog, oplog, setup_operational_log
from relay.metrics import Metrics, oldest_age
from relay.queue import serve_control
from relay.routing import PilotTable
from relay.scheduler import Clock, DeliveryState, Message, Scheduler, drain_budget
from relay.spool import Spool


class StartupError(Exception):
    """Why `relay serve` cannot start: shown to the operator as `relay: WHAT: WHY`."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


@contextlib.contextmanager
def starting(what: str) -> Iterator[None]:
    """Turn an OS error of one startup step into a StartupError naming the step."""
    try:
        yield
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(what, why) from None


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
        path = self.cfg.pilots_path
        async for changes in watchfiles.awatch(
            path.parent, debounce=200, step=50, rust_timeout=1000
        ):
            if any(Path(p).name == path.name for _, p in changes):
                self.reload()


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
        self.pilots = PilotList(cfg)
        self.scheduler = Scheduler(s, self.spool, self.log, clock=clock)
        self.bouncer = Bouncer(
            self.spool, self.log, s.listen.hostname,
            lambda p: self.scheduler.provider_settings(p).host, self.scheduler.clock.now,
        )  # fmt: skip
        self.bouncer.enqueue = self.scheduler.add
        self.scheduler.on_final_failure = self._bounce
        now: Callable[[], datetime] = (
            (lambda: datetime.fromtimestamp(clock.now(), UTC)) if clock else
            (lambda: datetime.now(UTC))
        )  # fmt: skip
        self.handler = IngressHandler(
            s, self.spool, self.log, self.pilots.current, on_queued=self.scheduler.add, clock=now
        )
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
        messages = self.scheduler.messages.values()
        return {
            "depth": self.scheduler.depth(),
            "connections": self.handler.conns.total,
            "oldest_age": oldest_age(m.received for m in messages),
        }

    def _gather_workers(self) -> None:
        """One process again after a multi-worker run: take the worker spools' messages."""
        root = self.spool.root
        with open(root / "supervisor.lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StartupError(f"spool {root}", "in use by a multi-worker relay") from None
            sources = [Spool(r) for r in q.worker_roots(root)]
            q.gather(sources, self.spool, self.cfg.relay.shutdown_timeout + 5)

    async def _bounce(self, msg: Message, failed: list[tuple[DeliveryState, Reply]]) -> None:
        await self.bouncer.bounce(msg.queue_id, msg.envelope, failed)

    async def start(self) -> None:
        """Start everything; a failing step raises StartupError (stop() cleans up after it)."""
        root = self.spool.root
        with starting(f"spool {root}"):
            if self._stack.enter_context(q.lock_within(self.spool, self.lock_wait)) is None:
                raise StartupError(f"spool {root}", "in use by another relay")
            if self.cfg.relay.workers == 1 and q.worker_roots(root):
                await asyncio.to_thread(self._gather_workers)
            stored, bad = await asyncio.to_thread(self.spool.recover)
        for qid in bad:
            oplog.error("torn or corrupt spool record moved to corrupt/", queue_id=qid)
        self.scheduler.recover(stored)
        with starting(f"spool {root}"):
            await self.spool.start()
        self.scheduler.start()
        listen = self.cfg.relay.listen
        with starting(f"listen {listen.host}:{listen.port}"):
            self.port = await self.ingress.start(reuse_port=self.reuse_port)
        m = self.cfg.relay.metrics
        with starting(f"metrics {m.host}:{m.port}"):
            self._metrics_server = await self.metrics.serve(m.host, m.port)
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.pilots.watch(), name="pilot-watch"))
        self._tasks.append(
            asyncio.create_task(serve_control(self.spool, self.scheduler), name="queue-control")
        )
        self.started = True
        oplog.info("relay started", port=self.port, node=self.log.node, recovered=len(stored))

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
        await self.spool.stop()
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
    loop.add_signal_handler(signal.SIGHUP, relay.pilots.reload)
    loop.add_signal_handler(signal.SIGUSR1, relay.log.reopen)
    if worker is not None:  # blocked by the supervisor until now: nothing is lost meanwhile
        signal.pthread_sigmask(signal.SIG_UNBLOCK, Supervisor.FORWARDED)
    await stop.wait()
    oplog.info("shutting down", timeout=cfg.relay.shutdown_timeout)
    await relay.stop()
    if pid_file:
        pid_file.remove()
    return 0


class PidFile:
    """`pid_file`: written once the listener is up (for logrotate and init scripts)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __bool__(self) -> bool:
        return self.path is not None

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with starting(f"pid_file {self.path}"):
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def worker_config(cfg: config.Config, index: int) -> config.Config:
    """Worker I's settings: its own spool, its share of each provider, its metrics port."""
    s = cfg.relay
    n = s.workers

    def share(p: config.ProviderSettings) -> config.ProviderSettings:
        return p.model_copy(update={"max_connections": max(1, p.max_connections // n)})

    providers = s.providers.model_copy(
        update={"legacy": share(s.providers.legacy), "new": share(s.providers.new)}
    )
    metrics = s.metrics.model_copy(update={"port": s.metrics.port + index if s.metrics.port else 0})
    relay = s.model_copy(
        update={
            "spool": q.worker_root(s.spool, index),
            "providers": providers,
            "bounce": share(s.bounce) if s.bounce else None,
            "metrics": metrics,
        }
    )
    return dataclasses.replace(cfg, relay=relay)


def _worker_preexec() -> None:
    """In the forked worker: hold the forwarded signals until its handlers are in place
    (serve() unblocks them), and (Linux) get SIGTERM if the supervisor dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, Supervisor.FORWARDED)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


EXIT_STARTUP = 1  # `relay: WHAT: WHY` on stderr; a worker's own startup failure too
EXIT_WORKER_STARTUP = 3  # a worker tells its supervisor not to restart it


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


class Supervisor:
    """`relay serve` with `workers: N > 1`: N worker processes and nothing else."""

    FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    MAX_RESTARTS = 5  # a minute; one more and the supervisor gives up

    def __init__(self, cfg: config.Config):
        self.cfg = cfg
        self.n = cfg.relay.workers
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.failed = False
        self.restarts: list[float] = []

    def _gather(self) -> None:
        """Move messages queued outside w0..w(N-1) into w0, so nothing is stranded."""
        root = self.cfg.relay.spool
        wait = self.cfg.relay.shutdown_timeout + 5
        target = Spool(q.worker_root(root, 0))
        stale = [Spool(root)] + [
            Spool(r) for r in q.worker_roots(root) if int(r.name[1:]) >= self.n
        ]
        with q.lock_within(target, wait) as lock:  # w0's old self may still be draining
            if lock is None:
                raise q.QueueError(f"the spool {target.root} is in use by another relay")
            q.gather(stale, target, wait)  # the root's lock: no 1-worker relay runs there

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "relay", "serve", "-c", str(self.cfg.path),
               "--worker", str(index)]  # fmt: skip
        env = {**os.environ, "RELAY_SUPERVISOR_PID": str(os.getpid())}
        self.children[index] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, env=env, preexec_fn=_worker_preexec
        )
        oplog.info("worker started", worker=index, pid=self.children[index].pid)

    def _signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for child in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def run(self) -> int:
        root = self.cfg.relay.spool
        with starting(f"spool {root}"):
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / "supervisor.lock", "a+")  # noqa: SIM115
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StartupError(f"spool {root}", "in use by another relay supervisor") from None
            try:
                self._gather()
            except q.QueueError as exc:
                raise StartupError(f"spool {root}", str(exc)) from None
            except OSError as exc:
                raise StartupError(f"spool {root}", exc.strerror or str(exc)) from None
            for sig in self.FORWARDED:
                signal.signal(sig, self._signal)
            for i in range(self.n):
                self._spawn(i)
            pid_file = PidFile(self.cfg.relay.pid_file)
            pid_file.write()
            oplog.info("supervisor started", workers=self.n, pid=os.getpid())
            try:
                return self._wait()
            finally:
                pid_file.remove()

    def _wait(self) -> int:
        codes: dict[int, int] = {}
        while self.children:
            pid, status = os.waitpid(-1, 0)
            index = next((i for i, c in self.children.items() if c.pid == pid), None)
            if index is None:
                continue
            child = self.children.pop(index)
            child.returncode = code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                codes[index] = code
                continue
            if code == EXIT_WORKER_STARTUP:  # it said why on stderr; a restart would too
                self.failed = True
                self._signal(signal.SIGTERM, None)
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 60]
            if len(self.restarts) >= self.MAX_RESTARTS:
                oplog.error("worker keeps dying; stopping", worker=index, code=code)
                self.failed = True
                self._signal(signal.SIGTERM, None)
                continue
            self.restarts.append(now)
            oplog.error("worker died; restarting", worker=index, code=code)
            self._spawn(index)
        oplog.info("supervisor stopped", codes=codes)
        return 1 if self.failed or any(codes.values()) else 0
