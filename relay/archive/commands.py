"""`relay archive list|export|delete|purge`, and what `relay check` says about the archive.

`list`, `delete` and `purge` need no key: they work on the plain index (users
found by their keyed hash). `export` decrypts with `--identity` and writes each
message as `<queue id>.eml`, the exact bytes the providers were sent.
Removals are logged as `archive_purged` in the delivery log (never the user's
address: the request is about forgetting it).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.archive import crypto
from relay.archive.store import ArchiveError, ArchiveStore, Entry
from relay.archive.writer import DAY, log_purge, purge_expired
from relay.config import RelaySettings
from relay.log import DeliveryLog

RECENT_DAYS = 7  # the window the daily volume is measured over for `relay check`


def open_store(settings: RelaySettings) -> ArchiveStore:
    store = ArchiveStore(settings.archive.dir, settings.recipient_delimiter)
    if not store.root.is_dir():
        raise ArchiveError(f"{store.root}: no archive here (archive.dir)")
    return store


def describe(entry: Entry) -> dict[str, Any]:
    """`relay archive list --json`: the index line, without the recipient hashes."""
    return {
        "queue_id": entry.queue_id, "node": entry.node, "received": entry.received,
        "groups": list(entry.groups), "recipients": len(entry.rcpts), "size": entry.size,
        "sha256": entry.sha256, "file": entry.file, "encrypted": bool(entry.keys),
    }  # fmt: skip


def export(
    store: ArchiveStore, entries: Sequence[Entry], identities: Sequence[crypto.Identity], out: Path
) -> tuple[list[Path], list[str]]:
    """Write each message as `<queue id>.eml` in `out`; (files written, problems)."""
    out.mkdir(parents=True, exist_ok=True)
    written, problems = [], []
    for entry in entries:
        try:
            record = crypto.load_record(store, entry, identities)
        except ArchiveError as exc:
            problems.append(f"{entry.queue_id}: {exc}")
            continue
        path = out / f"{entry.queue_id}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(record.content)
        written.append(path)
    return written, problems


def delete_user(store: ArchiveStore, user: str, log: DeliveryLog) -> list[Entry]:
    """A data-subject request: every archived message with `user` among its recipients
    (the whole message: an encrypted file cannot be edited without the key)."""
    wanted = store.user_hash(user)
    removed = store.remove(lambda e: wanted in e.rcpts)
    if removed:
        log_purge(log, len(removed), sum(e.size for e in removed), None)
    return removed


def purge(store: ArchiveStore, retention_days: int, log: DeliveryLog) -> tuple[int, int]:
    """The retention purge now, as the running relay does it daily."""
    count, size, before = purge_expired(store, retention_days, time.time())
    if count:
        log_purge(log, count, size, before)
    return count, size


def capacity_warning(settings: RelaySettings, now: float | None = None) -> str | None:
    """`relay check`: the archive's disk cannot hold `retention_days` at the daily
    volume of the last RECENT_DAYS days (over `min_free_space`); None when it can,
    or when there is no archive or no volume yet to judge by."""
    archive = settings.archive
    if not archive.enabled or not (archive.dir / "index.jsonl").is_file():
        return None
    entries = ArchiveStore(archive.dir).entries()
    now = time.time() if now is None else now
    recent = [e for e in entries if e.epoch >= now - RECENT_DAYS * DAY]
    if not recent:
        return None
    days = max(1.0, min(RECENT_DAYS, (now - min(e.epoch for e in recent)) / DAY))
    daily = sum(e.size for e in recent) / days
    held = sum(e.size for e in entries)
    needed = daily * archive.retention_days - held
    free = shutil.disk_usage(archive.dir).free - settings.limits.min_free_space
    if needed <= free:
        return None
    return (
        f"archive: {archive.dir} has {_mb(max(0, free))} free over min_free_space, but "
        f"{archive.retention_days} days at the recent {_mb(daily)}/day need {_mb(needed)} more"
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"
