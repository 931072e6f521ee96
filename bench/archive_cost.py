"""The cost of the archive on the relay's msg/s: archive off and on, side by side.

smtp-source (SESSIONS sessions, N pilot messages of SIZE bytes) -> `relay serve`
-> two smtp-sinks (legacy, new); with the archive on, every message is also
age-encrypted and fsync'd into the archive (SPEC Part 2 "Safety net").
Figures per run: ingress msg/s (until smtp-source is done) and end-to-end msg/s
until the spool is empty, i.e. every message delivered to both providers AND
(archive on) its archive copy durable, which is when it leaves the spool.
Runs alternate off/on; medians are printed. Loopback only; Postfix's
smtp-source and smtp-sink are needed (Debian `postfix`).

Usage: python bench/archive_cost.py [N=3000] [SESSIONS=20] [SIZE=10240] [RUNS=3]
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyrage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outage import cpu_seconds, wait_listening

ROOT = Path(__file__).resolve().parent.parent
SOURCE, SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(work: Path, archive: bool, ports: dict[str, int]) -> Path:
    cfg = work / "config"
    cfg.mkdir(parents=True)
    (cfg / "pilot-users.yaml").write_text(
        "new_domains: {example.com: new.example.net}\n"
        "pilots:\n  - {address: pilot@example.com, group: bench}\n"
    )
    key = pyrage.x25519.Identity.generate().to_public()
    (cfg / "relay.yaml").write_text(
        f"listen: {{host: 127.0.0.1, port: {ports['relay']}, hostname: relay.bench.invalid}}\n"
        "node: bench\ndomains: [example.com]\n"
        f"providers:\n  legacy: {{host: 127.0.0.1, port: {ports['legacy']}}}\n"
        f"  new: {{host: 127.0.0.1, port: {ports['new']}}}\n"
        "spool: ../spool\nlog: ../deliveries.jsonl\n"
        "limits: {min_free_space: 0, max_connections_per_ip: 200}\nmetrics: {port: 0}\n"
        f"archive: {{enabled: {str(archive).lower()}, dir: ../archive, encrypt_to: [{key}]}}\n"
    )
    return cfg / "relay.yaml"


def one_run(archive: bool, n: int, sessions: int, size: int) -> tuple[float, float, float]:
    """(ingress msg/s, end-to-end msg/s until the spool is empty, CPU ms per message of
    the relay's process tree)."""
    work = Path(tempfile.mkdtemp(prefix="relay-archive-bench."))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = {"relay": free_port(), "legacy": free_port(), "new": free_port()}
        for name in ("legacy", "new"):
            procs.append(subprocess.Popen(
                [SINK, "-u", "postfix", f"127.0.0.1:{ports[name]}", "1024"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            wait_listening(ports[name], 15)
        cfg = write_config(work, archive, ports)
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(cfg)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=open(work / "relay.err", "wb"),  # noqa: SIM115
        )  # fmt: skip
        procs.append(relay)
        wait_listening(ports["relay"], 15)
        cpu0 = cpu_seconds(relay.pid)  # start-up (imports, recovery) not counted
        t0 = time.monotonic()
        subprocess.run(
            [SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size), "-f",
             "bench@example.org", "-t", "pilot@example.com", f"127.0.0.1:{ports['relay']}"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        t_in = time.monotonic()
        # every worker spool (`workers: auto`: spool/w<I>/queue), or the one queue
        while any((work / "spool").glob("**/queue/*.msg")):
            if time.monotonic() - t0 > 300:
                raise TimeoutError("the spool did not empty")
            time.sleep(0.02)
        t_end = time.monotonic()
        cpu = cpu_seconds(relay.pid) - cpu0
        if archive:
            indexed = (work / "archive" / "index.jsonl").read_bytes().count(b"\n")
            assert indexed >= n, f"only {indexed} of {n} archived"
        return n / (t_in - t0), n / (t_end - t0), cpu * 1000 / n
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args, defaults = [int(a) for a in sys.argv[1:5]], [3000, 20, 10240, 3]
    n, sessions, size, runs = args + defaults[len(args) :]
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for r in range(runs):
        for archive in (False, True):
            ingress, e2e, cpu = one_run(archive, n, sessions, size)
            results[archive].append((ingress, e2e, cpu))
            print(f"run={r + 1} archive={'on' if archive else 'off'} ingress={ingress:.0f} msg/s "
                  f"e2e(spool empty)={e2e:.0f} msg/s cpu={cpu:.2f} ms/msg", flush=True)  # fmt: skip
    print(f"\nside by side (N={n} sessions={sessions} size={size}, medians of {runs} runs):")
    off = statistics.median(r[1] for r in results[False])
    for archive in (False, True):
        ingress, e2e, cpu = (statistics.median(r[i] for r in results[archive]) for i in range(3))
        change = f"{e2e / off - 1:+.0%}"
        print(f"  archive {'on ' if archive else 'off'}: ingress {ingress:.0f} msg/s, "
              f"end to end {e2e:.0f} msg/s ({change}), relay CPU {cpu:.2f} ms/msg")  # fmt: skip


if __name__ == "__main__":
    main()
