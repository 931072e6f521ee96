"""A simulated day for the placement probe: N pilot pairs, both providers, default delays.

    python bench/probe_day.py               # N = 10,000 pairs (20,000 copies), 40 pilot users
    python bench/probe_day.py -n 2000 --users 10

The relay's delivery log is written as the day goes (arrivals spread evenly over
24 h, each copy delivered a few seconds after it was received), the probe runs
in this process on a FakeClock stepped every `round_every` (30 s with the
default delays), and its mailboxes are the in-memory IMAP server of the test
suite (tests/fake_imap.py): each copy is filed when delivered, 3 % in Junk,
0.5 % nowhere (missing: looked at after every delay, then at give_up_after).
Prints rounds, mailbox sessions, IMAP commands by kind, placement results, wall
time, the state file's size and peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import config
from relay.log import utc_ts
from relay.probe.daemon import Probe
from relay.probe.imap import ImapSession
from relay.testing import FakeClock
from tests.fake_imap import FakeServer

DAY = 86_400.0
T0 = 1_900_000_000.0


def _config(folder: Path, users: int) -> Path:
    pilots = ["new_domains: {example.com: example-new.com}", "pilots:"]
    pilots += [f"  - {{address: u{i}@example.com, group: g{i % 4}}}" for i in range(users)]
    (folder / "pilot-users.yaml").write_text("\n".join(pilots) + "\n")
    probed = "{host: 127.0.0.1, port: %d, tls: none, password_env: BENCH_PW}"
    (folder / "relay.yaml").write_text(
        "node: n1\ndomains: [example.com]\nlog: deliveries.jsonl\n"
        "placement:\n  enabled: true\n  log: placement.jsonl\n  metrics_port: 0\n"
        f"  providers:\n    legacy: {probed % 1}\n    new: {probed % 2}\n"
    )
    return folder / "relay.yaml"


def _events(n: int, users: int, rng: random.Random) -> list[tuple[float, dict[str, Any]]]:
    out: list[tuple[float, dict[str, Any]]] = []
    for i in range(n):
        t = T0 + DAY * i / n
        rcpt = f"u{rng.randrange(users)}@example.com"
        qid = f"Q{i:06d}"
        to = {"legacy": rcpt, "new": rcpt.replace("example.com", "example-new.com")}
        plan = [{"rcpt": rcpt, "provider": p, "delivered_to": to[p], "role": "primary",
                 "group": "g", "mode": "dual", "pilot": True} for p in to]  # fmt: skip
        out.append((t, {"event": "received", "queue_id": qid, "message_id": f"<{qid}@o.test>",
                        "rcpts": [rcpt], "plan": plan}))  # fmt: skip
        for p in to:
            out.append((t + rng.uniform(0.2, 5), {"event": "delivery", "queue_id": qid,
                        "rcpt": rcpt, "provider": p, "delivered_to": to[p], "pilot": True,
                        "outcome": "delivered"}))  # fmt: skip
    out.sort(key=lambda x: x[0])
    return out


async def run(n: int, users: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="probe-day-"))
    os.environ["BENCH_PW"] = "pw"
    cfg = config.load(_config(folder, users))
    clock = FakeClock(T0)
    servers = {"legacy": FakeServer(), "new": FakeServer()}

    def factory(settings: Any, login: str, tokens: Any) -> ImapSession:
        server = servers["legacy" if settings.port == 1 else "new"]
        return ImapSession(settings, login, tokens, client_factory=server.client)

    probe = Probe(cfg, clock=clock, session_factory=factory)
    await probe.start()
    events = _events(n, users, rng)
    log = open(cfg.relay.log, "a")  # noqa: SIM115
    i = 0
    step = probe.round_every
    end = T0 + DAY + cfg.relay.placement.give_up_after + 2 * step
    started = time.monotonic()
    while clock.now() < end:
        now = clock.now()
        while i < len(events) and events[i][0] <= now:
            t, ev = events[i]
            ev = {**ev, "ts": utc_ts(datetime.fromtimestamp(t, UTC)), "node": "n1"}
            log.write(json.dumps(ev) + "\n")
            r = rng.random()
            if ev["event"] == "delivery" and r >= 0.005:  # filed as the provider accepts it
                qid = ev["queue_id"]
                servers[ev["provider"]].file(
                    ev["delivered_to"], "Junk" if r < 0.035 else "INBOX",
                    f"Message-ID: <{qid}@o.test>\nX-Relay-Trace: n1 {qid}",
                    datetime.fromtimestamp(t, UTC),
                )  # fmt: skip
            i += 1
        log.flush()
        probe.ingest_available()
        clock.advance(step)
        while not probe.idle():
            await asyncio.sleep(0.0005)
    wall = time.monotonic() - started
    await probe.stop()
    log.close()
    lines = cfg.relay.placement.log.read_text().splitlines()
    results = Counter(json.loads(line)["folder"] for line in lines if line.strip())
    commands: Counter[str] = Counter()
    for s in servers.values():
        commands.update(c for c, _ in s.commands)
    return {
        "pairs": n,
        "copies": 2 * n,
        "pilot_users": users,
        "simulated_hours": round((clock.now() - T0) / 3600, 1),
        "rounds": {name: p.rounds for name, p in probe.providers.items()},
        "sessions": sum(len(s.logins) for s in servers.values()),
        "imap_commands": dict(commands),
        "imap_commands_total": sum(commands.values()),
        "placements": dict(results),
        "state_file_bytes": cfg.relay.placement.state_path.stat().st_size,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10_000, help="pilot pairs over the day")
    ap.add_argument("--users", type=int, default=40, help="pilot users")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.n, args.users, args.seed)), indent=2))


if __name__ == "__main__":
    main()
