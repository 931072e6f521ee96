"""SIGKILL during archive writes (SPEC Part 2 "Safety net"): nothing lost, no unreadable file.

A real `relay serve` with the archive on takes pilot and non-pilot traffic; it
is killed again and again at the moment an archive file is being written (a
`.tmp` is in the archive), and restarted. At the end every message that got a
250 is at its providers, every accepted pilot message is in the archive exactly
once in the index, every archive file decrypts to a record matching its index
line, and no file is left half written.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pyrage
import pytest

from relay.archive.store import ArchiveStore, parse_record
from relay.testing import Provider
from tests.harness import free_port
from tests.relayproc import Load, RelayProcess, queue_files, seq_of, tally
from tests.relayproc import write_relay_config as relay_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KILLS = 15


def writing(archive: Path) -> bool:
    """An archive file is being written right now."""
    try:
        days = [d.path for d in os.scandir(archive) if d.is_dir()]
        return any(f.name.endswith(".tmp") for d in days for f in os.scandir(d))
    except FileNotFoundError:
        return False


async def kill_while_writing(relay: RelayProcess, archive: Path, wait: float = 3.0) -> bool:
    """SIGKILL as soon as an archive write is under way (or after `wait` s); whether the
    kill caught one (its `.tmp` still there afterwards)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not writing(archive) and loop.time() < deadline:
        await asyncio.sleep(0)
    relay.kill()
    return writing(archive)


async def test_sigkill_during_archive_writes_loses_nothing(tmp_path: Path) -> None:
    key = pyrage.x25519.Identity.generate()
    async with Provider("legacy") as legacy, Provider("new") as new:
        port = free_port()
        settings = {"enabled": True, "encrypt_to": [str(key.to_public())]}
        cfg = relay_config(tmp_path, port, legacy, new, archive=settings)
        spool, archive = tmp_path / "var" / "spool", tmp_path / "var" / "archive"
        relay = RelayProcess(cfg, port, tmp_path / "relay-stderr.log")
        load = Load(port, clients=6, size=256 * 1024)  # large: archive writes take a while
        caught = 0
        try:
            relay.start()
            await relay.wait_ready()
            load.start()
            for _ in range(KILLS):
                caught += await kill_while_writing(relay, archive)
                relay.start()
                await relay.wait_ready()
                await asyncio.sleep(0.2)
            await load.finish()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            providers = {"legacy": legacy, "new": new}
            while tally(load.accepted, providers).lost or any(
                f.endswith(".msg") for f in queue_files(spool)
            ):
                assert loop.time() < deadline, relay.tail()
                await asyncio.sleep(0.05)
            code, _ = await relay.terminate(timeout=10)
        finally:
            relay.stop_quietly()

    assert code == 0, relay.tail()
    assert tally(load.accepted, providers).lost == []
    print(f"\nkills: {KILLS}, {caught} during an archive write; "
          f"{len(load.accepted)} messages accepted")  # fmt: skip
    assert caught >= KILLS // 2, "the kills did not land in archive writes"

    store = ArchiveStore(archive)
    entries = store.entries()
    lines = store.index.read_bytes().splitlines()
    assert len(lines) >= len(entries)  # rewritten after a kill: the index keeps the last line
    files = {p.relative_to(archive).as_posix() for p in archive.glob("*/*")}
    assert files == {e.file for e in entries}, "a file without its index line, or a .tmp left"
    archived_seqs = []
    for e in entries:
        record = parse_record(pyrage.decrypt(store.path(e).read_bytes(), [key]))
        assert hashlib.sha256(record.content).hexdigest() == e.sha256
        assert record.envelope.queue_id == e.queue_id
        archived_seqs.append(seq_of(record.content))
    pilots = {s for s, where in load.accepted.items() if any(p == "new" for p, _ in where)}
    assert pilots <= set(archived_seqs), sorted(pilots - set(archived_seqs))[:10]
    assert len(archived_seqs) == len(set(archived_seqs))  # one archive file per message
