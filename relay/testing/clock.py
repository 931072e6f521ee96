"""A hand-moved clock for the scheduler: backoff and expiry without sleeping."""

from __future__ import annotations

import time

from relay.scheduler import Clock


class FakeClock(Clock):
    """The relay's time, moved by hand: backoff and expiry without sleeping."""

    def __init__(self, start: float | None = None) -> None:
        super().__init__()
        self.t = time.time() if start is None else start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for wake in self.listeners:
            wake()
