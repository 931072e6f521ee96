"""`relay serve` with `workers: N > 1`: a supervisor of N worker processes.

It gathers messages queued outside the N worker spools into `spool/w0/`,
starts N `relay serve --worker I` children (each a normal Relay on `spool/w<I>/`,
sharing the listening port through SO_REUSEPORT, with its share of each
provider's connections and its metrics on `metrics.port + I`), forwards the
signals to them and restarts one that dies unexpectedly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time

from relay import config
from relay.log import oplog
from relay.spool import Spool
from relay.spool.locks import SpoolLocked, lock_within, supervisor_lock
from relay.spool.workers import gather, worker_index, worker_root, worker_roots
from relay.startup import PidFile, StartupError, starting

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
EXIT_WORKER_STARTUP = 3  # a worker tells its supervisor not to restart it


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
            "spool": worker_root(s.spool, index),
            "providers": providers,
            "bounce": share(s.bounce) if s.bounce else None,
            "metrics": metrics,
        }
    )
    return dataclasses.replace(cfg, relay=relay)


def _worker_preexec() -> None:
    """In the forked worker: hold the forwarded signals until its handlers are in place
    (serve() unblocks them), and (Linux) get SIGTERM if the supervisor dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """N worker processes and nothing else."""

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
        target = Spool(worker_root(root, 0))
        stale = [Spool(root)] + [Spool(r) for r in worker_roots(root) if worker_index(r) >= self.n]
        with lock_within(target, wait) as lock:  # w0's old self may still be draining
            if lock is None:
                raise SpoolLocked(f"the spool {target.root} is in use by another relay")
            gather(stale, target, wait)  # the root's lock: no 1-worker relay runs there

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
        with contextlib.ExitStack() as stack:
            with starting(f"spool {root}"):
                held = stack.enter_context(supervisor_lock(root))
            if not held:
                raise StartupError(f"spool {root}", "in use by another relay supervisor")
            try:
                self._gather()
            except SpoolLocked as exc:
                raise StartupError(f"spool {root}", str(exc)) from None
            except OSError as exc:
                raise StartupError(f"spool {root}", exc.strerror or str(exc)) from None
            for sig in FORWARDED:
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
