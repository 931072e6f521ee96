"""A bug between a provider's reply and its durable record never becomes a resend
storm (SPEC Part 2 "Faults"; before this, one message reached a provider over
10,000 times in 10 seconds)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from relay import retry, scheduler
from relay.testing import Rule
from tests.conftest import RelayEnv

pytestmark = pytest.mark.timeout(30)


def mails(env: RelayEnv) -> int:
    return sum(c.startswith("MAIL FROM") for c in env.legacy.commands)


async def test_an_exception_while_recording_backs_off(
    relay_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: RelayEnv = await relay_env("retry: {schedule: [1]}\n")

    def broken(reply: Any, progress: bool) -> retry.Outcome:
        raise TypeError("attempt count stored as a string")  # a bug in recording

    monkeypatch.setattr(scheduler.retry, "classify", broken)
    await env.send(["zed@example.com"])
    seen: list[float] = []
    for n in (1, 2, 3):
        await env.legacy.wait_until(lambda n=n: mails(env) >= n, what=f"attempt {n}")
        seen.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert all(g >= 0.85 for g in gaps), gaps  # the first retry step (1 s, -10 % jitter)


async def test_a_retry_policy_bug_is_capped(
    relay_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: RelayEnv = await relay_env("retry: {schedule: [1]}\n")
    env.legacy.add(Rule("defer", rcpt="zed@example.com"))

    def now_again(outcome: Any, attempts: int, received: float, now: float, *a: Any) -> Any:
        return retry.Decision("deferred", now)  # a bug: due again at once, forever

    monkeypatch.setattr(scheduler.retry, "decide", now_again)
    qid = await env.send(["zed@example.com"])
    msg = env.relay.scheduler.messages[qid]
    # two holds later (a second apart): the attempts counted, none of them sent
    await env.wait_for(
        lambda: len(msg.recent.get("legacy", ())) >= scheduler.LOOP_LIMIT + 3, timeout=10
    )
    assert mails(env) == scheduler.LOOP_LIMIT
