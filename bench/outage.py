"""A provider outage at scale: a deep queue for `new`, a restart, full-rate mail
during the outage, then the drain once `new` is back, with fresh mail's latency.

1. Q pilot messages are queued for `new` as an hour's outage leaves them
   (legacy delivered, new deferred once), generated straight into the spool
   through relay.spool (the generator alone skips the per-message syncs and
   syncs once at the end: it is the set-up, not what is measured).
2. `relay serve` (the shipped defaults: `workers: auto`) starts on that spool:
   time until it listens, RSS/PSS of its processes.
3. Still during the outage: smtp-source sends M more at full rate: ingress msg/s
   and peak RSS.
4. `new` comes back (an smtp-sink) and `relay queue retry` makes the backlog due:
   the drain rate until new has every message, the relay's CPU per delivery, and
   the latency (250 to new's 250, from the delivery log) of fresh mail sent at
   FRESH_RATE msg/s during the drain, beside the same latency with an empty queue.

Usage: python bench/outage.py [Q=360000] [M=20000] [SIZE=10240]
Loopback only; needs Postfix's smtp-source and smtp-sink (Debian `postfix`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import config  # noqa: E402
from relay.records import Envelope, PlanEntry, StateLine  # noqa: E402
from relay.spool import Spool, new_queue_id  # noqa: E402

SOURCE, SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"
PORTS = {"relay": 2536, "legacy": 2611, "new": 2612}
FRESH_RATE = 20.0  # msg/s of fresh mail during the drain
FRESH_COUNT = 400
PILOT, FRESH = "pilot@example.com", "fresh@example.com"


# -- the queue an outage leaves ---------------------------------------------------


def message(size: int, n: int) -> bytes:
    head = f"From: <bench@example.org>\r\nTo: <{PILOT}>\r\nMessage-ID: <{n}.outage@bench>\r\n"
    line = b"X" * 78 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head.encode() + b"Subject: outage\r\n\r\n" + body


async def generate(roots: list[Path], count: int, size: int) -> None:
    """`count` messages spread over the worker spools, legacy delivered, new deferred."""
    real_sync = os.fdatasync
    os.fdatasync = lambda fd: None  # the set-up only: one sync(2) at the end
    try:
        spools = [Spool(r) for r in roots]
        for s in spools:
            await s.start()
        content = message(size, 0)
        now = time.time()
        chunk = 2000
        for start in range(0, count, chunk):
            await asyncio.gather(
                *(
                    _one(spools[i % len(spools)], content, now, i)
                    for i in range(start, min(count, start + chunk))
                )
            )
        for s in spools:
            await s.stop()
    finally:
        os.fdatasync = real_sync
    os.sync()


async def _one(spool: Spool, content: bytes, now: float, n: int) -> None:
    qid = new_queue_id()
    received = now - 3600 + n * 3600 / 360_000  # an hour of mail at 100 msg/s
    plan = (
        PlanEntry(PILOT, "legacy", PILOT, "primary", "bench", "dual", True),
        PlanEntry(PILOT, "new", "pilot@new.example.net", "shadow", "bench", "dual", True),
    )
    env = Envelope(
        queue_id=qid, received=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(received)),
        received_epoch=received, mail_from="bench@example.org", rcpts=(PILOT,), options=(),
        client_ip="127.0.0.1", message_id=f"<{n}.outage@bench>", size=len(content),
        forwarded=False, plan=plan, dsn=False,
    )  # fmt: skip
    incoming = spool.begin(qid)
    await spool.write(incoming, content)
    await spool.commit(incoming, env)
    await spool.record(qid, [
        StateLine(0, "delivered", 1, None, "250 2.0.0 Ok: queued"),
        StateLine(1, "deferred", 1, now + 3600, "connect: [Errno 111] Connection refused"),
    ])  # fmt: skip


# -- the relay and what it costs ---------------------------------------------------


def write_config(
    work: Path, ports: dict[str, int] = PORTS, pilots: tuple[str, ...] = (PILOT, FRESH),
    extra: str = "",
) -> Path:  # fmt: skip
    """A bench relay.yaml with the shipped defaults (plus `extra` lines), pilots dual."""
    cfg = work / "config"
    cfg.mkdir(parents=True)
    (cfg / "pilot-users.yaml").write_text(
        "new_domains: {example.com: new.example.net}\npilots:\n"
        + "".join(f"  - {{address: {a}, group: {a.split('@')[0]}}}\n" for a in pilots)
    )
    (cfg / "relay.yaml").write_text(
        f"listen: {{host: 127.0.0.1, port: {ports['relay']}, hostname: relay.bench.invalid}}\n"
        "node: bench\ndomains: [example.com]\n"
        f"providers:\n  legacy: {{host: 127.0.0.1, port: {ports['legacy']}}}\n"
        f"  new: {{host: 127.0.0.1, port: {ports['new']}}}\n"
        "spool: ../spool\nlog: ../deliveries.jsonl\nmetrics: {port: 0}\n"
        # every client is 127.0.0.1 here: a real MX's sessions come from many addresses
        "limits: {max_connections_per_ip: 300}\n" + extra
    )
    return cfg / "relay.yaml"


def tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    parent = {int(a): int(b) for a, b in (line.split() for line in out.splitlines())}
    return [p for p in parent if p == pid or _under(p, pid, parent)]


def _under(p: int, root: int, parent: dict[int, int]) -> bool:
    while p > 1:
        p = parent.get(p, 0)
        if p == root:
            return True
    return False


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of the process tree, MB."""
    rss = pss = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


def sink(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [SINK, "-u", "postfix", "-c", f"127.0.0.1:{port}", "1024"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_listening(port, 10)
    return proc


def sink_count(log: Path) -> int:
    tail = log.read_bytes()[-200:].replace(b"\r", b"\n").split(b"mesg=")
    return int(tail[-1].split()[0]) if len(tail) > 1 else 0


def recovered(err: Path) -> int:
    """How many worker processes have recovered their whole queue (operational log)."""
    done = 0
    for line in err.read_text(errors="replace").splitlines():
        if '"queue recovered"' in line or (
            '"relay started"' in line and '"recovering": false' in line
        ):
            done += 1
    return done


def fresh_mail(count: int, rate: float, out: list[str]) -> None:
    """`count` messages to FRESH at `rate` msg/s; their queue ids into `out`."""
    body = message(10240, 0).replace(PILOT.encode(), FRESH.encode())
    with smtplib.SMTP("127.0.0.1", PORTS["relay"], timeout=30) as client:
        client.ehlo("fresh.bench.invalid")
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            client.mail("bench@example.org")
            client.rcpt(FRESH)
            code, reply = client.data(body)
            if code == 250:
                out.append(reply.decode().rsplit(" ", 1)[-1])


def latencies_ms(log: Path, qids: set[str], provider: str) -> list[int]:
    out = []
    for line in log.read_text().splitlines():
        e = json.loads(line)
        mine = e.get("event") == "delivery" and e.get("queue_id") in qids
        if mine and e.get("provider") == provider and e.get("outcome") == "delivered":
            out.append(int(e["latency_ms"]))
    return sorted(out)


def percentiles(values: list[int]) -> str:
    if not values:
        return "none"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values
    p50, p95 = (q[49], q[94]) if len(values) > 1 else (values[0], values[0])
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(values)} ms (n={len(values)})"


def measure_fresh(log: Path) -> str:
    qids: list[str] = []
    fresh_mail(FRESH_COUNT // 4, FRESH_RATE, qids)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(latencies_ms(log, set(qids), "new")) < len(qids):
        time.sleep(0.2)
    return percentiles(latencies_ms(log, set(qids), "new"))


def main() -> None:
    queued = int(sys.argv[1]) if len(sys.argv) > 1 else 360_000
    more = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 10240
    workers = config.auto_workers()
    work = Path(tempfile.mkdtemp(prefix="relay-outage."))
    procs: list[subprocess.Popen[Any]] = []
    try:
        cfg = write_config(work)
        spool = work / "spool"
        roots = [spool / f"w{i}" for i in range(workers)] if workers > 1 else [spool]
        t = time.monotonic()
        asyncio.run(generate(roots, queued, size))
        print(f"generated {queued} queued messages of {size} B in {time.monotonic() - t:.1f} s "
              f"({workers} worker spool(s))")  # fmt: skip
        legacy_log, new_log = work / "legacy.log", work / "new.log"
        procs.append(sink(PORTS["legacy"], legacy_log))

        # 2. restart with the deep queue
        t = time.monotonic()
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
            stderr=(work / "relay.err").open("wb"), cwd=str(work),
        )  # fmt: skip
        procs.append(relay)
        wait_listening(PORTS["relay"], 600)
        up = time.monotonic() - t
        rss, pss = memory_mb(relay.pid)
        print(f"restart: listening after {up:.1f} s with {queued} queued; "
              f"RSS {rss:.0f} MB, PSS {pss:.0f} MB ({len(tree(relay.pid))} processes)")  # fmt: skip
        while recovered(work / "relay.err") < workers and time.monotonic() - t < 1800:
            time.sleep(0.2)
        rss, pss = memory_mb(relay.pid)
        print(f"restart: the whole queue recovered after {time.monotonic() - t:.1f} s "
              f"(the rest in the background); RSS {rss:.0f} MB, PSS {pss:.0f} MB")  # fmt: skip

        # 3. full-rate mail while new is still down
        t = time.monotonic()
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], memory_mb(relay.pid)[0])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        subprocess.run(
            [SOURCE, "-s", "20", "-m", str(more), "-l", str(size), "-f", "bench@example.org",
             "-t", PILOT, f"127.0.0.1:{PORTS['relay']}"], check=True, timeout=600,
        )  # fmt: skip
        rate = more / (time.monotonic() - t)
        deadline = time.monotonic() + 120
        while sink_count(legacy_log) < more and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        sampler.join()
        rss, pss = memory_mb(relay.pid)
        print(f"during the outage: {more} more accepted at {rate:.0f} msg/s (ingress), "
              f"legacy has {sink_count(legacy_log)}; peak RSS {peak[0]:.0f} MB, "
              f"now RSS {rss:.0f} MB, PSS {pss:.0f} MB")  # fmt: skip

        # 4. new is back: drain, with fresh mail
        total = queued + more
        procs.append(sink(PORTS["new"], new_log))
        cpu0, t = cpu_seconds(relay.pid), time.monotonic()
        retried = subprocess.run(
            [sys.executable, "-m", "relay", "queue", "retry", "-c", str(cfg)],
            capture_output=True, text=True, cwd=str(work), timeout=300,
        )  # fmt: skip
        print(f"`relay queue retry` after {time.monotonic() - t:.1f} s: "
              f"{(retried.stdout + retried.stderr).strip()}")  # fmt: skip
        during = measure_fresh(work / "deliveries.jsonl")
        deadline = time.monotonic() + 3600
        while sink_count(new_log) < total and time.monotonic() < deadline:
            time.sleep(0.5)
        drained, secs = sink_count(new_log), time.monotonic() - t
        cpu = cpu_seconds(relay.pid) - cpu0
        print(f"drain: new received {drained} of {total} in {secs:.1f} s = "
              f"{drained / secs:.0f} msg/s; relay CPU {1000 * cpu / max(1, drained):.2f} ms "
              f"per delivery")  # fmt: skip
        print(f"fresh mail to new during the drain ({FRESH_RATE:.0f} msg/s): {during}")
        empty = measure_fresh(work / "deliveries.jsonl")
        print(f"fresh mail to new with the queue empty:      {empty}")
        rss, pss = memory_mb(relay.pid)
        print(f"after the drain: RSS {rss:.0f} MB, PSS {pss:.0f} MB")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
