"""What happens to a delivery after an attempt: pure functions of the reply and time.

The scheduler applies them (scheduler.py); keeping them free of the queue,
the clock and the random source makes the whole retry policy one table to
test (tests/test_retry.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from relay.config import RetrySettings
from relay.delivery import Reply
from relay.records import Status

JITTER = 0.1  # a backoff is its schedule entry times a factor in [0.9, 1.1]

# accepted: 2xx; rejected: a final 5xx; transient: anything else (4xx, no reply,
# a 5xx that is a configuration fault); retry_now: "452 4.5.3 Too many recipients"
# in a transaction where another recipient got through
Outcome = Literal["accepted", "rejected", "transient", "retry_now"]


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status  # delivered | bounced | expired | deferred
    due: float | None = None  # the next attempt when deferred


def classify(reply: Reply, progress: bool) -> Outcome:
    """The reply as the retry policy sees it; `progress`: some recipient of the same
    transaction was accepted."""
    if reply.ok:
        return "accepted"
    if reply.permanent:
        return "rejected"
    # "452 4.5.3 Too many recipients" (or Exim's bare "452 too many recipients") is a
    # per-transaction limit, not a failure: the rest go at once in the next transaction
    # (as Postfix does); some recipient got through, so this cannot loop
    if progress and reply.too_many_recipients:
        return "retry_now"
    return "transient"


def jitter(rng: random.Random) -> float:
    """One attempt's backoff factor: its deferrals stay together."""
    return rng.uniform(1 - JITTER, 1 + JITTER)


def backoff(retry: RetrySettings, attempts: int, factor: float) -> float:
    """Seconds before attempt `attempts + 1`: `retry.schedule`'s entry (the last one
    repeats) times the jitter factor."""
    schedule = retry.schedule
    return schedule[min(attempts - 1, len(schedule) - 1)] * factor


def decide(
    outcome: Outcome,
    attempts: int,
    received: float,
    now: float,
    retry: RetrySettings,
    factor: float,
) -> Decision:
    """After attempt number `attempts` of a message that arrived at `received`.

    A transient failure expires once the message is `retry.max_age` old (the
    first attempt after that age, never earlier); otherwise it is deferred by the
    backoff. `factor` is the attempt's jitter (`jitter()`).
    """
    if outcome == "accepted":
        return Decision("delivered")
    if outcome == "rejected":
        return Decision("bounced")
    if now - received >= retry.max_age:
        return Decision("expired")
    if outcome == "retry_now":
        return Decision("deferred", now)
    return Decision("deferred", now + backoff(retry, attempts, factor))
