"""No loss across kill -9: a real `relay serve` under load, SIGKILLed at random instants.

Eight client sessions stream numbered messages (pilot, non-pilot, new-only and a
three-recipient mix) into the relay; it is killed ≥ 30 times, each time at a
random instant (sometimes right after it is back up, while it recovers the
spool), and restarted on the same port; between a kill and the restart, about
every other time, a mutated copy of a queued record is planted in the spool
(bit flip, truncation, a bad state line): the relay must start, set it aside in
corrupt/ and never send it. At the end every message that got a
250 must be at every provider it was routed to, and the duplicates must be no
more than the delivery transactions that were in flight at the kills.

In flight at a kill, counted from the providers' side (they run in this
process, so their state is frozen while the kill happens):
  * transactions open at a provider (MAIL given, no reply to the final "." yet)
    that never completed, plus
  * transactions a provider accepted whose delivery the relay had not yet logged
    (the log line is written after the state is fsync'd, so these are exactly
    the deliveries a restarted relay cannot know about).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from relay.testing import Provider
from tests.harness import free_port
from tests.relayproc import (
    Load,
    RelayProcess,
    logged_remote_ids,
    open_transactions,
    queue_files,
    tally,
    write_relay_config,
)

pytestmark = pytest.mark.timeout(180)

KILLS = 30
CLIENTS = 8
MAX_COPIES = 5  # README "Decisions": one more copy per kill that caught it in flight


def plant_mutated(spool: Path, rng: random.Random, n: int) -> str | None:
    """While the relay is down: a copy of a queued message under a new id, mutated so
    that it cannot be used (SPEC Part 2 "Faults": the relay sets it aside in corrupt/,
    starts, and never sends it). Returns the planted id, or None when the queue is empty."""
    queue = spool / "queue"
    ids = sorted(p.stem for p in queue.glob("*.msg"))
    if not ids:
        return None
    src = rng.choice(ids)
    qid = f"PLANTED{n:04d}{src[11:]}"
    msg = (queue / f"{src}.msg").read_bytes()
    state = (queue / f"{src}.state").read_bytes() if (queue / f"{src}.state").exists() else b""
    kind = rng.choice(["bit-flip", "truncated", "state-flip", "state-index", "state-type"])
    if kind == "bit-flip":
        at = rng.randrange(len(msg) - 28)  # anywhere before the footer's checksums
        msg = msg[:at] + bytes([msg[at] ^ (1 << rng.randrange(8))]) + msg[at + 1 :]
    elif kind == "truncated":
        msg = msg[: rng.randrange(len(msg))]
    elif kind == "state-flip":
        line = b'{"i":0,"s":"deferred","n":1,"due":1.0,"r":"451 4.3.0 x","c":1}\n'
        state = line + state  # a whole line whose checksum is wrong
    elif kind == "state-index":
        state = b'{"i":99,"s":"delivered","n":1}\n' + state
    else:
        state = b'{"i":0,"s":"deferred","n":"1","due":"soon"}\n' + state
    (queue / f"{qid}.msg").write_bytes(msg)
    if state:
        (queue / f"{qid}.state").write_bytes(state)
    return qid


async def settle(*providers: Provider, timeout: float = 3) -> None:
    """Let the providers notice the dead relay's connections closing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await asyncio.sleep(0)
    while any(p._protocols for p in providers) and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def test_sigkill_at_random_instants_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("RELAY_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"\nseed {seed} (RELAY_CRASH_SEED to replay the kill instants)")
    async with Provider("legacy") as legacy, Provider("new") as new:
        providers = {"legacy": legacy, "new": new}
        port = free_port()
        cfg = write_relay_config(tmp_path, port, legacy, new)
        spool, log = tmp_path / "var" / "spool", tmp_path / "var" / "deliveries.jsonl"
        relay = RelayProcess(cfg, port, tmp_path / "relay-stderr.log")
        load = Load(port, clients=CLIENTS, size=4096)
        planted: list[str] = []
        kills = aborted_total = unrecorded_total = 0
        counted: set[str] = set()
        try:
            relay.start()
            await relay.wait_ready()
            load.start()
            t0 = time.monotonic()
            while kills < KILLS:
                # a random instant: mostly in full flow, sometimes during recovery
                pause = rng.uniform(0, 0.04) if rng.random() < 0.25 else rng.uniform(0.05, 0.45)
                await asyncio.sleep(pause)
                accepted_before = len(legacy.messages) + len(new.messages)
                open_tx = open_transactions(legacy) + open_transactions(new)
                relay.kill()
                kills += 1
                await settle(legacy, new)
                completed_after = len(legacy.messages) + len(new.messages) - accepted_before
                logged = logged_remote_ids(log)
                unrecorded = {m.queue_id for p in (legacy, new) for m in p.messages}
                unrecorded -= logged | counted
                counted |= unrecorded
                aborted_total += max(0, open_tx - completed_after)
                unrecorded_total += len(unrecorded)
                if rng.random() < 0.5 and (qid := plant_mutated(spool, rng, kills)):
                    planted.append(qid)
                relay.start()
                await relay.wait_ready()  # a mutated record never stops the start
            await load.finish()
            sending = time.monotonic() - t0

            # final run: everything that got a 250 reaches every destination
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (t := tally(load.accepted, providers)).lost or any(
                f.endswith(".msg") for f in queue_files(spool)
            ):
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            drained = time.monotonic() - t0
            code, _ = await relay.terminate(timeout=10)
        finally:
            relay.stop_quietly()

    t = tally(load.accepted, providers)
    in_flight = aborted_total + unrecorded_total
    print(
        f"kills: {kills} (relay started {relay.starts} times)\n"
        f"messages: {load.attempted} attempted, {len(load.accepted)} got a 250, "
        f"{t.extra_seqs} delivered without a 250; client errors {dict(load.errors)}\n"
        f"copies owed: {t.copies}; lost: {len(t.lost)}\n"
        f"duplicates: {t.duplicates} transactions; in flight at the kills: {in_flight} "
        f"({unrecorded_total} accepted by a provider but not yet recorded, "
        f"{aborted_total} cut off before the provider's reply)\n"
        f"end to end under kills: {len(load.accepted) / sending:.0f} messages/s accepted "
        f"over {sending:.1f} s; all delivered {drained:.1f} s after the first message"
    )
    corrupt = {p.name.rsplit(".", 1)[0] for p in (spool / "corrupt").iterdir()}
    print(f"mutated records planted: {len(planted)}; set aside in corrupt/: "
          f"{len(set(planted) & corrupt)}; most copies of one message at one provider: "
          f"{t.max_copies}")  # fmt: skip
    assert kills >= 30
    assert t.lost == [], f"lost {len(t.lost)}: {t.lost[:10]}\n{relay.tail()}"
    assert set(planted) <= corrupt, set(planted) - corrupt  # set aside, never sent
    assert t.duplicates <= in_flight
    assert t.max_copies <= MAX_COPIES
    assert len(load.accepted) > 200, "too little traffic to mean anything"
    assert code == 0, relay.tail()
    assert [f for f in queue_files(spool) if not f.startswith(".")] == []
