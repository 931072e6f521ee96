"""Who may write a spool: flocks on its `relay.lock` and the root's `supervisor.lock`.

`relay serve` holds `relay.lock` of the spool it runs on, so one relay writes a
spool at a time; without it, `relay queue` takes it and changes the spool
itself. A multi-worker supervisor holds `supervisor.lock` of the spool root for
its lifetime, and a one-process relay takes it while it moves the worker spools'
messages back (workers.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from relay.spool.store import Spool


class SpoolLocked(Exception):
    """Another relay holds the lock of a spool that has to be changed."""


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


@contextlib.contextmanager
def supervisor_lock(root: Path) -> Iterator[bool]:
    """The spool root's supervisor lock, not waited for; yields whether it is held."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "supervisor.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
