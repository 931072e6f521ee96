"""The spool: the only code that touches the spool directory and what is under it.

store.py     the queue of one spool: messages, state lines, recovery
locks.py     relay.lock and supervisor.lock
control.py   control/: requests from `relay queue` to the running relay
workers.py   the worker spools w<I>/ and moving messages between spools

One file under it is another module's: `verify.cache` (`Spool.verify_cache`),
the recipient verification cache that relay/verify/cache.py reads and writes.
"""

from relay.spool.store import (
    FOOTER,
    MAGIC,
    WRITE_THRESHOLD,
    Incoming,
    Queued,
    Spool,
    SpoolError,
    Stored,
    new_queue_id,
)

__all__ = [
    "FOOTER",
    "MAGIC",
    "WRITE_THRESHOLD",
    "Incoming",
    "Queued",
    "Spool",
    "SpoolError",
    "Stored",
    "new_queue_id",
]
