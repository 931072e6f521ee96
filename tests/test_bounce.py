"""Bounces (RFC 3464 DSN) and forwarding mode, against loopback providers."""

from __future__ import annotations

import base64
import email
import re
from email.message import Message

import aiosmtplib
import pytest

from relay.testing import Rule

pytestmark = pytest.mark.timeout(30)
BODY_MARK = b"the secret body line"
MSG = b"Subject: quarterly figures\r\nMessage-ID: <m1@sender.test>\r\n\r\n" + BODY_MARK + b"\r\n"


def parse_dsn(data: bytes) -> tuple[Message, list[Message], Message]:
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    return msg, status.get_payload(), headers


async def test_primary_rejection_sends_one_dsn_with_rfc3464_fields(relay_env) -> None:
    env = await relay_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    qid = await env.send(["zed@example.com"], MSG, sender="boss@sender.test")
    await env.legacy.wait_for_messages(1)  # the DSN, through legacy's settings (bounce: null)
    await env.wait_idle()
    (dsn,) = env.legacy.messages
    assert dsn.mail_from == "" and dsn.rcpts == ["boss@sender.test"]
    msg, blocks, headers = parse_dsn(dsn.data)
    assert msg["To"] == "boss@sender.test"
    per_msg, per_rcpt = blocks
    assert per_msg["Reporting-MTA"] == "dns; relay.example.com"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; zed@example.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    text = headers.get_payload()
    assert "Subject: quarterly figures" in text and "Message-ID: <m1@sender.test>" in text
    assert BODY_MARK.decode() not in dsn.data.decode()
    sent = env.events("bounce_sent")
    assert [(e["queue_id"], e["rcpt"]) for e in sent] == [(qid, "zed@example.com")]
    assert sent[0]["dsn_queue_id"] != qid


async def test_two_failed_recipients_make_one_dsn(relay_env) -> None:
    env = await relay_env()
    for r in ("zed@example.com", "yann@example.com"):
        env.legacy.add(Rule("reject", rcpt=r, code=550, text="5.1.1 User unknown"))
    await env.send(["zed@example.com", "yann@example.com"], MSG, sender="boss@sender.test")
    await env.legacy.wait_for_messages(1)
    await env.wait_idle()
    assert len(env.legacy.messages) == 1
    _, blocks, _ = parse_dsn(env.legacy.messages[0].data)
    finals = sorted(b["Final-Recipient"] for b in blocks[1:])
    assert finals == ["rfc822; yann@example.com", "rfc822; zed@example.com"]
    assert len(env.events("bounce_sent")) == 2


async def test_no_dsn_for_null_sender(relay_env) -> None:
    env = await relay_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    await env.send(["zed@example.com"], MSG, sender="")
    await env.wait_idle()
    (ev,) = [e for e in env.events("delivery") if e["outcome"] == "bounced"]
    assert ev["rcpt"] == "zed@example.com"
    assert env.legacy.messages == [] and env.events("bounce_sent") == []


async def test_no_dsn_for_shadow_failure(relay_env) -> None:
    env = await relay_env()
    env.new.add(Rule("reject", stage="after_data", code=550, text="5.7.1 Spam"))
    await env.send(["alice@example.com"], MSG, sender="boss@sender.test")
    await env.wait_idle()
    outcomes = {e["provider"]: e["outcome"] for e in env.events("delivery")}
    assert outcomes == {"legacy": "delivered", "new": "bounced"}
    assert len(env.legacy.messages) == 1  # the message itself, no DSN
    assert env.legacy.messages[0].mail_from == "boss@sender.test"
    assert env.events("bounce_sent") == []


async def test_no_dsn_for_a_failed_dsn(relay_env) -> None:
    env = await relay_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    env.legacy.add(Rule("reject", rcpt="boss@sender.test", code=550, text="5.1.1 No such sender"))
    await env.send(["zed@example.com"], MSG, sender="boss@sender.test")
    await env.wait_for(lambda: len(env.events("delivery")) >= 2, what="DSN attempt")
    await env.wait_idle()
    bounced = [e for e in env.events("delivery") if e["outcome"] == "bounced"]
    assert [e["provider"] for e in bounced] == ["legacy", "bounce"]
    assert len(env.events("bounce_sent")) == 1
    assert env.legacy.messages == []


async def test_expired_primary_reports_failure(relay_env) -> None:
    env = await relay_env("retry: {schedule: [0.05], max_age: 0.01}\n")
    env.legacy.add(Rule("defer", rcpt="zed@example.com", code=451, text="4.2.0 Mailbox busy"))
    await env.send(["zed@example.com"], MSG, sender="boss@sender.test")
    await env.legacy.wait_for_messages(1)
    _, blocks, _ = parse_dsn(env.legacy.messages[0].data)
    assert blocks[1]["Status"] == "5.2.0"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.2.0 Mailbox busy"
    outcomes = [e["outcome"] for e in env.events("delivery") if e["provider"] == "legacy"]
    assert outcomes[-1] == "expired" and set(outcomes[:-1]) <= {"deferred"}


FWD = "forward_domains: {fwd.example.com: example.com}\n"


async def test_forwarded_pilot_copy_goes_only_to_new(relay_env) -> None:
    env = await relay_env(FWD)
    await env.send(["alice@fwd.example.com"], MSG)
    await env.new.wait_for_messages(1)
    await env.wait_idle()
    assert env.new.messages[0].rcpts == ["alice@example-new.com"]
    assert env.legacy.messages == []
    (rec,) = env.events("received")
    assert rec["forwarded"] is True
    assert [(p["provider"], p["role"]) for p in rec["plan"]] == [("new", "shadow")]


async def test_forwarded_non_pilot_is_discarded_and_logged(relay_env) -> None:
    env = await relay_env(FWD)
    qid = await env.send(["zed@fwd.example.com", "dave@fwd.example.com"], MSG)
    (d1, d2) = env.events("discarded")
    assert (d1["queue_id"], d1["rcpt"]) == (qid, "zed@fwd.example.com")
    assert d2["rcpt"] == "dave@fwd.example.com"  # legacy-only pilot: legacy holds it
    assert env.relay.scheduler.messages == {}
    assert not list(env.cfg.relay.spool.glob("queue/*.msg"))


async def test_forward_networks_restrict_forward_domains(relay_env) -> None:
    env = await relay_env(FWD + "forward_networks: [192.0.2.0/24]\n")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.port, start_tls=False)
    await smtp.connect()
    await smtp.mail("s@sender.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
        await smtp.rcpt("alice@fwd.example.com")
    assert (exc.value.code, exc.value.message[:5]) == (550, "5.7.1")
    resp = await smtp.rcpt("alice@example.com")  # MX-mode domains stay open to all
    assert resp.code == 250
    await smtp.quit()


async def test_utf8_sender_gets_an_rfc6533_dsn_over_smtputf8(relay_env) -> None:
    env = await relay_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    subject = "Subject: grüße\r\n\r\nhallo\r\n".encode()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.port, start_tls=False)
    await smtp.connect()
    await smtp.sendmail("jörg@exämple.de", ["zed@example.com"], subject,
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])  # fmt: skip
    await smtp.quit()
    await env.legacy.wait_for_messages(1)
    (dsn,) = env.legacy.messages
    assert dsn.mail_from == "" and dsn.rcpts == ["jörg@exämple.de"]
    assert "SMTPUTF8" in dsn.mail_options
    msg = email.message_from_bytes(dsn.data)
    assert msg.get_param("report-type") == "global-delivery-status"
    kinds = [p.get_content_type() for p in msg.get_payload()]
    assert kinds == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    status = raw_part(dsn.data, b"message/global-delivery-status").decode()
    assert "Final-Recipient: utf-8; zed@example.com" in status and "Status: 5.1.1" in status
    assert "grüße" in raw_part(dsn.data, b"message/global-headers").decode()


def raw_part(data: bytes, ctype: bytes) -> bytes:
    """A base64 part's bytes (email parses message/* bodies as messages, so read them raw)."""
    m = re.search(rb"Content-Type: " + ctype + rb".*?\r\n\r\n(.*?)\r\n--", data, re.S)
    assert m, data
    return base64.b64decode(m.group(1))


async def test_dsns_share_legacys_connection_slots_when_bounce_is_null(relay_env) -> None:
    env = await relay_env(legacy_opts=", max_connections: 1")
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    for i in range(8):
        await env.send(["zed@example.com", "yann@example.com"], MSG, sender=f"s{i}@sender.test")
    await env.legacy.wait_for_messages(16)  # 8 for yann, 8 DSNs
    await env.wait_idle()
    assert sum(m.mail_from == "" for m in env.legacy.messages) == 8
    assert env.legacy.connections == 1
