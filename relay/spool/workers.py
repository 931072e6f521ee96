"""Worker spools: with `workers: N > 1` worker I owns `w<I>/` under the spool root.

Changing `workers:` strands nothing: before a relay recovers a spool, the
messages queued where no relay of the new layout will look are moved (renamed)
into one that will (docs/spool.md, "Workers").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from relay.log import oplog
from relay.spool.locks import SpoolLocked, lock_within
from relay.spool.store import Spool, fsync_dir


def worker_root(root: Path, index: int) -> Path:
    return root / f"w{index}"


def worker_roots(root: Path) -> list[Path]:
    """Existing worker spools `w<I>/` under the spool root, by index."""
    try:
        names = [n for n in os.listdir(root) if re.fullmatch(r"w\d+", n)]
    except FileNotFoundError:
        return []
    return [root / n for n in sorted(names, key=lambda n: int(n[1:])) if (root / n).is_dir()]


def worker_index(root: Path) -> int:
    """I of a worker spool `w<I>/`."""
    return int(root.name[1:])


def all_spools(root: Path) -> list[Spool]:
    """The root spool and every worker spool, root first."""
    return [Spool(root)] + [Spool(r) for r in worker_roots(root)]


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
        fsync_dir(dst.queue)
        fsync_dir(src.queue)
        oplog.info("queued messages moved", messages=moved, source=str(src.root),
                   target=str(dst.root))  # fmt: skip
    return moved


def gather(sources: list[Spool], target: Spool, wait: float) -> int:
    """Move the queues of `sources` into `target`, each under its lock (waiting up to `wait`).

    The caller holds the target's lock. Raises SpoolLocked when a source stays locked.
    """
    moved = 0
    for src in sources:
        if not src.queue.exists():
            continue
        with lock_within(src, wait) as lock:
            if lock is None:
                raise SpoolLocked(f"the spool {src.root} is in use by another relay")
            moved += move_queued(src, target)
    return moved
