# ruff: noqa: F811 - the relay_factory fixture is imported, then named as a parameter
"""The archive destination (SPEC Part 2 "Safety net"): encrypted files, a plain index
without subjects or clear local parts, export, delete, retention, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pyrage
import pytest

from relay import config
from relay.archive.commands import capacity_warning
from relay.archive.store import ArchiveStore, parse_record
from relay.archive.writer import ArchiveWriter
from tests.conftest import RelayEnv, write_config
from tests.helpers_archive import archive_yaml, identity, message, run, run_async
from tests.helpers_ingress import RelayFactory, relay_factory  # noqa: F401

SUBJECT, BODY = b"pilot-subject-", b"body-marker-"


def archive_files(env: RelayEnv) -> list[Path]:
    return sorted(p for p in env.cfg.relay.archive.dir.rglob("*") if p.is_file())


async def archived(env: RelayEnv, *rcpt_lists: list[str]) -> list[str]:
    ids = [await env.send(rcpts, message(n)) for n, rcpts in enumerate(rcpt_lists)]
    await env.wait_idle()
    return ids


async def test_files_hold_no_plaintext_and_export_reproduces_the_bytes(
    relay_env: Any, tmp_path: Path
) -> None:
    key, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    ids = await archived(env, ["alice@example.com", "zed@example.com"], ["Bob@example.com"])
    files = archive_files(env)
    assert {f.name for f in files} >= {f"{q}.age" for q in ids} | {"index.jsonl", "index.key"}
    for f in files:
        data = f.read_bytes()
        assert SUBJECT not in data and BODY not in data, f
    index = (env.cfg.relay.archive.dir / "index.jsonl").read_bytes()
    for clear in (b"alice", b"zed", b"bob", b"Bob", b"robert", b"Subject", b"sender"):
        assert clear not in index
    entries = {e.queue_id: e for e in ArchiveStore(env.cfg.relay.archive.dir).entries()}
    assert entries[ids[0]].groups == ("sales",) and entries[ids[1]].groups == ("support",)
    assert len(entries[ids[0]].rcpts) == 2 and entries[ids[0]].keys == (recipient,)

    # the archive file: the envelope and exactly the bytes the providers got
    sent = env.legacy.messages[0].data
    ident = pyrage.x25519.Identity.from_str(key.read_text().splitlines()[1])
    record = parse_record(pyrage.decrypt((env.cfg.relay.archive.dir / entries[ids[0]].file)
                                         .read_bytes(), [ident]))  # fmt: skip
    assert record.content == sent and record.node == "test-node"
    assert record.envelope.rcpts == ("alice@example.com", "zed@example.com")
    assert hashlib.sha256(sent).hexdigest() == entries[ids[0]].sha256

    out = tmp_path / "export"
    export = ["archive", "export", "-c", str(env.config_path), "--identity", str(key)]
    result = await run_async(*export, "--user", "alice@EXAMPLE.com", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "1 message(s) written" in result.output
    assert (out / f"{ids[0]}.eml").read_bytes() == sent
    bob = await run_async(*export, "--user", "bob@example.com", "--out", str(out))
    assert (out / f"{ids[1]}.eml").read_bytes() == env.new.received_for("robert@example-new.com")[
        0
    ].data, bob.output


async def test_export_needs_the_right_identity(relay_env: Any, tmp_path: Path) -> None:
    _, recipient = identity(tmp_path / "keys")
    other, _ = identity(tmp_path / "other")
    env = await relay_env(archive_yaml(recipient))
    await archived(env, ["alice@example.com"])
    args = ["archive", "export", "-c", str(env.config_path), "--user", "alice@example.com",
            "--out", str(tmp_path / "x")]  # fmt: skip
    wrong = await run_async(*args, "--identity", str(other))
    assert wrong.exit_code == 1 and "cannot decrypt" in wrong.output
    none = await run_async(*args)
    assert none.exit_code == 1 and "no age identity given" in none.output


async def test_scope_pilots_skips_non_pilot_mail_and_scope_all_keeps_it(
    relay_env: Any, tmp_path: Path
) -> None:
    _, recipient = identity(tmp_path / "keys")
    pilots = await relay_env(archive_yaml(recipient))
    await archived(pilots, ["zed@example.com"], ["ann@dev.example.com"])
    assert len(ArchiveStore(pilots.cfg.relay.archive.dir).entries()) == 1
    everyone = await relay_env(archive_yaml(recipient).replace("enabled: true", "enabled: true, "
                                                                "scope: all"))  # fmt: skip
    await archived(everyone, ["zed@example.com"])
    (entry,) = ArchiveStore(everyone.cfg.relay.archive.dir).entries()
    assert entry.groups == ()
    plan = everyone.events("received")[0]["plan"]
    assert [p["provider"] for p in plan] == ["legacy", "archive"]
    assert plan[1]["role"] == "shadow" and plan[1]["pilot"] is False


async def test_list_needs_no_key_and_filters(relay_env: Any, tmp_path: Path) -> None:
    _, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    ids = await archived(env, ["alice@example.com"], ["ann@dev.example.com"])
    c = str(env.config_path)
    out = (await run_async("archive", "list", "-c", c)).output
    assert all(q in out for q in ids) and "2 message(s)" in out
    dev = json.loads((await run_async("archive", "list", "-c", c, "--group", "dev", "--json"))
                     .output)  # fmt: skip
    assert [d["queue_id"] for d in dev] == [ids[1]] and dev[0]["encrypted"] is True
    alice = (await run_async("archive", "list", "-c", c, "--user", "Alice+x@example.com")).output
    assert ids[0] in alice and ids[1] not in alice
    later = (await run_async("archive", "list", "-c", c, "--since", "2999-01-01")).output
    assert "0 message(s)" in later


async def test_delete_user_removes_their_messages_and_logs_it(
    relay_env: Any, tmp_path: Path
) -> None:
    _, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    ids = await archived(env, ["alice@example.com", "zed@example.com"], ["ann@dev.example.com"],
                         ["alice+news@example.com"])  # fmt: skip
    result = await run_async("archive", "delete", "-c", str(env.config_path), "--user",
                             "ALICE@example.com")  # fmt: skip
    assert "2 message(s) deleted (1 also addressed to others)" in result.output
    store = ArchiveStore(env.cfg.relay.archive.dir)
    assert [e.queue_id for e in store.entries()] == [ids[1]]
    assert not any(q in p.name for p in archive_files(env) for q in (ids[0], ids[2]))
    (event,) = env.events("archive_purged")
    assert event["count"] == 2 and event["reason"] == "request" and event["before"] is None
    assert "alice" not in json.dumps(event)


def _old_message(writer: ArchiveWriter, days: float, qid: str) -> None:
    """Archive a message as if it had been received `days` ago."""
    from relay.records import Envelope, PlanEntry

    epoch = time.time() - days * 86400
    env = Envelope(qid, "2000-01-01T00:00:00.000Z", epoch, "s@example.org",
                   ("alice@example.com",), (), "127.0.0.1", None, 5, False,
                   (PlanEntry("alice@example.com", "legacy", "alice@example.com", "primary",
                              "sales", "dual", True),), False)  # fmt: skip
    tmp = writer.store.root.parent / f"{qid}.content"
    tmp.write_bytes(b"hello")
    writer.write(env, lambda: (open(tmp, "rb"), 5))  # noqa: SIM115 - the writer closes it


async def test_retention_purge_at_start_and_by_command(relay_env: Any, tmp_path: Path) -> None:
    _, recipient = identity(tmp_path / "keys")
    cfg_text = archive_yaml(recipient).replace("enabled: true", "enabled: true, retention_days: 3")
    folder = tmp_path / "pre"
    cfg = config.load(write_config(folder / "config", "domains: [example.com, dev.example.com]\n"
                                   "spool: ../var/spool\n" + cfg_text))  # fmt: skip
    writer = ArchiveWriter(cfg.relay, "old-node")
    writer.start()
    _old_message(writer, 10, "0000000000AAAA")
    _old_message(writer, 4, "0000000000BBBB")
    _old_message(writer, 1, "0000000000CCCC")
    result = run("archive", "purge", "-c", str(folder / "config" / "relay.yaml"))
    assert "2 message(s) purged (10 bytes)" in result.output
    assert [e.queue_id for e in writer.store.entries()] == ["0000000000CCCC"]
    left = [p.name for p in writer.store.root.rglob("*.age")]
    assert left == ["0000000000CCCC.age"]

    # the running relay purges at start (and daily): `archive_purged` in its log
    env = await relay_env(cfg_text.replace("retention_days: 3", "retention_days: 1"))
    running = ArchiveWriter(env.cfg.relay, "old-node")
    await asyncio.to_thread(_old_message, running, 2, "0000000000DDDD")
    await env.relay.stop()
    from relay.app import Relay

    relay = Relay(env.cfg)
    await relay.start()
    try:
        await env.wait_for(lambda: bool(env.events("archive_purged")), what="purge event")
    finally:
        await relay.stop()
    (event,) = env.events("archive_purged")
    assert event["reason"] == "retention" and event["count"] == 1 and event["before"]
    assert running.store.entries() == []


def test_archive_without_encrypt_to_is_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "a", "archive: {enabled: true}\n")
    result = run("check", "-c", str(cfg))
    assert result.exit_code == 1
    assert ":1: archive.encrypt_to: needed when the archive is enabled" in result.output
    serve = run("serve", "-c", str(cfg))
    assert serve.exit_code == 1 and "archive.encrypt_to" in serve.output
    bad = write_config(tmp_path / "b", "archive: {enabled: true, encrypt_to: [age1nope]}\n")
    assert "'age1nope' is not an age recipient" in run("check", "-c", str(bad)).output
    plain = write_config(tmp_path / "c", "archive: {enabled: true, insecure_plaintext: true}\n")
    ok = run("check", "-c", str(plain))
    assert ok.exit_code == 0, ok.output
    assert "archive.insecure_plaintext" in ok.output  # said loudly, still allowed


async def test_insecure_plaintext_archive(relay_env: Any, tmp_path: Path) -> None:
    env = await relay_env("archive: {enabled: true, insecure_plaintext: true}\n")
    (qid,) = await archived(env, ["alice@example.com"])
    (entry,) = ArchiveStore(env.cfg.relay.archive.dir).entries()
    assert entry.file.endswith(f"{qid}.eml") and entry.keys == ()
    out = tmp_path / "x"
    result = await run_async("archive", "export", "-c", str(env.config_path), "--user",
                             "alice@example.com", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / f"{qid}.eml").read_bytes() == env.legacy.messages[0].data


async def test_archive_write_failure_defers_and_keeps_the_message(
    relay_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient).replace("max_age: 1", "max_age: 60"))
    assert env.relay.archive is not None
    real, calls = env.relay.archive._write_tmp, []

    def failing(job: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(job)

    monkeypatch.setattr(env.relay.archive, "_write_tmp", failing)
    (qid,) = [await env.send(["alice@example.com"], message(1))]
    await env.wait_for(lambda: len(env.legacy.messages) == 1 and len(env.new.messages) == 1)
    await asyncio.sleep(0.05)
    assert qid in env.relay.scheduler.messages  # not gone before its archive copy is
    await env.wait_idle()
    outcomes = [(e["outcome"], e["smtp_code"]) for e in env.events("delivery")
                if e["provider"] == "archive"]  # fmt: skip
    assert outcomes == [("deferred", None), ("delivered", 250)]
    assert not env.events("bounce_sent")
    assert [e.queue_id for e in ArchiveStore(env.cfg.relay.archive.dir).entries()] == [qid]


async def test_archive_disabled_with_archive_deliveries_queued(relay_env: Any) -> None:
    """Queued while the archive was enabled, recovered by a relay without it: final, no DSN."""
    from relay.app import Relay
    from relay.archive.plan import archive_entry
    from relay.records import Envelope, PlanEntry
    from relay.spool import Spool, new_queue_id

    env = await relay_env()
    await env.relay.stop()
    legacy = PlanEntry("zed@example.com", "legacy", "zed@example.com", "primary", None, None,
                       False)  # fmt: skip
    on = env.cfg.relay.archive.model_copy(update={"enabled": True, "scope": "all"})
    plan = (legacy, archive_entry(on, [legacy]))
    assert plan[1] is not None and plan[1].provider == "archive"
    spool, qid = Spool(env.cfg.relay.spool), new_queue_id()
    await spool.start()
    incoming = spool.begin(qid)
    await spool.write(incoming, message(1))
    await spool.commit(incoming, Envelope(qid, "2026-01-01T00:00:00.000Z", time.time(),
                                          "s@example.org", ("zed@example.com",), (), None, None,
                                          10, False, plan, False))  # type: ignore[arg-type]  # fmt: skip
    await spool.stop()
    relay = Relay(env.cfg)
    await relay.start()
    try:
        await env.wait_for(lambda: not relay.scheduler.messages, what="message done")
    finally:
        await relay.stop()
    (event,) = [e for e in env.events("delivery") if e["provider"] == "archive"]
    assert event["outcome"] == "bounced" and "archive disabled" in event["smtp_response"]
    assert not env.events("bounce_sent") and len(env.legacy.messages) == 1


async def test_report_ignores_the_archive_destination(relay_env: Any, tmp_path: Path) -> None:
    from relay.report.logs import build_report

    _, recipient = identity(tmp_path / "keys")
    env = await relay_env(archive_yaml(recipient))
    await archived(env, ["alice@example.com"])
    report = build_report([env.cfg.relay.log])
    assert report.inputs.corrupt_lines == 0 and report.totals.pairs == 1
    assert set(report.providers) == {"legacy", "new"}


async def test_archive_disk_counts_for_min_free_space(
    relay_factory: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    from types import SimpleNamespace

    _, recipient = identity(tmp_path / "keys")
    top = f"archive: {{enabled: true, encrypt_to: [{recipient}]}}\n"
    env = await relay_factory(limits="min_free_space: 1000000\n", top=top)
    archive_dir = env.relay.cfg.relay.archive.dir
    assert env.relay.spool.also_on_disk == (archive_dir,)
    real = os.statvfs

    def statvfs(path: Any) -> Any:
        st = real(path)
        if Path(path) == archive_dir:  # the archive's disk is nearly full, the spool's is not
            return SimpleNamespace(f_bavail=10, f_frsize=st.f_frsize)
        return st

    monkeypatch.setattr(os, "statvfs", statvfs)
    c = await env.client()
    await c.ehlo()
    reply = await c.cmd("MAIL FROM:<s@example.org>")
    assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply


def test_check_warns_when_the_disk_cannot_hold_the_retention(tmp_path: Path) -> None:
    _, recipient = identity(tmp_path / "keys")
    path = write_config(tmp_path / "config", archive_yaml(recipient))
    settings = config.load(path).relay
    store = ArchiveStore(settings.archive.dir)
    store.create()
    from relay.archive.store import Entry

    now = time.time()
    for day in range(3):  # 2 PB a day for the last 3 days: no disk holds 90 days of it
        store.append(Entry(f"Q{day}", "n", "", now - day * 86400, (), (), 2 * 10**15, "", "x", ()))
    warning = capacity_warning(settings, now)
    assert warning and "90 days at the recent" in warning
    assert "warning: archive:" in run("check", "-c", str(path)).output
    small = settings.archive.model_copy(update={"retention_days": 1})
    assert capacity_warning(settings.model_copy(update={"archive": small}), now) is None


def test_start_removes_only_the_half_written_files_of_processes_gone(tmp_path: Path) -> None:
    import os
    import subprocess

    store = ArchiveStore(tmp_path / "archive")
    day = tmp_path / "archive" / "2026-12-01"
    day.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now
    files = {
        "mine": day / f"AAA.{os.getpid()}.tmp",  # a worker of this relay, writing right now
        "gone": day / f"BBB.{gone.pid}.tmp",
        "old": day / "CCC.tmp",
        "done": day / "DDD.age",
    }
    for f in files.values():
        f.write_bytes(b"x")
    store.create()
    assert {k for k, f in files.items() if f.exists()} == {"mine", "done"}
