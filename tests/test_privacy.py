"""Pseudonyms (relay.privacy), `log_privacy: hash`, the log's `config` header, `relay hash`."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay import config
from relay.cli import cli
from relay.log import DeliveryLog
from relay.privacy import KEY_ENV, Pseudonymizer, PseudonymKeyMissing
from relay.report.logs import build_report
from tests.conftest import write_config

KEY = "k3y for the tests"


def expected_token(local: str, key: str = KEY) -> str:
    """HMAC-SHA-256 of the lowercased local part, first 10 hex digits (SPEC Part 2)."""
    return hmac.new(key.encode(), local.lower().encode(), hashlib.sha256).hexdigest()[:10]


def test_addresses_and_message_ids() -> None:
    p = Pseudonymizer(KEY.encode())
    token = expected_token("alice")
    assert p.address("Alice@Example.COM") == f"{token}@example.com"
    assert p.address("alice@example.com") == p.address("ALICE@example.com")
    assert p.address("") == ""  # the null sender stays the null sender
    assert p.address("postmaster") == expected_token("postmaster")
    assert p.message_id("<m1.x@sender.test>") == f"<{expected_token('m1.x')}@sender.test>"
    assert Pseudonymizer(b"another key").address("alice@example.com") != p.address(
        "alice@example.com"
    )
    text = p.text("550 5.1.1 <alice@example.com>: user alice unknown (bob@x.test)", ["alice"])
    assert "alice" not in text and "bob@" not in text
    assert f"<{token}@example.com>" in text and f"user {token} unknown" in text
    with pytest.raises(PseudonymKeyMissing):
        Pseudonymizer.from_env({})


def test_an_event_keeps_its_shape_and_loses_its_addresses() -> None:
    p = Pseudonymizer(KEY.encode())
    ev: dict[str, Any] = {
        "queue_id": "Q1", "message_id": "<id1@sender.test>", "mail_from": "s@sender.test",
        "client_ip": "192.0.2.1", "rcpts": ["alice@example.com"],
        "plan": [{"rcpt": "alice@example.com", "provider": "new",
                  "delivered_to": "alice@example-new.com", "role": "shadow", "group": "sales"}],
        "smtp_response": "250 2.6.0 <id1@sender.test> [InternalId=1] Queued mail for delivery",
    }  # fmt: skip
    out = p.event(ev)
    assert set(out) == set(ev) and out["queue_id"] == "Q1" and out["client_ip"] == "192.0.2.1"
    assert out["plan"][0]["group"] == "sales" and out["plan"][0]["role"] == "shadow"
    flat = json.dumps(out)
    assert "alice" not in flat and "id1" not in flat and "s@sender" not in flat
    assert out["message_id"] == p.message_id("<id1@sender.test>")
    assert out["message_id"] in out["smtp_response"]  # the quoted Message-ID, hashed alike
    assert ev["rcpts"] == ["alice@example.com"]  # the caller's event is left alone


def test_log_writes_a_header_per_file_and_hashes_events(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    header = {
        "version": "x",
        "providers": {"legacy": {"label": "Zoho Mail"}},
        "log_privacy": "hash",
    }
    seen: list[dict[str, Any]] = []
    log = DeliveryLog(path, "n1", header=header, privacy=Pseudonymizer(KEY.encode()))
    log.observers.append(lambda event, fields: seen.append(fields))
    log.emit("deleted", queue_id="B", rcpt="alice@example.com", provider="legacy")
    path.rename(tmp_path / "d.jsonl.1")
    log.reopen()  # SIGUSR1 after logrotate: the new file starts with the header too
    log.emit("bounce_sent", queue_id="B", rcpt="alice@example.com", dsn_queue_id="C")
    log.close()
    old = [json.loads(x) for x in (tmp_path / "d.jsonl.1").read_text().splitlines()]
    new = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["event"] for e in old] == ["config", "deleted"]
    assert [e["event"] for e in new] == ["config", "bounce_sent"]
    assert (old[0]["reason"], new[0]["reason"]) == ("start", "reopen")
    assert old[0]["providers"] == {"legacy": {"label": "Zoho Mail"}} and old[0]["node"] == "n1"
    assert old[1]["rcpt"] == new[1]["rcpt"] == f"{expected_token('alice')}@example.com"
    assert seen[0]["rcpt"] == "alice@example.com"  # metrics see the event as it was


def relay_yaml(extra: str = "") -> str:
    return (
        "domains: [example.com, dev.example.com]\n"
        "providers:\n  legacy: {label: Zoho Mail}\n  new: {label: Microsoft 365}\n" + extra
    )


def test_config_keys_and_the_missing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.load(write_config(tmp_path, relay_yaml("log_privacy: hash\n")))
    assert cfg.relay.providers.legacy.label == "Zoho Mail" and cfg.relay.log_privacy == "hash"
    monkeypatch.delenv(KEY_ENV, raising=False)
    (issue,) = config.missing_secrets(cfg)
    assert issue.key == "log_privacy" and KEY_ENV in str(issue) and issue.line == 5
    res = CliRunner().invoke(cli, ["check", "-c", str(tmp_path / "relay.yaml")])
    assert res.exit_code == 0 and f"warning: {tmp_path / 'relay.yaml'}:5: log_privacy" in res.output
    res = CliRunner().invoke(cli, ["serve", "-c", str(tmp_path / "relay.yaml")])
    assert res.exit_code == 1 and KEY_ENV in res.output  # refused before starting anything
    monkeypatch.setenv(KEY_ENV, KEY)
    assert config.missing_secrets(cfg) == []
    bad = write_config(tmp_path / "bad", relay_yaml("log_privacy: scramble\n"))
    with pytest.raises(config.ConfigError, match="log_privacy: unknown value 'scramble'"):
        config.load(bad)


def test_relay_hash_command() -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["hash", "Alice@Example.com", "<id1@sender.test>"],
                        env={KEY_ENV: KEY})  # fmt: skip
    assert res.exit_code == 0
    assert res.output.splitlines() == [
        f"{expected_token('alice')}@example.com",
        f"<{expected_token('id1')}@sender.test>",
    ]
    res = runner.invoke(cli, ["hash", "alice@example.com"], env={KEY_ENV: ""})
    assert res.exit_code == 2 and KEY_ENV in res.output


async def test_a_relay_with_hashed_logs_and_labels(
    relay_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running relay writes the header and hashes; the report reads both back."""
    monkeypatch.setenv(KEY_ENV, KEY)
    env = await relay_env("log_privacy: hash\n", legacy_opts=", label: Zoho Mail")
    qid = await env.send(["alice@example.com", "zed@example.com"],
                         b"Message-ID: <m1@sender.test>\r\nSubject: t\r\n\r\nhi\r\n")  # fmt: skip
    await env.wait_idle()
    events = env.events()
    header = events[0]
    assert header["event"] == "config" and header["log_privacy"] == "hash"
    assert header["providers"] == {"legacy": {"label": "Zoho Mail"}, "new": {"label": None}}
    flat = json.dumps(events)
    assert (
        "alice" not in flat and "zed@" not in flat and "m1@" not in flat and "sender@" not in flat
    )
    (received,) = env.events("received")
    alice = f"{expected_token('alice')}@example.com"
    assert received["queue_id"] == qid and alice in received["rcpts"]
    assert {e["rcpt"] for e in env.events("delivery")} == {
        alice,
        f"{expected_token('zed')}@example.com",
    }
    rep = build_report([env.cfg.relay.log])
    assert rep.labels == {"legacy": "Zoho Mail", "new": "new"}
    assert [u.name for u in rep.users] == [alice]
    assert rep.comparison.joined["both_delivered"] == 1
