"""Postfix's smtp-source drives the relay: concurrent sessions, every 250 delivered twice."""

from __future__ import annotations

import asyncio
import shutil

import pytest

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not shutil.which("smtp-source", path="/usr/sbin:/usr/bin"),
                       reason="postfix's smtp-source is not installed (.ci/run installs it)"),
]  # fmt: skip


async def test_smtp_source_load_reaches_both_providers_intact(relay_env) -> None:
    env = await relay_env()
    n, sessions = 300, 15
    proc = await asyncio.create_subprocess_exec(
        shutil.which("smtp-source", path="/usr/sbin:/usr/bin") or "smtp-source",
        "-s", str(sessions), "-m", str(n), "-l", "4096", "-f", "load@sender.test",
        "-t", "alice@example.com", f"127.0.0.1:{env.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    await env.legacy.wait_for_messages(n, timeout=30)
    await env.new.wait_for_messages(n, timeout=30)
    await env.wait_idle()
    received = env.events("received")
    assert len(received) == n
    ids = {e["queue_id"] for e in received}
    assert len(ids) == n
    delivered = [e for e in env.events("delivery") if e["outcome"] == "delivered"]
    assert sorted((e["queue_id"], e["provider"]) for e in delivered) == sorted(
        (q, p) for q in ids for p in ("legacy", "new")
    )
    # the two copies of each message are byte for byte the same, and carry its trace
    by_id = {}
    for m in env.legacy.messages:
        qid = m.data.split(b"X-Relay-Trace: test-node ", 1)[1].split(b"\r\n", 1)[0].decode()
        by_id[qid] = m.data
    assert set(by_id) == ids
    for m in env.new.messages:
        qid = m.data.split(b"X-Relay-Trace: test-node ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert m.data == by_id[qid] and m.rcpts == ["alice@example-new.com"]
    assert not list(env.cfg.relay.spool.glob("queue/*.msg"))
