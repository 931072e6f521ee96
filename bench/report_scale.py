"""Scale check for `relay report`: N (message, recipient) pairs, 2 nodes, retries.

    python bench/report_scale.py                 # N = 1,000,000, logs under /tmp
    python bench/report_scale.py -n 100000 --dir /var/tmp --gzip-rotated --keep
    python bench/report_scale.py --format html --pseudonymize

Writes one delivery log per node (optionally split into a gzip'd rotated file
plus the current one), each starting with the `config` header that labels the
providers; a tenth of the pilots are cut-over users (new only), and refusals
carry varying reply texts, so the report's pilot comparison, its divergences
grouped by reply and its verdicts are all exercised. Then runs `relay report`
in a child process and prints wall time, the child's peak RSS
(resource.getrusage(RUSAGE_CHILDREN).ru_maxrss) and, for JSON, the size of the
new sections. Targets: under 30 s and peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
GROUPS = ["sales", "support", "marketing", "dev"]
PILOTS = [(f"pilot{i}@example.com", GROUPS[i % len(GROUPS)], i % 10 == 0) for i in range(40)]
LABELS = {"legacy": "Zoho Mail", "new": "Microsoft 365"}
REPLIES = {
    "delivered": (250, "2.0.0", "250 2.0.0 OK 1732531200 d9443c01a7336-2345abcd6789si.123 - gsmtp"),
    "deferred": (451, "4.7.0", "451 4.7.0 Temporary server error. Please try again later. abc"),
    "bounced": (550, "5.7.1", "550 5.7.1 Message rejected as spam by Content Filtering."),
    "expired": (421, "4.4.2", "421 4.4.2 Connection timed out after several attempts"),
}
BOUNCES = [  # varied refusals, ids in them, as providers send them
    (550, "5.7.1", "550 5.7.1 Service unavailable, Client host [203.0.113.{n}] blocked using "
     "Spamhaus. (AS16012611)"),
    (550, "5.4.1", "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) "
     "[DB5EUR03FT0{n}.eop-EUR03.prod.protection.outlook.com]"),
    (550, "5.7.26", "550 5.7.26 This mail is unauthenticated [AM{n}PR04.prod.outlook.com]"),
    REPLIES["bounced"],
]  # fmt: skip


def stamp(seconds: float) -> str:
    t = T0 + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class NodeLog:
    """Events of one node, written in time order (future retries wait in a heap)."""

    def __init__(self, node: str, out: IO[str]) -> None:
        self.node = node
        self.out = out
        self.heap: list[tuple[float, int, str]] = []
        self.seq = 0
        self.bytes = 0

    def write(self, line: str) -> None:
        self.out.write(line)
        self.bytes += len(line)

    def later(self, at: float, line: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, line))

    def flush_until(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            self.write(heapq.heappop(self.heap)[2])

    def flush_all(self) -> None:
        self.flush_until(float("inf"))


def event(**ev: object) -> str:
    return json.dumps(ev, separators=(",", ":")) + "\n"


def generate(n_pairs: int, folder: Path, seed: int = 1) -> list[Path]:
    rng = random.Random(seed)
    paths = [folder / f"node{i}" / "deliveries.jsonl" for i in (1, 2)]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    files = [p.open("w", encoding="utf-8") for p in paths]
    nodes = [NodeLog(f"mx{i + 1}", f) for i, f in enumerate(files)]
    for node in nodes:
        node.write(
            event(event="config", ts=stamp(0), node=node.node, reason="start", version="bench",
                  providers={p: {"label": label} for p, label in LABELS.items()},
                  log_privacy="plain")
        )  # fmt: skip
    pairs = 0
    m = 0
    now = 0.0
    while pairs < n_pairs:
        m += 1
        now += 0.05
        node = nodes[m % 2]
        node.flush_until(now)
        qid = f"{m:010X}"
        rcpts: list[tuple[str, str | None, bool, bool]] = []
        while len(rcpts) < min(rng.choice((1, 1, 2, 3)), n_pairs - pairs):
            if rng.random() < 0.1:
                addr, group, cut = rng.choice(PILOTS)
                rcpt = (addr, group, True, cut)
            else:
                rcpt = (f"user{rng.randrange(1000)}@example.com", None, False, False)
            if all(r[0] != rcpt[0] for r in rcpts):  # distinct recipients per message
                rcpts.append(rcpt)
        pairs += len(rcpts)
        plan = []
        for addr, group, pilot, cut in rcpts:
            mode = ("new-only" if cut else "dual") if pilot else None
            if not cut:
                plan.append(
                    {"rcpt": addr, "provider": "legacy", "delivered_to": addr, "role": "primary",
                     "group": group, "mode": mode, "pilot": pilot}
                )  # fmt: skip
            if pilot:
                plan.append(
                    {"rcpt": addr, "provider": "new",
                     "delivered_to": addr.replace("example.com", "example-new.com"),
                     "role": "primary" if cut else "shadow", "group": group, "mode": mode,
                     "pilot": True}
                )  # fmt: skip
        node.write(
            event(
                event="received", ts=stamp(now), node=node.node, queue_id=qid,
                message_id=f"<{qid}.{m}@mail.outside.example.org>",
                mail_from=f"sender{m % 5000}@outside.example.org", client_ip="203.0.113.25",
                size=rng.randrange(2_000, 200_000), rcpts=[r[0] for r in rcpts], plan=plan,
                forwarded=False,
            )
        )  # fmt: skip
        for e in plan:
            t = now
            attempt = 1
            fate = rng.random()
            retries = 0 if fate < 0.85 else rng.randint(1, 3)
            for _ in range(retries):
                t += rng.uniform(0.2, 3.0) if attempt == 1 else 60 * attempt
                code, enh, resp = REPLIES["deferred"]
                node.later(
                    t,
                    event(
                        event="delivery", ts=stamp(t), node=node.node, queue_id=qid,
                        attempt=attempt, outcome="deferred", smtp_code=code, enhanced_code=enh,
                        smtp_response=resp, latency_ms=round((t - now) * 1000),
                        tls="TLSv1.3", remote_id=None, **e,
                    ),
                )  # fmt: skip
                attempt += 1
            outcome = rng.choices(("delivered", "bounced", "expired"), (96, 3, 1))[0]
            t += rng.uniform(0.2, 3.0)
            code, enh, resp = REPLIES[outcome]
            if outcome == "bounced":
                code, enh, resp = rng.choice(BOUNCES)
                resp = resp.format(n=rng.randrange(10, 99))
            final = dict(
                event="delivery", ts=stamp(t), node=node.node, queue_id=qid, attempt=attempt,
                outcome=outcome, smtp_code=code, enhanced_code=enh, smtp_response=resp,
                latency_ms=round((t - now) * 1000), tls="TLSv1.3",
                remote_id=qid if outcome == "delivered" else None, **e,
            )  # fmt: skip
            node.later(t, event(**final))
            if outcome != "delivered" and e["role"] == "primary":
                node.later(
                    t + 0.01,
                    event(event="bounce_sent", ts=stamp(t + 0.01), node=node.node,
                          queue_id=qid, rcpt=e["rcpt"], dsn_queue_id=f"{qid}D"),
                )  # fmt: skip
            if outcome == "delivered" and rng.random() < 0.0005:  # crash duplicate
                node.later(t + 5, event(**{**final, "ts": stamp(t + 5)}))
    for node in nodes:
        node.flush_all()
    for f in files:
        f.close()
    return paths


def rotate(path: Path) -> list[Path]:
    """Split a log in two: the older half to PATH.1.gz, the rest stays in PATH."""
    half = path.stat().st_size // 2
    old = path.with_name(path.name + ".1.gz")
    tmp = path.with_name(path.name + ".tmp")
    with path.open("rb") as src, gzip.open(old, "wb", compresslevel=1) as z, tmp.open("wb") as cur:
        written = 0
        for line in src:
            if written < half:
                z.write(line)
                written += len(line)
            else:
                cur.write(line)
    tmp.replace(path)
    return [old, path]


CHILD = """
import sys
from relay.report.command import report_command
report_command(sys.argv[1:])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--pairs", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp", help="where to write the logs (a temp dir inside)")
    ap.add_argument("--gzip-rotated", action="store_true", help="older half of each log as .1.gz")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs")
    ap.add_argument("--pseudonymize", action="store_true", help="relay report --pseudonymize")
    ap.add_argument("--format", default="json", choices=["text", "json", "csv", "html"])
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="relay-report-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        paths = generate(args.pairs, folder)
        if args.gzip_rotated:
            paths = [p for path in paths for p in rotate(path)]
        size = sum(p.stat().st_size for p in paths)
        print(
            f"generated {args.pairs:,} pairs, {len(paths)} files, {size / 1e6:,.0f} MB "
            f"in {time.perf_counter() - t:.1f} s"
        )
        out = folder / f"report.{args.format}"
        cmd = [sys.executable, "-c", CHILD, *map(str, paths), "--format", args.format]
        cmd += ["-o", str(out), *(["--pseudonymize"] if args.pseudonymize else [])]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        env.setdefault("RELAY_PSEUDONYM_KEY", "bench key")
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            print(f"report failed: exit {proc.returncode}", file=sys.stderr)
            return 1
        print(f"report ({args.format}): {wall:.1f} s wall, peak RSS {rss_mb:,.0f} MB")
        if args.format == "json":
            doc = json.loads(out.read_text())
            tot, inp = doc["totals"], doc["inputs"]
            print(
                f"  messages {tot['messages']:,}, pairs {tot['pairs']:,}, "
                f"corrupt {inp['corrupt_lines']}, orphans {inp['orphan_events']}, "
                f"duplicates {inp['duplicate_deliveries']}, open {inp['open_messages']}"
            )
            cmp = doc["comparison"]
            print(
                f"  pilot pairs {cmp['pilot_pairs']:,} (compared {cmp['compared_pairs']:,}, "
                f"cut-over {cmp['cutover_pairs']:,}), divergences {len(doc['divergences']):,} "
                f"in {len(doc['divergence_groups']):,} replies, "
                f"verdicts {', '.join(v['group'] + ' ' + v['verdict'] for v in doc['verdicts'])}"
            )
            if tot["pairs"] != args.pairs:
                print(f"pair count mismatch: {tot['pairs']} != {args.pairs}", file=sys.stderr)
                return 1
        ok = rss_mb < 300 and wall < 30
        print("targets (< 30 s, peak RSS < 300 MB):", "met" if ok else "MISSED")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
