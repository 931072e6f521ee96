"""`relay replay` (SPEC Part 2 "Safety net"): after an outage longer than max_age,
exactly the missing pilot pairs go again to the provider, once, byte-identical to
legacy's copies apart from `X-Relay-Replay`, through the spool; with and without
a running relay."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from relay.archive import replay as rp
from relay.spool import Spool
from relay.testing import Rule
from tests.conftest import RelayEnv
from tests.helpers_archive import archive_yaml, identity, message, run, run_async

OUTAGE = 20


async def outage(env: RelayEnv) -> tuple[str, list[str]]:
    """OUTAGE pilot messages while new refuses connections past max_age: all expired there."""
    # the window opens now, after every earlier message, to the microsecond: the
    # log's millisecond `ts` can round below that message's archive epoch
    since = datetime.now(UTC).isoformat()
    env.new.add(Rule("defer", stage="mail"))
    ids = [await env.send(["alice@example.com"], message(n)) for n in range(OUTAGE)]
    await env.wait_for(
        lambda: sum(e["outcome"] == "expired" for e in env.events("delivery")) == OUTAGE,
        timeout=20, what="expiries at new",
    )  # fmt: skip
    await env.wait_idle()
    env.new.clear()
    return since, ids


def replay_args(env: RelayEnv, key: Path, since: str, *more: str) -> list[str]:
    return ["replay", "-c", str(env.config_path), "--to", "new", "--since", since,
            "--identity", str(key), "--rate", "100/s", *more]  # fmt: skip


async def test_replay_after_outage_sends_exactly_the_missing_pairs_once(
    relay_env: Any, tmp_path: Path
) -> None:
    key, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    await env.send(["alice@example.com"], message(999))  # delivered to both before the outage
    await env.wait_idle()
    since, ids = await outage(env)
    assert len(env.new.messages) == 1

    dry = await run_async(*replay_args(env, key, "2000-01-01", "--dry-run"))
    assert dry.exit_code == 0, dry.output
    listed = [line for line in dry.output.splitlines() if " -> new " in line]
    assert sorted(line.split()[0] for line in listed) == sorted(ids)
    assert "dry run: 20 to replay; 1 already at new; nothing sent" in dry.output
    assert not env.events("replayed")
    await asyncio.sleep(0.3)
    assert len(env.new.messages) == 1

    result = await run_async(*replay_args(env, key, since))
    assert result.exit_code == 0, result.output
    assert "20 replay(s) queued" in result.output and "no running relay" not in result.output
    await env.new.wait_for_messages(1 + OUTAGE)
    await env.wait_idle()

    legacy = {m.data.split(b"Message-ID: ")[1][:8]: m.data for m in env.legacy.messages}
    replayed = env.new.messages[1:]
    assert len(replayed) == OUTAGE
    for m in replayed:
        assert m.rcpts == ["alice@example-new.com"]
        head, _, rest = m.data.partition(b"\r\n")
        node, orig = head.decode().removeprefix("X-Relay-Replay: ").split()
        assert node == "test-node" and orig in ids
        assert rest == legacy[rest.split(b"Message-ID: ")[1][:8]]  # byte-identical otherwise
    assert len({m.data for m in replayed}) == OUTAGE  # each once
    events = env.events("replayed")
    assert sorted(e["original_queue_id"] for e in events) == sorted(ids)
    replays = {e["queue_id"] for e in events}
    deliveries = [e for e in env.events("delivery") if e["queue_id"] in replays]
    assert {e["role"] for e in deliveries} == {"replay"}
    assert all(e["outcome"] == "delivered" for e in deliveries)

    again = await run_async(*replay_args(env, key, since))
    assert "0 replay(s) queued; 20 already at new" in again.output, again.output
    assert not env.relay.scheduler.messages  # nothing queued: nothing more can be sent
    assert len(env.new.messages) == 1 + OUTAGE

    # the report: replays fill the completeness line, and no other figure
    from relay.report.logs import build_report

    report = build_report([env.cfg.relay.log])
    (sales,) = report.completeness
    assert (sales.legacy_delivered, sales.new_holds, sales.live, sales.replayed) == (21, 21, 1, 20)
    assert report.providers["new"].delivered == 1 and report.providers["new"].expired == OUTAGE
    assert report.inputs.corrupt_lines == report.inputs.orphan_events == 0


async def test_replay_without_a_running_relay_waits_in_the_spool(
    relay_env: Any, tmp_path: Path
) -> None:
    key, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    since, ids = await outage(env)
    await env.relay.stop()

    result = await run_async(*replay_args(env, key, since))
    assert result.exit_code == 0, result.output
    assert "20 replay(s) queued (no running relay took them: sent when it starts)" in result.output
    spool = Spool(env.cfg.relay.spool)
    assert len(list(spool.queue_ids())) == OUTAGE
    pending = await run_async(*replay_args(env, key, since, "--dry-run"))
    assert "dry run: 0 to replay; 20 already at new" in pending.output  # queued = under way

    from relay.app import Relay

    env.new.add(Rule("defer", stage="mail", times=2))  # replays are retried like any delivery
    env.new.dsn = True  # and go as NOTIFY=NEVER, like a shadow copy: new never bounces them
    relay = Relay(env.cfg)
    await relay.start()
    try:
        await env.new.wait_for_messages(OUTAGE)
        await env.wait_for(lambda: not relay.scheduler.messages, what="replays sent")
    finally:
        await relay.stop()
    origins = [m.data.split(b"\r\n")[0].split()[-1].decode() for m in env.new.messages]
    assert sorted(origins) == sorted(ids)
    assert {tuple(m.rcpt_options["alice@example-new.com"]) for m in env.new.messages} == {
        ("NOTIFY=NEVER",)
    }
    replays = [e for e in env.events("delivery") if e["role"] == "replay"]
    assert [e["outcome"] for e in replays].count("deferred") >= 1
    assert [e["outcome"] for e in replays].count("delivered") == OUTAGE


async def test_replay_failing_finally_is_offered_again(relay_env: Any, tmp_path: Path) -> None:
    key, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    since, _ = await outage(env)
    env.new.add(Rule("reject", stage="after_data", code=550, text="5.7.1 Spam"))
    first = await run_async(*replay_args(env, key, since))
    assert "20 replay(s) queued" in first.output
    await env.wait_for(
        lambda: sum(e.get("role") == "replay" and e["outcome"] == "bounced"
                    for e in env.events("delivery")) == OUTAGE,
        timeout=20, what="replays refused",
    )  # fmt: skip
    assert not env.events("bounce_sent")  # a replay never bounces
    assert not env.legacy.received_for("sender@example.org")
    again = await run_async(*replay_args(env, key, since, "--dry-run"))
    assert "dry run: 20 to replay" in again.output


async def test_replay_by_user_and_group(relay_env: Any, tmp_path: Path) -> None:
    key, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    env.new.add(Rule("defer", stage="mail"))
    await env.send(["alice@example.com", "ann@dev.example.com"], message(1))
    await env.send(["Alice+tag@example.com"], message(2))
    await env.wait_for(
        lambda: sum(e["outcome"] == "expired" for e in env.events("delivery")) == 3,
        timeout=20, what="expiries",
    )  # fmt: skip
    await env.wait_idle()

    def rcpts(result: Result) -> list[str]:
        return sorted(line.split()[2] for line in result.output.splitlines() if " -> " in line)

    base = replay_args(env, key, "2000-01-01", "--dry-run")
    assert rcpts(await run_async(*base)) == ["Alice+tag@example.com", "alice@example.com",
                                              "ann@dev.example.com"]  # fmt: skip
    by_user = await run_async(*base, "--user", "ALICE@example.com")
    assert rcpts(by_user) == ["Alice+tag@example.com", "alice@example.com"]
    assert rcpts(await run_async(*base, "--group", "dev")) == ["ann@dev.example.com"]
    legacy = await run_async(*[a if a != "new" else "legacy" for a in base])
    assert "dry run: 0 to replay; 3 already at legacy" in legacy.output


def test_replay_needs_the_identity(tmp_path: Path) -> None:
    from tests.conftest import write_config

    _, recipient = identity(tmp_path / "keys")
    other, _ = identity(tmp_path / "other")
    cfg = write_config(tmp_path / "config", archive_yaml(recipient))
    (tmp_path / "var" / "archive").mkdir(parents=True)
    result = run("replay", "-c", str(cfg), "--to", "new", "--since", "2000-01-01",
                 "--identity", str(other), "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output  # nothing archived: nothing to decrypt
    assert "dry run: 0 to replay" in result.output


def test_present_at_reads_rotated_and_gzipped_logs(tmp_path: Path) -> None:
    import gzip

    def line(**e: Any) -> bytes:
        return (json.dumps({"node": "n", "ts": "2026-01-01T00:00:00.000Z", **e}) + "\n").encode()

    (tmp_path / "log.jsonl.1.gz").write_bytes(gzip.compress(
        line(event="delivery", queue_id="A", rcpt="X@example.com", provider="new",
             outcome="delivered")
        + b'{"torn'
    ))  # fmt: skip
    (tmp_path / "log.jsonl").write_bytes(
        line(event="replayed", queue_id="R", original_node="n", original_queue_id="B",
             rcpt="y@example.com", provider="new", delivered_to="y@new", group=None)
        + line(event="replayed", queue_id="S", original_node="n", original_queue_id="C",
               rcpt="z@example.com", provider="new", delivered_to="z@new", group=None)
        + line(event="delivery", queue_id="S", rcpt="z@example.com", provider="new",
               outcome="expired")
    )  # fmt: skip
    logs = rp.default_logs(tmp_path / "log.jsonl")
    assert len(logs) == 2
    assert rp.present_at(logs, "new") == {("n", "A", "x@example.com"), ("n", "B", "y@example.com")}
    assert rp.present_at(logs, "legacy") == set()


@pytest.mark.parametrize("rate", ["0", "-1/s", "fast"])
def test_replay_rate_must_be_positive(tmp_path: Path, rate: str) -> None:
    result = run("replay", "-c", str(tmp_path / "x.yaml"), "--to", "new", "--since", "2026-01-01",
                 "--rate", rate)  # fmt: skip
    assert result.exit_code == 2 and "positive rate" in result.output


def test_a_replay_carries_the_originals_header_fields_for_its_provider() -> None:
    from relay.archive.store import Entry, Record
    from relay.records import Envelope, PlanEntry

    plan = PlanEntry("a@example.com", "new", "a@example-new.com", "replay", "sales", "dual", True)
    original = Envelope(
        "Q1", "2026-01-01T00:00:00.000Z", 1.0, "s@example.org", ("a@example.com",), ("SMTPUTF8",),
        "127.0.0.1", "<m@x>", 5, False, (), False,
        prepend=(("legacy", "Authentication-Results: l\r\n"), ("new", "ARC-Seal: n\r\n")),
    )  # fmt: skip
    entry = Entry("Q1", "n1", "", 1.0, (), (), 5, "", "f", ())
    c = rp.Candidate(entry, Record("n1", original, b"hello"), "a@example.com", plan)
    env = rp.replay_envelope(c, "R1", 2.0, len(c.content()))
    assert env.prepended("new") == b"ARC-Seal: n\r\n" and env.prepended("legacy") == b""
    assert env.plan == (plan,) and env.options == ("SMTPUTF8",) and env.message_id == "<m@x>"
    assert c.content() == b"X-Relay-Replay: n1 Q1\r\nhello"
