"""Composition root for `relay serve`: settings → log → recover → ingress + scheduler.

Signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads the pilot list,
SIGUSR1 reopens the delivery log.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import watchfiles

from relay import config
from relay.bounce import Bouncer
from relay.delivery import Reply
from relay.ingress import Ingress, IngressHandler
from relay.log import DeliveryLog, oplog, setup_operational_log
from relay.metrics import Metrics, oldest_age
from relay.queue import serve_control, spool_lock
from relay.routing import PilotTable
from relay.scheduler import Clock, DeliveryState, Message, Scheduler
from relay.spool import Spool


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

    def __init__(self, cfg: config.Config, clock: Clock | None = None):
        self.cfg = cfg
        s = cfg.relay
        self.log = DeliveryLog(s.log, s.node_name)
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

    def _snapshot(self) -> dict[str, Any]:
        messages = self.scheduler.messages.values()
        return {
            "depth": self.scheduler.depth(),
            "connections": self.handler.conns.total,
            "oldest_age": oldest_age(m.received for m in messages),
        }

    async def _bounce(self, msg: Message, failed: list[tuple[DeliveryState, Reply]]) -> None:
        await self.bouncer.bounce(msg.queue_id, msg.envelope, failed)

    async def start(self) -> None:
        if self._stack.enter_context(spool_lock(self.spool)) is None:
            raise RuntimeError(f"another relay is running on the spool {self.spool.root}")
        stored, bad = await asyncio.to_thread(self.spool.recover)
        for qid in bad:
            oplog.error("torn or corrupt spool record moved to corrupt/", queue_id=qid)
        self.scheduler.recover(stored)
        await self.spool.start()
        self.scheduler.start()
        self.port = await self.ingress.start()
        m = self.cfg.relay.metrics
        self._metrics_server = await self.metrics.serve(m.host, m.port)
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.pilots.watch(), name="pilot-watch"))
        self._tasks.append(
            asyncio.create_task(serve_control(self.spool, self.scheduler), name="queue-control")
        )
        oplog.info("relay started", port=self.port, node=self.log.node, recovered=len(stored))

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        timeout = self.cfg.relay.shutdown_timeout
        # Sessions get what drain() gives attempts: the timeout less a margin for the exit.
        sessions = max(0.0, timeout - min(1.0, timeout / 4))
        await asyncio.gather(self.ingress.shutdown(sessions), self.scheduler.drain(timeout))
        if self._metrics_server:
            self._metrics_server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.spool.stop()
        self.log.close()
        self._stack.close()
        oplog.info("relay stopped")


async def serve(cfg: config.Config) -> int:
    relay = Relay(cfg)
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, relay.pilots.reload)
    loop.add_signal_handler(signal.SIGUSR1, relay.log.reopen)
    await stop.wait()
    oplog.info("shutting down", timeout=cfg.relay.shutdown_timeout)
    await relay.stop()
    return 0


def run(cfg: config.Config) -> int:
    setup_operational_log()
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(serve(cfg))
    return asyncio.run(serve(cfg))
