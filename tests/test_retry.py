"""The retry policy as tables: a reply's classification, then what follows an attempt."""

from __future__ import annotations

import random

import pytest

from relay import config
from relay.delivery.reply import Reply, Stage
from relay.retry import Decision, Outcome, backoff, classify, decide, jitter

RETRY = config.RetrySettings(schedule=(60, 300, 900), max_age=3600)
T0 = 1_000_000.0  # when the message arrived


@pytest.mark.parametrize(
    ("outcome", "attempts", "age", "factor", "expected"),
    [
        # accepted and rejected are final at any age
        ("accepted", 1, 0, 1.0, Decision("delivered")),
        ("accepted", 7, 9999, 1.0, Decision("delivered")),
        ("rejected", 1, 0, 1.0, Decision("bounced")),
        ("rejected", 3, 9999, 1.0, Decision("bounced")),
        # transient: the schedule's entry for this attempt, the last one repeating
        ("transient", 1, 0, 1.0, Decision("deferred", T0 + 60)),
        ("transient", 2, 100, 1.0, Decision("deferred", T0 + 100 + 300)),
        ("transient", 3, 500, 1.0, Decision("deferred", T0 + 500 + 900)),
        ("transient", 9, 3000, 1.0, Decision("deferred", T0 + 3000 + 900)),
        # ... times the attempt's jitter factor
        ("transient", 1, 0, 0.9, Decision("deferred", T0 + 54)),
        ("transient", 2, 0, 1.1, Decision("deferred", T0 + 330)),
        # expired: the first attempt once the message is max_age old, never before
        ("transient", 5, 3599.9, 1.0, Decision("deferred", T0 + 3599.9 + 900)),
        ("transient", 5, 3600, 1.0, Decision("expired")),
        ("transient", 5, 7200, 1.0, Decision("expired")),
        # too many recipients with progress: at once, unless expired
        ("retry_now", 1, 0, 1.1, Decision("deferred", T0)),
        ("retry_now", 4, 100, 1.0, Decision("deferred", T0 + 100)),
        ("retry_now", 4, 3600, 1.0, Decision("expired")),
    ],
)
def test_decide(
    outcome: Outcome, attempts: int, age: float, factor: float, expected: Decision
) -> None:
    assert decide(outcome, attempts, T0, T0 + age, RETRY, factor) == expected


def reply(code: int | None, enhanced: str | None = None, stage: Stage = "rcpt") -> Reply:
    return Reply(code, f"{code} {enhanced} text", stage, enhanced)


@pytest.mark.parametrize(
    ("got", "progress", "expected"),
    [
        (reply(250, "2.0.0", "after_data"), False, "accepted"),
        (reply(550, "5.1.1"), False, "rejected"),
        (reply(554, "5.7.1", "after_data"), True, "rejected"),
        (reply(451, "4.7.1"), False, "transient"),
        (reply(None, None, "connect"), False, "transient"),
        (reply(535, "5.7.8", "auth"), False, "transient"),  # a configuration fault
        (reply(530, "5.7.0", "mail"), False, "transient"),
        (reply(452, "4.5.3"), True, "retry_now"),
        (reply(452, "4.5.3"), False, "transient"),  # nobody got through: no loop
        (reply(452, "4.3.1"), True, "transient"),  # out of storage is no limit
    ],
)
def test_classify(got: Reply, progress: bool, expected: Outcome) -> None:
    assert classify(got, progress) == expected


def test_backoff_jitter_is_ten_percent() -> None:
    retry = config.RetrySettings(schedule=(60, 300, 900), max_age=10)
    rng = random.Random(7)
    for attempts, base in [(1, 60), (2, 300), (3, 900), (4, 900), (9, 900)]:
        samples = [backoff(retry, attempts, jitter(rng)) for _ in range(500)]
        assert min(samples) >= base * 0.9 and max(samples) <= base * 1.1
        assert max(samples) - min(samples) > base * 0.15  # really spread, not constant
