"""Delivery latency at a steady rate: from the relay's 250 to both providers' 250.

`relay serve` with the shipped defaults (`workers: auto`) between two smtp-sinks
(legacy, new); a paced client (SESSIONS connections, one message at a time each)
sends pilot mail at RATE msg/s for SECONDS, noting the wall-clock instant of each
250 and its queue id. A copy is delivered at the `ts` of its `delivery` event in
the relay's log (written once the provider's 250 is read and the outcome is
recorded); a message's latency is the later of its two copies minus its 250.
Without RATE, it first measures the maximum (smtp-source, 20 sessions, until
both sinks have every message) and runs at half of it, as issue 20 asks.
Also printed: the relay's RSS/PSS idle, and per connection (200 idle sessions).

Usage: python bench/latency.py [RATE] [SECONDS=10] [SIZE=10240] [SESSIONS=20]
Loopback only; needs Postfix's smtp-source and smtp-sink (Debian `postfix`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outage import memory_mb, sink, sink_count, wait_listening
from outage import write_config as outage_config

SOURCE = "/usr/sbin/smtp-source"
PORTS = {"relay": 2546, "legacy": 2621, "new": 2622}
PILOT = "pilot@example.com"


def write_config(work: Path) -> Path:
    workers = os.environ.get("WORKERS")
    return outage_config(work, PORTS, (PILOT,), f"workers: {workers}\n" if workers else "")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("relay closed the connection")
        if line[3:4] != b"-":
            return line


async def session(n: int, at: list[float], body: bytes, sent: dict[str, float]) -> None:
    """One connection: a message at each instant of `at` (wall clock)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", PORTS["relay"])
    await _reply(reader)
    writer.write(b"EHLO latency.bench.invalid\r\n")
    await _reply(reader)
    for when in at:
        await asyncio.sleep(max(0.0, when - time.time()))
        writer.write(f"MAIL FROM:<bench{n}@example.org>\r\nRCPT TO:<{PILOT}>\r\nDATA\r\n".encode())
        for _ in range(3):
            await _reply(reader)
        writer.write(body + b".\r\n")
        done = await _reply(reader)
        if done.startswith(b"250"):
            sent[done.split()[-1].decode()] = time.time()
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


async def paced(rate: float, seconds: float, size: int, sessions: int) -> dict[str, float]:
    line = b"X" * 78 + b"\r\n"
    body = b"From: <bench@example.org>\r\nSubject: latency\r\n\r\n" + line * (size // 80)
    start = time.time() + 0.5
    count = int(rate * seconds)
    instants = [start + i / rate for i in range(count)]
    sent: dict[str, float] = {}
    await asyncio.gather(*(session(k, instants[k::sessions], body, sent) for k in range(sessions)))
    return sent


def delivered_at(log: Path, qids: set[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for raw in log.read_text().splitlines():
        e = json.loads(raw)
        delivered = e.get("event") == "delivery" and e.get("outcome") == "delivered"
        if delivered and e["queue_id"] in qids:
            ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
            out.setdefault(e["queue_id"], {})[e["provider"]] = ts
    return out


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))]


def max_rate(size: int, work: Path, n: int = 3000) -> float:
    legacy, new = work / "max-legacy.log", work / "max-new.log"
    sinks = [sink(PORTS["legacy"], legacy), sink(PORTS["new"], new)]
    try:
        t = time.monotonic()
        subprocess.run(
            [SOURCE, "-s", "20", "-m", str(n), "-l", str(size), "-f", "bench@example.org",
             "-t", PILOT, f"127.0.0.1:{PORTS['relay']}"], check=True, timeout=600,
        )  # fmt: skip
        while min(sink_count(legacy), sink_count(new)) < n and time.monotonic() - t < 300:
            time.sleep(0.02)
        return n / (time.monotonic() - t)
    finally:
        for s in sinks:
            s.terminate()
            s.wait()


def idle_connections(count: int) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", PORTS["relay"]))
        s.recv(512)  # the greeting: the session is set up
        s.sendall(b"EHLO idle.bench.invalid\r\n")
        s.recv(4096)
        conns.append(s)
    return conns


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 10240
    sessions = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    work = Path(tempfile.mkdtemp(prefix="relay-latency."))
    cfg = write_config(work)
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
        stderr=(work / "relay.err").open("wb"), cwd=str(work),
    )  # fmt: skip
    try:
        wait_listening(PORTS["relay"], 60)
        time.sleep(2)  # settled: imports done, workers up
        rss, pss = memory_mb(relay.pid)
        print(f"idle: RSS {rss:.1f} MB, PSS {pss:.1f} MB (the process tree)")
        conns = idle_connections(200)
        time.sleep(1)
        rss2, pss2 = memory_mb(relay.pid)
        print(f"200 idle sessions: RSS {rss2:.1f} MB, PSS {pss2:.1f} MB = "
              f"{1024 * (rss2 - rss) / 200:.0f} KB RSS per connection")  # fmt: skip
        for c in conns:
            c.close()
        if rate is None:
            top = max_rate(size, work)
            rate = top / 2
            print(f"maximum: {top:.0f} msg/s end to end; latency measured at {rate:.0f} msg/s")
        legacy, new = work / "legacy.log", work / "new.log"
        sinks = [sink(PORTS["legacy"], legacy), sink(PORTS["new"], new)]
        try:
            sent = asyncio.run(paced(rate, seconds, size, sessions))
            deadline = time.monotonic() + 60
            log = work / "deliveries.jsonl"
            while time.monotonic() < deadline:
                got = delivered_at(log, set(sent))
                if sum(len(v) == 2 for v in got.values()) == len(sent):
                    break
                time.sleep(0.2)
        finally:
            for s in sinks:
                s.terminate()
                s.wait()
        both = [max(v.values()) - sent[q] for q, v in got.items() if len(v) == 2]
        ms = [1000 * x for x in both]
        print(f"{len(sent)} messages at {rate:.0f} msg/s, {sessions} sessions, {size} B: "
              f"250 to both providers' 250: p50 {nearest_rank(ms, 50):.0f} ms, "
              f"p95 {nearest_rank(ms, 95):.0f} ms, max {max(ms):.0f} ms "
              f"({len(both)} of {len(sent)} at both)")  # fmt: skip
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
