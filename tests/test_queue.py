"""`relay queue` against a running relay with one provider down, and its races."""

from __future__ import annotations

import asyncio
import json
import random
import sys

import pytest

from relay import queue_admin
from relay.app import Relay
from relay.testing import Rule
from tests.conftest import RelayEnv

pytestmark = pytest.mark.timeout(60)


async def cli(env: RelayEnv, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", *args, "-c", str(env.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def legacy_down(env: RelayEnv) -> None:
    await env.legacy.stop()


async def test_list_show_retry_delete_with_legacy_down(relay_env) -> None:
    env = await relay_env()
    await legacy_down(env)
    q1 = await env.send(["alice@example.com"])
    q2 = await env.send(["alice@example.com", "zed@example.com"])
    await env.new.wait_for_messages(2)
    await env.wait_for(
        lambda: sum(e["outcome"] == "deferred" for e in env.events("delivery")) >= 3,
        what="legacy deferrals",
    )

    code, out = await cli(env, "list")
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isalnum()}
    assert "legacy: 1 deferred" in lines[q1] and "new: 1 delivered" in lines[q1]
    assert "legacy: 2 deferred" in lines[q2]
    assert "2 message(s) queued" in out

    code, out = await cli(env, "show", q2)
    view = json.loads(out)
    legacy = [d for d in view["deliveries"] if d["provider"] == "legacy"]
    assert {d["status"] for d in legacy} == {"deferred"}
    assert all(
        "ConnectionRefused" in d["last_reply"] or "connect" in d["last_reply"].lower()
        for d in legacy
    ), legacy

    code, out = await cli(env, "delete", q2, "--provider", "legacy")
    assert (code, out.strip()) == (0, "2 deliveries deleted")
    deleted = env.events("deleted")
    assert sorted((e["queue_id"], e["rcpt"], e["provider"]) for e in deleted) == [
        (q2, "alice@example.com", "legacy"),
        (q2, "zed@example.com", "legacy"),
    ]
    assert q2 not in env.relay.scheduler.messages  # every delivery final: out of the spool
    assert not (env.cfg.relay.spool / "queue" / f"{q2}.msg").exists()

    await env.legacy.start()  # back on the same port; next attempt would be in ~60 s
    code, out = await cli(env, "retry", q1)
    assert (code, out.strip()) == (0, "1 deliveries made due now")
    await env.legacy.wait_for_messages(1, timeout=5)
    assert env.legacy.messages[0].rcpts == ["alice@example.com"]
    await env.wait_idle()
    code, out = await cli(env, "list")
    assert "0 message(s) queued" in out
    assert env.events("bounce_sent") == []  # a delete never makes a DSN


async def test_queue_commands_work_without_a_running_relay(relay_env) -> None:
    env = await relay_env()
    await legacy_down(env)
    qid = await env.send(["zed@example.com"])
    await env.wait_for(lambda: bool(env.events("delivery")), what="first attempt")
    await env.relay.stop()
    code, out = await cli(env, "delete", qid)
    assert (code, out.strip()) == (0, "1 deliveries deleted")
    assert [e["queue_id"] for e in env.events("deleted")] == [qid]
    code, out = await cli(env, "show", qid)
    assert code == 1 and "not in the queue" in out


async def test_delete_and_retry_race_completing_attempts(relay_env, monkeypatch) -> None:
    monkeypatch.setattr(queue_admin, "POLL", 0.01)
    env = await relay_env("retry: {schedule: [0.01]}\n")
    rng = random.Random(1234)
    rounds, deleted_first, delivered_first = 60, 0, 0
    for i in range(rounds):
        rcpt = f"r{i}@example.com"
        env.legacy.add(Rule("defer", rcpt=rcpt, times=rng.randint(0, 2), code=451,
                            text="4.3.0 try later"))  # fmt: skip
        qid = await env.send([rcpt])
        await asyncio.sleep(rng.random() * 0.02)
        spool = env.relay.spool
        results = await asyncio.gather(
            asyncio.to_thread(queue_admin.request, spool, "retry", qid, None),
            asyncio.to_thread(queue_admin.request, spool, "delete", qid, "legacy"),
        )
        await env.wait_for(lambda q=qid: q not in env.relay.scheduler.messages, what=qid)
        events = [e for e in env.events() if e.get("queue_id") == qid]
        delivered = [e for e in events if e["event"] == "delivery" and e["outcome"] == "delivered"]
        deleted = [e for e in events if e["event"] == "deleted"]
        got = env.legacy.received_for(rcpt)
        # exactly one final fate, and the provider has the message iff it was delivered
        assert len(delivered) + len(deleted) == 1, events
        assert len(got) == len(delivered), (events, got)
        # a delete that comes after the delivery finished finds no such message
        assert results[1] in ({"count": len(deleted)}, {"error": f"{qid}: not in the queue"})
        assert "error" not in results[1] or not deleted
        if deleted:
            deleted_first += 1
            # nothing was sent after the delete was logged
            assert all(e["outcome"] != "delivered" for e in events if e["event"] == "delivery")
        else:
            delivered_first += 1
        attempts = [e for e in events if e["event"] == "delivery"]
        assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
    assert deleted_first and delivered_first, (deleted_first, delivered_first)
    assert not list(env.cfg.relay.spool.glob("queue/*.msg"))


async def test_offline_retry_is_durable_and_list_is_read_only(relay_env) -> None:
    env = await relay_env()
    await legacy_down(env)
    qid = await env.send(["zed@example.com"])
    await env.wait_for(lambda: bool(env.events("delivery")), what="first attempt")
    await env.relay.stop()  # next attempt would be in ~60 s
    code, out = await cli(env, "retry", qid)
    assert (code, out.strip()) == (0, "1 deliveries made due now")
    files = sorted(p.name for p in (env.cfg.relay.spool / "queue").iterdir())
    await cli(env, "list")
    assert sorted(p.name for p in (env.cfg.relay.spool / "queue").iterdir()) == files

    await env.legacy.start()
    again = Relay(env.cfg)
    await again.start()
    try:
        await env.legacy.wait_for_messages(1, timeout=5)
    finally:
        await again.stop()
    assert [e["outcome"] for e in env.events("delivery")] == ["deferred", "delivered"]
