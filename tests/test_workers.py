"""`workers: N > 1`: a supervisor and N real `relay serve --worker I` processes.

Each worker owns `spool/w<I>/` and shares the listening port (SO_REUSEPORT);
messages queued outside the worker spools are gathered into `w0/` at start, and
a one-process relay gathers the worker spools back into the root.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from relay.testing import Provider
from tests.conftest import write_config
from tests.harness import free_port
from tests.relayproc import (
    ROOT,
    Load,
    RelayProcess,
    queue_files,
    tally,
    write_relay_config,
)

pytestmark = pytest.mark.timeout(120)


def spool_msgs(spool: Path) -> dict[str, list[str]]:
    """Queued message ids per spool: "" for the root, "w0", "w1", ..."""
    out = {"": [f[:-4] for f in queue_files(spool) if f.endswith(".msg")]}
    for w in sorted(spool.glob("w*")):
        out[w.name] = [f[:-4] for f in queue_files(w) if f.endswith(".msg")]
    return out


def started(relay: RelayProcess) -> int:
    return relay.tail(1_000_000).count('"relay started"')


async def wait_for(cond: Any, timeout: float = 20, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def start(relay: RelayProcess, workers: int) -> None:
    before = started(relay)
    relay.start()
    await relay.wait_ready()
    await wait_for(lambda: started(relay) >= before + workers, what=relay.tail())


def two_free_ports() -> int:
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def received_count(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r"^relay_messages_received_total (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_two_workers_share_the_load_and_drain_on_sigterm(tmp_path: Path) -> None:
    async with Provider("legacy") as legacy, Provider("new") as new:
        port, metrics = free_port(), two_free_ports()
        cfg = write_relay_config(tmp_path, port, legacy, new, workers=2, metrics={"port": metrics})
        spool = tmp_path / "var" / "spool"
        relay = RelayProcess(cfg, port, tmp_path / "relay-stderr.log")
        try:
            await start(relay, 2)
            load = Load(port, clients=12, per_session=3, size=2048, limit=240)
            load.start()
            await asyncio.gather(*load._tasks)
            providers = {"legacy": legacy, "new": new}
            await wait_for(lambda: not tally(load.accepted, providers).lost, what=relay.tail())
            counts = [received_count(metrics), received_count(metrics + 1)]
            # SIGTERM mid-load: exit 0, nothing lost (delivered, or queued for the next run)
            more = Load(port, clients=6, size=2048)
            more.start()
            await asyncio.sleep(0.3)
            code, _ = await relay.terminate(timeout=15)
            await more.finish()
            assert code == 0, relay.tail()
            await start(relay, 2)
            accepted = {**load.accepted, **more.accepted}
            await wait_for(lambda: not tally(accepted, providers).lost, what=relay.tail())
            await wait_for(lambda: not any(spool_msgs(spool).values()))
            code, _ = await relay.terminate(timeout=15)
        finally:
            relay.stop_quietly()
    assert len(load.accepted) == 240, load.errors
    assert (spool / "w0" / "queue").is_dir() and (spool / "w1" / "queue").is_dir()
    assert sum(counts) == 240 and min(counts) > 0, counts  # both workers took connections
    assert code == 0
    assert tally(accepted, providers).lost == []
    # one write per event: every line of the shared log is whole JSON
    lines = (tmp_path / "var" / "deliveries.jsonl").read_bytes().splitlines()
    assert all(json.loads(line)["node"] == "crash" for line in lines)


async def test_queues_move_between_one_and_two_workers(tmp_path: Path) -> None:
    """Root queue → w0 on `workers: 2`; w0 and w1 → root on `workers: 1`; queue CLI sees both."""
    async with Provider("legacy") as legacy, Provider("new") as new:
        port = free_port()
        spool = tmp_path / "var" / "spool"

        def config(workers: int) -> Path:
            return write_relay_config(tmp_path, port, legacy, new, workers=workers)

        relay = RelayProcess(config(1), port, tmp_path / "relay-stderr.log")
        providers = {"legacy": legacy, "new": new}
        try:
            # 1 worker, legacy down: a message waits in the root queue
            await legacy.stop()
            await start(relay, 1)
            first = Load(port, clients=1, per_session=1, limit=3)
            first.start()
            await asyncio.gather(*first._tasks)
            assert await relay.terminate(timeout=15) == (0, pytest.approx(0, abs=15))
            root_ids = spool_msgs(spool)[""]
            assert root_ids and not (spool / "w0").exists()

            # 2 workers, legacy back: the root queue is gathered into w0 and delivered
            config(2)
            await legacy.start()
            await start(relay, 2)
            await wait_for(lambda: not tally(first.accepted, providers).lost, what=relay.tail())
            assert spool_msgs(spool)[""] == []

            # 2 workers, legacy down: messages wait in both worker spools
            await legacy.stop()
            second = Load(port, clients=8, per_session=1, limit=40)
            second.start()
            await asyncio.gather(*second._tasks)
            await wait_for(lambda: all(spool_msgs(spool)[w] for w in ("w0", "w1")))
            before = spool_msgs(spool)
            listed = await asyncio.to_thread(
                relay_cli, "queue", "list", "-c", str(relay.config_path), "--json"
            )
            after = spool_msgs(spool)  # copies only for `new` may have gone meanwhile
            assert listed.returncode == 0, listed.stderr
            ids = {v["queue_id"] for v in json.loads(listed.stdout)}
            for w in ("w0", "w1"):
                stayed = set(before[w]) & set(after[w])
                assert stayed and stayed <= ids, (w, stayed, ids)
            w1_id = sorted(set(before["w1"]) & set(after["w1"]))[0]
            shown = await asyncio.to_thread(
                relay_cli, "queue", "show", "-c", str(relay.config_path), w1_id
            )
            assert shown.returncode == 0 and json.loads(shown.stdout)["queue_id"] == w1_id
            retried = await asyncio.to_thread(
                relay_cli, "queue", "retry", "-c", str(relay.config_path)
            )
            assert retried.returncode == 0, retried.stderr
            deleted = await asyncio.to_thread(
                relay_cli, "queue", "delete", "-c", str(relay.config_path), w1_id
            )
            assert deleted.returncode == 0 and "deleted" in deleted.stdout, deleted.stderr
            await wait_for(lambda: w1_id not in spool_msgs(spool)["w1"])
            code, _ = await relay.terminate(timeout=15)
            assert code == 0, relay.tail()

            # back to 1 process, legacy up: the worker spools are gathered into the root
            config(1)
            await legacy.start()
            await start(relay, 1)
            owed = {s: w for s, w in second.accepted.items()}
            await wait_for(lambda: not any(spool_msgs(spool).values()), what=relay.tail())
            code, _ = await relay.terminate(timeout=15)
        finally:
            relay.stop_quietly()
    assert code == 0
    lost = tally(owed, providers).lost
    # only the deleted message's legacy copies may be missing
    assert {(seq, p) for seq, p, _ in lost} <= {(s, "legacy") for s in owed}
    assert len({seq for seq, _, _ in lost}) <= 1, lost
    assert len(second.accepted) == 40


async def test_sigkill_supervisor_and_workers_loses_nothing(tmp_path: Path) -> None:
    async with Provider("legacy") as legacy, Provider("new") as new:
        providers = {"legacy": legacy, "new": new}
        port = free_port()
        cfg = write_relay_config(tmp_path, port, legacy, new, workers=2)
        spool = tmp_path / "var" / "spool"
        relay = RelayProcess(cfg, port, tmp_path / "relay-stderr.log", group=True)
        load = Load(port, clients=6, size=4096)
        try:
            await start(relay, 2)
            load.start()
            for i in range(5):
                await asyncio.sleep(0.15 + 0.07 * i)
                relay.kill()
                await start(relay, 2)
            await asyncio.sleep(0.2)
            await load.finish()
            await wait_for(
                lambda: (
                    not tally(load.accepted, providers).lost and not any(spool_msgs(spool).values())
                ),
                timeout=60,
                what=relay.tail(),
            )
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(relay.proc.wait, 15)
        finally:
            relay.stop_quietly()
    assert code == 0
    assert tally(load.accepted, providers).lost == []
    assert len(load.accepted) > 50, load.errors


def test_check_validates_workers(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "a", "domains: [example.com, dev.example.com]\nworkers: 0\n")
    out = relay_cli("check", "-c", str(cfg))
    assert out.returncode == 1 and ": workers:" in out.stderr, out.stderr
    cfg = write_config(
        tmp_path / "b", "domains: [example.com, dev.example.com]\nworkers: 2\nlisten: {port: 0}\n"
    )
    out = relay_cli("check", "-c", str(cfg))
    assert out.returncode == 1 and "workers > 1 needs a fixed listen.port" in out.stderr
    cfg = write_config(tmp_path / "c", "domains: [example.com, dev.example.com]\nworkers: 2\n")
    out = relay_cli("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
