"""DSN parameters (RFC 3461, SPEC Part 2 "DSN parameters"): taken at the ingress,
stored with the message, passed to a provider that offers DSN (`Provider(dsn=True)`
records what it was sent), NOTIFY=NEVER on shadow copies, and the relay's own DSNs
(failed, delayed, relayed) as NOTIFY, RET, ENVID and ORCPT ask. DSNs are parsed
with `email`. Backoff is skipped with the fake clock.
"""

from __future__ import annotations

import email
import re
from email.message import Message

import aiosmtplib
import pytest

from relay import dsn
from relay.records import Envelope, PlanEntry, StateLine, parse_envelope, parse_state_line
from relay.testing import Provider, Rule
from tests import test_delivery
from tests.harness import RawClient
from tests.test_delivery import SENDER, Env, Factory, copies, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared

pytestmark = pytest.mark.timeout(30)

BODY_MARK = b"the body line only RET=FULL returns"


def content(marker: str) -> bytes:
    return (
        (
            f"Subject: dsn test\r\nMessage-ID: <{marker}@test>\r\nX-Test-Marker: {marker}\r\n\r\n"
        ).encode()
        + BODY_MARK
        + b"\r\n"
    )


async def send(
    env: Env,
    rcpts: dict[str, list[str]],
    mail_options: list[str] = (),  # type: ignore[assignment]
    sender: str = SENDER,
) -> tuple[str, str]:
    """One message with these MAIL parameters and per-recipient RCPT parameters;
    (queue id, marker)."""
    marker = env.marker()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.relay.port, start_tls=False, timeout=10)
    async with smtp:
        await smtp.ehlo()
        await smtp.mail(sender, options=list(mail_options))
        for rcpt, options in rcpts.items():
            await smtp.rcpt(rcpt, options=options)
        reply = await smtp.data(content(marker))
    m = re.search(r"queued as (\S+)", reply.message)
    assert m, reply
    return m.group(1), marker


def dsns(p: Provider) -> list[Message]:
    return [email.message_from_bytes(m.data) for m in p.messages if b"multipart/report" in m.data]


def report_parts(msg: Message) -> tuple[str, list[Message], Message]:
    """(the text part, the delivery-status blocks, the returned part)."""
    assert msg.get_content_type() == "multipart/report"
    human, status, returned = msg.get_payload()  # type: ignore[misc]
    assert status.get_content_type() == "message/delivery-status"
    return human.get_payload(decode=True).decode(), status.get_payload(), returned


# ------------------------------------------------------------------------ ingress


async def test_ehlo_offers_dsn_and_bad_parameters_get_501(make_env: Factory) -> None:
    env = await make_env()
    c = await RawClient.open(env.relay.port)
    assert "DSN" in (await c.ehlo()).lines
    for line in (
        f"MAIL FROM:<{SENDER}> RET=BODY",
        f"MAIL FROM:<{SENDER}> RET=FULL RET=HDRS",
        f"MAIL FROM:<{SENDER}> ENVID=a+zz",  # "+" not followed by two hex digits
        f"MAIL FROM:<{SENDER}> ENVID=a=b",
        f"MAIL FROM:<{SENDER}> ENVID=" + "x" * 101,
        f"MAIL FROM:<{SENDER}> RET",
    ):
        r = await c.cmd(line)
        assert (r.code, r.enhanced) == (501, "5.5.4"), (line, r)
    r = await c.cmd(f"MAIL FROM:<{SENDER}> RET=hdrs ENVID=" + "x" * 100 + " SIZE=100")
    assert r.code == 250, r
    for line in (
        "RCPT TO:<alice@example.com> NOTIFY=NEVER,SUCCESS",
        "RCPT TO:<alice@example.com> NOTIFY=FAILURE,FAILURE",
        "RCPT TO:<alice@example.com> NOTIFY=",
        "RCPT TO:<alice@example.com> ORCPT=alice@example.com",  # no addr-type
        "RCPT TO:<alice@example.com> ORCPT=rfc822;a+2",
    ):
        r = await c.cmd(line)
        assert (r.code, r.enhanced) == (501, "5.5.4"), (line, r)
    r = await c.cmd("RCPT TO:<alice@example.com> notify=success,delay ORCPT=rfc822;A+2Bb@x.test")
    assert r.code == 250, r
    await c.close()


async def test_dsn_parameters_do_not_eat_the_command_line_limit(make_env: Factory) -> None:
    """RFC 3461 §4: MAIL gets 113 more octets for RET and ENVID, RCPT 523 for NOTIFY
    and ORCPT; without them the limits are as before."""
    env = await make_env()
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    local = "a" * (512 - len("MAIL FROM:<@origin.test>") - 2)
    r = await c.cmd(f"MAIL FROM:<{local}@origin.test> RET=FULL ENVID={'e' * 100}")
    assert r.code == 250, r
    r = await c.cmd(f"RCPT TO:<zed@example.com> {'x' * 490}")  # 516 octets: too long
    assert (r.code, r.enhanced) == (500, "5.5.2"), r
    orcpt = "rfc822;" + "o" * 480 + "@example.com"
    r = await c.cmd(f"RCPT TO:<zed@example.com> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}")
    assert r.code == 250, r
    await c.close()


def test_parameters_round_trip_through_the_records() -> None:
    """New keys only when set: a record without them is version 1's, byte for byte."""
    entry = PlanEntry("a@example.com", "legacy", "a@example.com", "primary", None, None, False)
    env = Envelope("Q", "2031-01-01T00:00:00.000Z", 1.0, "s@x.test", ("a@example.com",), (),
                   "127.0.0.1", None, 3, False, (entry,), False)  # fmt: skip
    assert b"notify" not in env.to_json() and b"ret" not in env.to_json()
    with_dsn = Envelope(
        "Q", "2031-01-01T00:00:00.000Z", 1.0, "s@x.test", ("a@example.com",), (), "127.0.0.1",
        None, 3, False,
        (PlanEntry("a@example.com", "legacy", "a@example.com", "primary", None, None, False,
                   "SUCCESS,FAILURE", "rfc822;A@example.com"),),
        False, ret="FULL", envid="id 1",
    )  # fmt: skip
    assert parse_envelope(with_dsn.to_json()) == with_dsn
    line = StateLine(0, "deferred", 2, 5.0, "451 x", warned=True)
    assert parse_state_line(line.to_line(), 1) == line
    assert b'"w"' not in StateLine(0, "deferred", 2, 5.0).to_line()


def test_xtext_round_trip() -> None:
    for value in ("plain", "a+b=c", "spaces and\ttab", "ünï"):
        encoded = dsn.xtext_encode(value)
        assert encoded.isascii() and " " not in encoded
        if value.isascii():
            assert dsn.xtext_decode(encoded, "x") == value


# ------------------------------------------------------------- passed to providers


async def test_parameters_go_to_a_provider_offering_dsn_and_shadows_get_notify_never(
    make_env: Factory,
) -> None:
    env = await make_env(legacy=Provider("legacy", dsn=True), new=Provider("new", dsn=True))
    _, marker = await send(
        env,
        {
            "alice@example.com": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Alice+2BX@Example.com"],
            "zed@example.com": ["NOTIFY=DELAY"],
        },
        ["RET=HDRS", "ENVID=Q+2Bid-1"],
    )
    await env.wait_events(3, outcome="delivered")
    [legacy] = copies(env.legacy, marker)
    assert "RET=HDRS" in legacy.mail_options and "ENVID=Q+2Bid-1" in legacy.mail_options
    assert legacy.rcpt_options == {
        "alice@example.com": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Alice+2BX@Example.com"],
        "zed@example.com": ["NOTIFY=DELAY"],
    }
    [new] = copies(env.new, marker)  # alice's shadow copy: never a DSN to the sender
    assert new.rcpt_options == {
        "alice@example-new.com": ["NOTIFY=NEVER", "ORCPT=rfc822;Alice+2BX@Example.com"]
    }
    assert "RET=HDRS" in new.mail_options
    assert dsns(env.bounce) == []  # the providers report success themselves


async def test_without_parameters_only_the_shadow_gets_notify_never(make_env: Factory) -> None:
    env = await make_env(legacy=Provider("legacy", dsn=True), new=Provider("new", dsn=True))
    _, marker = await send(env, {"alice@example.com": []})
    await env.wait_events(2, outcome="delivered")
    [legacy], [new] = copies(env.legacy, marker), copies(env.new, marker)
    assert legacy.rcpt_options == {"alice@example.com": []}
    assert not any(o.startswith(("RET=", "ENVID=")) for o in legacy.mail_options)
    assert new.rcpt_options == {"alice@example-new.com": ["NOTIFY=NEVER"]}


async def test_no_dsn_parameters_to_a_provider_without_dsn(make_env: Factory) -> None:
    """A provider without DSN answers 555 to any of them (as aiosmtpd does): delivered
    means none was sent, to the primary or to the shadow."""
    env = await make_env()
    _, marker = await send(
        env, {"alice@example.com": ["NOTIFY=FAILURE", "ORCPT=rfc822;alice@example.com"]},
        ["RET=FULL", "ENVID=x"],
    )  # fmt: skip
    await env.wait_events(2, outcome="delivered")
    assert len(copies(env.legacy, marker)) == len(copies(env.new, marker)) == 1
    assert copies(env.new, marker)[0].rcpt_options == {"alice@example-new.com": []}


# --------------------------------------------------------------- the relay's DSNs


async def test_failure_dsn_carries_envid_orcpt_and_the_full_message_for_ret_full(
    make_env: Factory,
) -> None:
    env = await make_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    qid, marker = await send(
        env, {"zed@example.com": ["ORCPT=rfc822;Zed@Example.com"]}, ["RET=FULL", "ENVID=E+2B1"]
    )
    await env.wait_events(1, outcome="bounced")
    await env.bounce.wait_for_messages(1)
    [msg] = dsns(env.bounce)
    _, (per_msg, per_rcpt), returned = report_parts(msg)
    assert per_msg["Original-Envelope-Id"] == "E+1"  # decoded
    assert per_rcpt["Original-Recipient"] == "rfc822;Zed@Example.com"
    assert per_rcpt["Final-Recipient"] == "rfc822; zed@example.com"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.1.1")
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()  # type: ignore[misc]
    assert original["X-Test-Marker"] == marker
    assert BODY_MARK in msg.as_bytes()
    assert [e["rcpt"] for e in env.events("bounce_sent", queue_id=qid)] == ["zed@example.com"]


@pytest.mark.parametrize("ret", [["RET=HDRS"], []], ids=["hdrs", "absent"])
async def test_failure_dsn_returns_headers_only_without_ret_full(
    make_env: Factory, ret: list[str]
) -> None:
    env = await make_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    await send(env, {"zed@example.com": []}, ret)
    await env.bounce.wait_for_messages(1)
    [msg] = dsns(env.bounce)
    _, (per_msg, per_rcpt), returned = report_parts(msg)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Original-Envelope-Id" not in per_msg and "Original-Recipient" not in per_rcpt
    assert BODY_MARK not in msg.as_bytes()


@pytest.mark.parametrize("notify", ["NEVER", "SUCCESS", "DELAY", "SUCCESS,DELAY"])
async def test_no_failure_dsn_unless_notify_asks_for_one(make_env: Factory, notify: str) -> None:
    env = await make_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    qid, _ = await send(env, {"zed@example.com": [f"NOTIFY={notify}"], "yann@example.com": []})
    await env.wait_events(1, outcome="bounced")
    await env.wait_events(1, outcome="delivered", rcpt="yann@example.com")
    await env.idle()
    assert not [d for d in dsns(env.bounce) if "zed@example.com" in d.as_string()]
    assert env.events("bounce_sent", queue_id=qid) == []


async def test_notify_failure_bounces_as_today(make_env: Factory) -> None:
    env = await make_env()
    env.legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 User unknown"))
    await send(env, {"zed@example.com": ["NOTIFY=FAILURE,DELAY"]})
    await env.bounce.wait_for_messages(1)
    _, (_, per_rcpt), _ = report_parts(dsns(env.bounce)[0])
    assert per_rcpt["Action"] == "failed"


async def test_delay_warning_once_after_retry_delay_warning(make_env: Factory) -> None:
    env = await make_env(retry={"schedule": [60], "max_age": 3600, "delay_warning": 100})
    for rcpt in ("zed@example.com", "yann@example.com"):
        env.legacy.add(Rule("defer", rcpt=rcpt, code=451, text="4.2.0 Try later"))
    qid, _ = await send(env, {"zed@example.com": [], "yann@example.com": ["NOTIFY=FAILURE"]})
    await env.wait_events(2, outcome="deferred")  # attempt 1, age 0: no warning yet
    env.clock.advance(70)
    await env.wait_events(4, outcome="deferred")  # attempt 2, age 70
    env.clock.advance(70)
    await env.wait_events(6, outcome="deferred")  # attempt 3, age 140: a warning
    await env.bounce.wait_for_messages(1)
    env.clock.advance(70)
    await env.wait_events(8, outcome="deferred")  # attempt 4: no second warning
    await env.idle()
    [msg] = dsns(env.bounce)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, (_, *blocks), returned = report_parts(msg)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; zed@example.com"]  # not yann
    assert (blocks[0]["Action"], blocks[0]["Status"]) == ("delayed", "4.2.0")
    assert blocks[0]["Will-Retry-Until"]
    assert returned.get_content_type() == "text/rfc822-headers"
    sent = env.events("bounce_sent", queue_id=qid)
    assert [(e["rcpt"], e["action"]) for e in sent] == [("zed@example.com", "delayed")]
    # the warning is recorded with the delivery: no second one after a restart
    state = (env.queue_dir / f"{qid}.state").read_text()
    assert '"w":true' in state


async def test_no_delay_warning_when_delay_warning_is_null(make_env: Factory) -> None:
    env = await make_env(retry={"schedule": [60], "max_age": 3600})
    env.legacy.add(Rule("defer", rcpt="zed@example.com", code=451, text="4.2.0 Try later"))
    await send(env, {"zed@example.com": ["NOTIFY=DELAY"]})
    for n in (1, 2, 3):
        await env.wait_events(n, outcome="deferred")
        env.clock.advance(1000)
    await env.idle()
    assert dsns(env.bounce) == []


async def test_notify_success_to_a_provider_without_dsn_gets_a_relayed_dsn(
    make_env: Factory,
) -> None:
    """RFC 3461 §6.2.6; the shadow copy's success is never reported (the pilot stays
    invisible), and a provider offering DSN reports by itself (tested above)."""
    env = await make_env()
    qid, _ = await send(
        env, {"alice@example.com": ["NOTIFY=SUCCESS", "ORCPT=rfc822;alice@example.com"]},
        ["ENVID=env-7"],
    )  # fmt: skip
    await env.wait_events(2, outcome="delivered")
    await env.bounce.wait_for_messages(1)
    await env.idle()
    [msg] = dsns(env.bounce)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, (per_msg, per_rcpt), returned = report_parts(msg)
    assert per_msg["Original-Envelope-Id"] == "env-7"
    assert per_rcpt["Original-Recipient"] == "rfc822;alice@example.com"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("relayed", "2.0.0")
    assert per_rcpt["Final-Recipient"] == "rfc822; alice@example.com"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert env.bounce.messages[0].mail_from == "" and env.bounce.messages[0].rcpts == [SENDER]
    assert [e.get("action") for e in env.events("bounce_sent", queue_id=qid)] == ["relayed"]


async def test_relayed_dsns_are_not_counted_as_bounces(make_env: Factory, tmp_path) -> None:
    from relay.report.logs import build_report

    env = await make_env()
    await send(env, {"zed@example.com": ["NOTIFY=SUCCESS"]})
    await env.bounce.wait_for_messages(1)
    await env.idle()
    await until(lambda: env.events("bounce_sent"), 5, "bounce_sent")
    report = build_report([env.log_path])
    assert report.totals.bounces_sent == 0
