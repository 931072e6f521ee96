"""Memory of a deep queue in the scheduler: bytes a message held in short form, as
a restart after an outage queues it (legacy delivered, new deferred), measured
with tracemalloc over Scheduler.recover of N messages (no spool I/O: recover is
given the records a spool's recovery yields).

Usage: python bench/queue_memory.py [N=50000]
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import config  # noqa: E402
from relay.log import DeliveryLog  # noqa: E402
from relay.records import Outline, StateLine  # noqa: E402
from relay.scheduler import Scheduler  # noqa: E402
from relay.spool import Queued, Spool, new_queue_id  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    settings = config.RelaySettings.model_validate(
        {"domains": ["example.com"], "providers": {
            "legacy": {"host": "127.0.0.1", "port": 1}, "new": {"host": "127.0.0.1", "port": 2}}}
    )  # fmt: skip
    work = Path(f"/tmp/queue-memory-{time.monotonic_ns()}")
    spool, log = Spool(work / "spool"), DeliveryLog(work / "deliveries.jsonl", node="bench")
    sched = Scheduler(settings, spool, log)
    now = time.time()
    gc.collect()
    tracemalloc.start()  # before the records: their queue ids and due times stay queued
    before = tracemalloc.get_traced_memory()[0]
    # what a spool's recovery yields for an hour's outage of `new`
    records = [
        Queued(new_queue_id(), Outline(now - 3600 + i / 100, ("legacy", "new")), [
            StateLine(0, "delivered", 1, None, "250 2.0.0 Ok: queued"),
            StateLine(1, "deferred", 3, now + 600 + i / 100, "451 4.3.0 try again later"),
        ])
        for i in range(n)
    ]  # fmt: skip
    queued = sched.recover(iter(records))
    del records
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"{queued} messages queued in short form: {held / queued:.0f} bytes a message "
          f"({held / 2**20:.1f} MiB for {queued})")  # fmt: skip


if __name__ == "__main__":
    main()
