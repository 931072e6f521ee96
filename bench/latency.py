"""Delivery latency at a steady rate, the relay beside the Postfix anchor.

Each system runs between two capture sinks (legacy, new: small asyncio SMTP
servers in their own processes that note the instant they write the 250 for
each message, keyed by its Message-ID). A paced client (SESSIONS connections,
one message at a time each) sends pilot mail at RATE msg/s for SECONDS and notes
the instant of each 250 it gets; a message's latency is the later of its two
copies' 250 at the sinks minus the 250 the client got. Measured outside the
system under test, so the relay and Postfix are timed the same way. Without
RATE, each system's maximum is measured first (smtp-source, 20 sessions, until
both smtp-sinks have every message) and it runs at half of its own maximum, as
issue 20 asks. Also printed: RSS/PSS of each process tree idle, and per
connection (IDLE idle sessions: Postfix runs one smtpd process per session,
the relay none).

Usage: python bench/latency.py [RATE|-] [SECONDS=10] [SIZE=10240] [SESSIONS=20]
ANCHORS= overrides ../shared/anchors (Postfix is skipped without it).
Loopback only; needs Postfix's smtp-source and smtp-sink (Debian `postfix`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outage import memory_mb, sink, sink_count, wait_listening
from outage import write_config as outage_config

SOURCE = "/usr/sbin/smtp-source"
PILOT = "pilot@example.com"
IDLE = 100  # under Postfix's default_process_limit: every session gets its smtpd
ANCHORS = Path(os.environ.get("ANCHORS", Path(__file__).resolve().parents[2] / "shared/anchors"))
HOST = "latency.bench.invalid"
MESSAGE_ID = re.compile(rb"\nMessage-ID: <(\d+)@" + re.escape(HOST.encode()) + b">", re.IGNORECASE)


@dataclass
class System:
    """A system under test: where it listens, where it delivers, its process tree."""

    name: str
    port: int
    legacy: int
    new: int
    root_pid: Callable[[], int]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the system under test closed the connection")
        if line[3:4] != b"-":
            return line


def message(seq: int, size: int) -> bytes:
    line = b"X" * 78 + b"\r\n"
    head = f"From: <bench@example.org>\r\nSubject: latency\r\nMessage-ID: <{seq}@{HOST}>\r\n\r\n"
    return head.encode() + line * (size // 80)


async def session(
    port: int, n: int, plan: list[tuple[int, float]], size: int, sent: dict[int, float]
) -> None:
    """One connection: message `seq` at each wall-clock instant of `plan`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO latency.bench.invalid\r\n")
    await _reply(reader)
    for seq, when in plan:
        body = message(seq, size)
        await asyncio.sleep(max(0.0, when - time.time()))
        writer.write(f"MAIL FROM:<bench{n}@example.org>\r\nRCPT TO:<{PILOT}>\r\nDATA\r\n".encode())
        for _ in range(3):
            await _reply(reader)
        writer.write(body + b".\r\n")
        if (await _reply(reader)).startswith(b"250"):
            sent[seq] = time.time()
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


async def paced(
    port: int, rate: float, seconds: float, size: int, sessions: int
) -> dict[int, float]:
    start = time.time() + 0.5
    plan = [(i, start + i / rate) for i in range(int(rate * seconds))]
    sent: dict[int, float] = {}
    await asyncio.gather(
        *(session(port, k, plan[k::sessions], size, sent) for k in range(sessions))
    )
    return sent


async def _capture(port: int, out: Path) -> None:
    """The capture sink: 250 to everything, the instant of each DATA's 250 noted."""
    log = out.open("a", buffering=1)  # a line a message, read while the run goes on

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 sink.bench.invalid\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink.bench.invalid\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    writer.write(b"250 2.0.0 kept\r\n")
                    found = MESSAGE_ID.search(data)
                    if found:
                        log.write(f"{found.group(1).decode()} {time.time():.6f}\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a client gone, or the sink stopping with a cached connection open
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", port, limit=1 << 22)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    log.close()


def capture_sink(port: int, out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "--capture", str(port), str(out)])
    wait_listening(port, 10)
    return proc


def captured(out: Path) -> dict[int, float]:
    """What a capture sink has noted so far (whole lines only: it is still writing)."""
    lines = out.read_text().split("\n")[:-1] if out.exists() else []
    return {int(a): float(b) for a, b in (line.split() for line in lines)}


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))]


def max_rate(system: System, size: int, work: Path, n: int = 3000) -> float:
    legacy, new = work / f"{system.name}-max-legacy.log", work / f"{system.name}-max-new.log"
    sinks = [sink(system.legacy, legacy), sink(system.new, new)]
    try:
        t = time.monotonic()
        subprocess.run(
            [SOURCE, "-s", "20", "-m", str(n), "-l", str(size), "-f", "bench@example.org",
             "-t", PILOT, f"127.0.0.1:{system.port}"], check=True, timeout=600,
        )  # fmt: skip
        while min(sink_count(legacy), sink_count(new)) < n and time.monotonic() - t < 300:
            time.sleep(0.02)
        return n / (time.monotonic() - t)
    finally:
        for s in sinks:
            s.terminate()
            s.wait()


def idle_connections(port: int, count: int) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.recv(512)  # the greeting: the session is set up
        s.sendall(b"EHLO idle.bench.invalid\r\n")
        s.recv(4096)
        conns.append(s)
    return conns


def measure(system: System, rate: float | None, seconds: float, size: int, sessions: int,
            work: Path) -> str:  # fmt: skip
    """Every figure for one system, printed as measured; returns its summary line."""
    wait_listening(system.port, 60)
    time.sleep(2)  # settled: imports done, workers up
    rss, pss = memory_mb(system.root_pid())
    print(f"{system.name} idle: RSS {rss:.1f} MB, PSS {pss:.1f} MB (the process tree)")
    conns = idle_connections(system.port, IDLE)
    time.sleep(1)
    rss2, pss2 = memory_mb(system.root_pid())
    per_rss, per_pss = 1024 * (rss2 - rss) / IDLE, 1024 * (pss2 - pss) / IDLE
    print(f"{system.name} {IDLE} idle sessions: RSS {rss2:.1f} MB, PSS {pss2:.1f} MB = "
          f"{per_rss:.0f} KB RSS, {per_pss:.0f} KB PSS per connection")  # fmt: skip
    for c in conns:
        c.close()
    top = None
    if rate is None:
        top = max_rate(system, size, work)
        rate = top / 2
        print(f"{system.name} maximum: {top:.0f} msg/s end to end; at half: {rate:.0f} msg/s")
    legacy, new = work / f"{system.name}-legacy.cap", work / f"{system.name}-new.cap"
    sinks = [capture_sink(system.legacy, legacy), capture_sink(system.new, new)]
    try:
        sent = asyncio.run(paced(system.port, rate, seconds, size, sessions))
        deadline = time.monotonic() + 60  # a copy later than that shows as missing
        while time.monotonic() < deadline and not all(
            set(sent) <= set(captured(out)) for out in (legacy, new)
        ):
            time.sleep(0.2)
    finally:
        for s in sinks:
            s.terminate()
            s.wait(timeout=30)
    at = [captured(legacy), captured(new)]
    ms = [1000 * (max(a[q] for a in at) - t) for q, t in sent.items() if all(q in a for a in at)]
    figures = (f"p50 {nearest_rank(ms, 50):.0f} ms, p95 {nearest_rank(ms, 95):.0f} ms, "
               f"max {max(ms):.0f} ms ({len(ms)} of {len(sent)} at both)")  # fmt: skip
    print(f"{system.name}: {len(sent)} messages at {rate:.0f} msg/s, {sessions} sessions, "
          f"{size} B: 250 to both providers' 250: {figures}")  # fmt: skip
    maximum = f"max {top:.0f} msg/s, " if top else ""
    return (f"{system.name:8} idle RSS {rss:.1f} / PSS {pss:.1f} MB, {per_rss:.0f} KB RSS / "
            f"{per_pss:.0f} KB PSS a connection; {maximum}at {rate:.0f} msg/s: "
            f"{figures}")  # fmt: skip


def relay(rate: float | None, seconds: float, size: int, sessions: int, work: Path) -> str:
    system = System("relay", 2546, 2621, 2622, lambda: proc.pid)
    workers = os.environ.get("WORKERS")
    ports = {"relay": system.port, "legacy": system.legacy, "new": system.new}
    cfg = outage_config(work, ports, (PILOT,), f"workers: {workers}\n" if workers else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
        stderr=(work / "relay.err").open("wb"), cwd=str(work),
    )  # fmt: skip
    try:
        return measure(system, rate, seconds, size, sessions, work)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def postfix(rate: float | None, seconds: float, size: int, sessions: int, work: Path) -> str:
    """The anchor of ../shared/anchors: its own instance, its sinks' ports (2601, 2602)."""
    base = Path(os.environ.get("PFBASE", "/tmp/pfbench"))  # pf_instance.sh's default

    def anchor(cmd: str) -> None:
        subprocess.run(["bash", str(ANCHORS / "pf_instance.sh"), cmd], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)  # fmt: skip

    pidfile = base / "spool/pid/master.pid"
    system = System("postfix", 2525, 2601, 2602, lambda: int(pidfile.read_text().split()[0]))
    anchor("setup")
    anchor("start")
    try:
        return measure(system, rate, seconds, size, sessions, work)
    finally:
        anchor("stop")


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 10240
    sessions = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    work = Path(tempfile.mkdtemp(prefix="relay-latency."))
    try:
        lines = [relay(rate, seconds, size, sessions, work)]
        if (ANCHORS / "pf_instance.sh").exists():
            lines.append(postfix(rate, seconds, size, sessions, work))
        else:
            print(f"no Postfix anchor at {ANCHORS}: the relay alone")
        print("\nside by side (each at half its own maximum unless RATE was given):")
        print("\n".join(f"  {line}" for line in lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--capture"]:
        asyncio.run(_capture(int(sys.argv[2]), Path(sys.argv[3])))
    else:
        main()
