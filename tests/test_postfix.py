"""The relay between real Postfix instances (slow, `-m realservers`): issue 14's
integration suite, with the reply codes and what Postfix logged or stored asserted.

* `postfix`: the providers (tests/postfix_server.py, RECIPES.md "Postfix as a
  provider"): virtual mailboxes, STARTTLS and implicit TLS with a certificate
  from a test CA, SASL AUTH through a private Dovecot, `check_recipient_access`
  450/550 rules, SMTPUTF8; every command its smtpd received is in its log.
  Tests: NOTIFY=NEVER on shadow copies, AUTH right and wrong (one login per
  hold), the TLS modes, 450 then delivered, 550 and who gets a DSN, an outage
  while mail flows, `verify_recipients` (550 / 450 while down / the cache), MX
  failover with it as the third MX of a loopback DNS zone.
* `internet`: a second Postfix relaying into the relay as the internet would:
  the relay's 4xx (a full spool, too many recipients) deferred and delivered on
  its next queue run, the relay's 5xx bounced to its user.

Each instance is private (its own config, queue and log in a temporary folder,
smtpd on a free loopback port) and acted on with `postfix -c DIR`, never the
system's Postfix.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.testing import Provider
from tests import test_delivery
from tests.harness import RawClient, free_port, tmpfs
from tests.helpers_dns import LoopbackDNS
from tests.postfix_server import SASL_PASSWORD, SASL_USER, Build, Postfix, running
from tests.test_delivery import SENDER, Env, Factory, message, until
from tests.test_dsn import dsns, report_parts

make_env = test_delivery.make_env  # the relay-in-process fixture, shared

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.realservers,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        POSTFIX is None or os.geteuid() != 0,
        reason="needs postfix installed (apt-get install postfix) and root to run an instance",
    ),
]
USERS = (
    "alice@example.com", "yann@example.com", "alice@example-new.com",
    "held@example.com", "refused@example.com", "zed@example.com",
    "ann@dev.example.com", "ann@dev.example-new.com", "vera@example.com",
    "jörg@example.com",
)  # fmt: skip


CONTENT_RULES = """\
/^Subject: .*\\[reject-me\\]/ REJECT 5.7.1 Message content rejected
/^Subject: .*\\[defer-me\\]/ REJECT 4.7.1 Try again later
"""  # Postfix's own content filter (header_checks), answered after DATA


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """The legacy provider: mailboxes for USERS, STARTTLS and implicit TLS (a test
    CA), SASL AUTH through Dovecot (offered only over TLS, as a careful admin
    sets it), access rules a test sets, a content filter."""
    build = Build("postfix", USERS, tls=True, sasl=True, header_checks=CONTENT_RULES,
                  main={"smtpd_tls_auth_only": "yes"})  # fmt: skip
    with running(build) as pf:
        yield pf


def at(postfix: Postfix) -> dict[str, object]:
    """Provider settings pointing at the Postfix instance."""
    return {"host": "127.0.0.1", "port": postfix.port}


async def test_shadow_copy_reaches_postfix_with_notify_never(
    make_env: Factory, postfix: Postfix
) -> None:
    """Postfix offers DSN: the primary copy goes as the client sent it (no NOTIFY),
    the shadow copy with NOTIFY=NEVER, as Postfix's own log shows."""
    unused = Provider("unused")  # make_env's providers: replaced by Postfix in the settings
    env = await make_env(
        legacy=unused, new=Provider("unused-new"), legacy_cfg=at(postfix), new_cfg=at(postfix)
    )
    await env.send(["alice@example.com"])
    await env.wait_events(2, outcome="delivered", timeout=30)
    rcpts = [c for c in postfix.commands() if c.upper().startswith("RCPT TO:")]
    assert "RCPT TO:<alice@example-new.com> NOTIFY=NEVER" in rcpts, rcpts
    assert "RCPT TO:<alice@example.com>" in rcpts, rcpts
    await until(lambda: {"alice@example.com", "alice@example-new.com"} <= set(postfix.delivered()),
                30, "both copies in their mailboxes")  # fmt: skip


async def test_verify_recipients_answers_from_postfix(make_env: Factory, postfix: Postfix) -> None:
    env = await make_env(
        legacy=Provider("unused"), new=Provider("unused-new"), legacy_cfg=at(postfix),
        new_cfg=at(postfix), extra={"verify_recipients": True, "verify_timeout": 10},
    )  # fmt: skip
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    unknown = await c.cmd("RCPT TO:<nobody@example.com>")
    assert (unknown.code, unknown.enhanced) == (550, "5.1.1"), unknown
    known = await c.cmd("RCPT TO:<yann@example.com>")
    assert known.code == 250, known
    again = await c.cmd("RCPT TO:<nobody@example.com>")
    assert again.code == 550
    await c.close()
    probes = [c for c in postfix.commands() if c.startswith("RCPT TO:<nobody@example.com>")]
    assert len(probes) == 1  # the repeat came from the cache
    assert "MAIL FROM:<>" in postfix.commands()
    assert re.search(r"reject: RCPT from [^:]+: 550 5\.1\.1 <nobody@example\.com>", postfix.log)


# ------------------------------------------------------------------ helpers


async def at_postfix(
    make_env: Factory, postfix: Postfix, legacy: dict[str, Any] | None = None, **kwargs: Any
) -> Env:
    """A relay whose two providers are this Postfix (legacy with `legacy` keys on top)."""
    return await make_env(
        legacy=Provider("unused"), new=Provider("unused-new"),
        legacy_cfg={**at(postfix), **(legacy or {})}, new_cfg=at(postfix), **kwargs,
    )  # fmt: skip


def stored(postfix: Postfix, user: str, marker: str) -> int:
    """How many messages carrying `marker` are in `user`'s mailbox."""
    needle = f"X-Test-Marker: {marker}\n".encode()  # virtual(8) stores LF line ends
    return sum(needle in m for m in postfix.mailbox(user))


async def rules(postfix: Postfix, access: dict[str, str]) -> None:
    """New access rules, in force once the old smtpd processes are gone (in a
    thread: one of them may be serving a session of the relay in this loop)."""
    await asyncio.to_thread(postfix.access, access)


# ------------------------------------------------------------------ after DATA


@pytest.mark.parametrize(
    ("tag", "outcome", "code", "enhanced"),
    [("reject-me", "bounced", 550, "5.7.1"), ("defer-me", "deferred", 451, "4.7.1")],
)
async def test_postfix_content_filter_after_data(
    make_env: Factory, postfix: Postfix, tag: str, outcome: str, code: int, enhanced: str
) -> None:
    """Postfix's header_checks refuse both copies of a pilot's message after DATA:
    each provider's outcome is Postfix's reply; only the primary's final refusal
    makes a DSN."""
    env = await at_postfix(make_env, postfix)
    marker = env.marker()
    data = message(marker).replace(b"Subject: test", f"Subject: [{tag}] test".encode())
    await env.send(["alice@example.com"], data=data)
    events = await env.wait_events(2, timeout=30, outcome=outcome)
    assert {(e["provider"], e["smtp_code"], e["enhanced_code"]) for e in events} == {
        ("legacy", code, enhanced), ("new", code, enhanced),
    }  # fmt: skip
    assert len(re.findall(rf"reject: header Subject: \[{tag}\] test {marker}", postfix.log)) == 2
    await env.idle()
    dsn = env.events("bounce_sent")
    assert [e["rcpt"] for e in dsn] == (["alice@example.com"] if outcome == "bounced" else [])
    assert stored(postfix, "alice@example.com", marker) == 0


async def test_over_postfixs_size_limit_is_refused_at_mail_and_bounced(
    make_env: Factory, postfix: Postfix
) -> None:
    """11 MB, over Postfix's 10240000 (its advertised SIZE), under the relay's own
    limit: Postfix refuses it at MAIL (the relay sends SIZE=); a final refusal,
    so a DSN."""
    env = await at_postfix(make_env, postfix)
    sent = await env.send(["yann@example.com"], body=(b"y" * 998 + b"\r\n") * 11_000)
    [e] = await env.wait_events(1, timeout=30, provider="legacy")
    assert (e["outcome"], e["smtp_code"], e["enhanced_code"]) == ("bounced", 552, "5.3.4"), e
    assert re.search(
        r"NOQUEUE: reject: MAIL from [^:]+: 552 5\.3\.4 Message size exceeds", postfix.log
    )
    await env.wait_events(1, timeout=30, event="bounce_sent")
    assert stored(postfix, "yann@example.com", sent.marker) == 0


# ------------------------------------------------------------------ DSN and SMTPUTF8


async def test_dsn_parameters_reach_postfix_as_the_client_gave_them(
    make_env: Factory, postfix: Postfix
) -> None:
    """RET, ENVID (xtext), NOTIFY and ORCPT (xtext) on the primary copy as the
    client sent them; the shadow copy with NOTIFY=NEVER; Postfix takes both."""
    env = await at_postfix(make_env, postfix)
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    marker = env.marker()
    mail = f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=q+3D1+2B2"
    assert (await c.cmd(mail)).code == 250
    rcpt = "RCPT TO:<alice@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;alice+2Btag@example.com"
    assert (await c.cmd(rcpt)).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(message(marker) + b".\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    await env.wait_events(2, timeout=30, outcome="delivered")
    commands = postfix.commands()
    mails = [
        c
        for c in commands
        if c.startswith("MAIL FROM:<sender@example.org>") and "ENVID=q+3D1+2B2" in c
    ]
    assert len(mails) == 2 and all(" RET=HDRS " in f"{m} " for m in mails), mails
    assert (
        "RCPT TO:<alice@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;alice+2Btag@example.com"
        in commands
    )
    assert (
        "RCPT TO:<alice@example-new.com> NOTIFY=NEVER ORCPT=rfc822;alice+2Btag@example.com"
        in commands
    )
    for user in ("alice@example.com", "alice@example-new.com"):
        await until(lambda u=user: stored(postfix, u, marker) == 1, 30, f"stored for {user}")


async def test_smtputf8_message_reaches_a_utf8_mailbox(make_env: Factory, postfix: Postfix) -> None:
    env = await at_postfix(make_env, postfix)
    sent = await env.send(["jörg@example.com"], sender="jörg@example.org", options=["SMTPUTF8"])
    [e] = await env.wait_events(1, timeout=30, outcome="delivered")
    assert e["delivered_to"] == "jörg@example.com"
    [mail] = [c for c in postfix.commands() if c.startswith("MAIL FROM:<jörg@example.org>")]
    assert "SMTPUTF8" in mail.split()[2:], mail
    await until(lambda: stored(postfix, "jörg@example.com", sent.marker) == 1, 30, "stored")


# ------------------------------------------------------------------ AUTH (Dovecot SASL)


@pytest.mark.parametrize("mechanism", ["plain", "login"])
async def test_auth_right_is_delivered_and_postfix_logs_the_login(
    make_env: Factory, postfix: Postfix, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    monkeypatch.setenv("RELAY_PF_PW", SASL_PASSWORD)
    login = {"username": SASL_USER, "password_env": "RELAY_PF_PW", "auth_mechanism": mechanism,
             "tls": "required", "ca_file": str(postfix.ca_file)}  # fmt: skip
    env = await at_postfix(make_env, postfix, login)
    sent = await env.send(["yann@example.com"])
    [e] = await env.wait_events(1, timeout=30, provider="legacy", outcome="delivered")
    assert (e["smtp_code"], e["enhanced_code"]) == (250, "2.0.0"), e
    # Postfix's own record of the message: who logged in, with which mechanism
    qid = e["remote_id"]
    assert re.search(
        rf"{qid}: client=[^,]+, sasl_method={mechanism.upper()}, sasl_username={SASL_USER}$",
        postfix.log,
        re.M,
    ), postfix.log[-3000:]
    await until(lambda: stored(postfix, "yann@example.com", sent.marker), 30, "stored")


async def test_auth_wrong_is_one_535_per_hold_and_the_password_is_never_logged(
    make_env: Factory,
    postfix: Postfix,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Three messages queued behind a wrong password: Postfix answers 535 to one
    login per `auth_failure_hold`, not one per message; once the password is
    right, all three go."""
    monkeypatch.setenv("RELAY_PF_PW", "not-the-password")
    failures = re.compile(r"SASL PLAIN authentication failed")
    before = len(failures.findall(postfix.log))
    ended = re.compile(r" auth=0/1 quit=1 ")  # a session summary: login failed, then QUIT
    quits = len(ended.findall(postfix.log))
    env = await at_postfix(
        make_env, postfix,
        {"username": SASL_USER, "password_env": "RELAY_PF_PW", "auth_failure_hold": 300,
         "tls": "starttls"},
    )  # fmt: skip
    sent = [await env.send(["yann@example.com"]) for _ in range(3)]
    [e] = await env.wait_events(1, timeout=30, provider="legacy")
    assert (e["outcome"], e["smtp_code"], e["enhanced_code"]) == ("deferred", 535, "5.7.8"), e
    await until(
        lambda: len(failures.findall(postfix.log)) == before + 1, 30, "Postfix's 535 logged"
    )
    await env.idle()
    assert len(env.events(provider="legacy")) == 1  # the others wait out the hold untried
    env.clock.advance(299)
    await env.idle()
    assert len(env.events(provider="legacy")) == 1
    env.clock.advance(2)  # the hold is over: one more login, one more 535
    await env.wait_events(2, timeout=30, provider="legacy", outcome="deferred")
    await env.idle()
    assert len(env.events(provider="legacy")) == 2
    await until(lambda: len(failures.findall(postfix.log)) == before + 2, 30, "a second 535")
    monkeypatch.setenv("RELAY_PF_PW", SASL_PASSWORD)
    env.clock.advance(400)
    await env.wait_events(3, timeout=30, provider="legacy", outcome="delivered")
    assert len(failures.findall(postfix.log)) == before + 2
    assert len(ended.findall(postfix.log)) == quits + 2
    for s in sent:
        await until(lambda s=s: stored(postfix, "yann@example.com", s.marker) == 1, 30, "stored")
    assert "not-the-password" not in env.log_path.read_text()
    assert SASL_PASSWORD not in env.log_path.read_text()
    out, err = capfd.readouterr()
    assert "not-the-password" not in out + err and SASL_PASSWORD not in out + err


async def test_auth_not_offered_without_tls_is_held_not_sent_in_clear(
    make_env: Factory, postfix: Postfix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postfix offers AUTH only after STARTTLS; a relay set to `tls: none` with a
    username never sends the password in clear: the relay's own deferral, then
    the hold."""
    monkeypatch.setenv("RELAY_PF_PW", SASL_PASSWORD)
    login = {"username": SASL_USER, "password_env": "RELAY_PF_PW", "auth_failure_hold": 300}
    before = len(postfix.commands())
    env = await at_postfix(make_env, postfix, login)
    for _ in range(2):
        await env.send(["yann@example.com"])
    [e] = await env.wait_events(1, timeout=30, provider="legacy")
    assert (e["outcome"], e["smtp_code"], e["by"]) == ("deferred", None, "relay"), e
    assert e["smtp_response"] == "AUTH not offered by the provider"
    await env.idle()
    assert len(env.events(provider="legacy")) == 1  # held: the second is not tried
    # (a QUIT of the previous test's relay may be logged late: only the end is ours)
    verbs = [c.split()[0].upper() for c in postfix.commands()[before:]]
    assert verbs[-2:] == ["EHLO", "QUIT"] and "AUTH" not in verbs, verbs


# ------------------------------------------------------------------ TLS


@pytest.mark.parametrize(
    ("mode", "host"),
    [("starttls", "127.0.0.1"), ("required", "127.0.0.1"), ("required", "localhost"),
     ("implicit", "127.0.0.1")],
)  # fmt: skip
async def test_tls_modes_against_postfix(
    make_env: Factory, postfix: Postfix, mode: str, host: str
) -> None:
    """Each TLS mode against Postfix's certificate from a test CA (`ca_file`);
    verified against the name in `host:`, an address (its IP SAN) or a name."""
    cfg: dict[str, Any] = {"tls": mode, "ca_file": str(postfix.ca_file), "host": host}
    if mode == "implicit":
        cfg["port"] = postfix.tls_port
    established = re.compile(r"smtpd\[\d+\]: Anonymous TLS connection established from")
    before = len(established.findall(postfix.log))
    env = await at_postfix(make_env, postfix, cfg)
    sent = await env.send(["yann@example.com"])
    [e] = await env.wait_events(1, timeout=30, provider="legacy", outcome="delivered")
    assert e["tls"] in ("TLSv1.2", "TLSv1.3"), e
    await until(lambda: len(established.findall(postfix.log)) > before, 30, "Postfix's TLS line")
    await until(lambda: stored(postfix, "yann@example.com", sent.marker), 30, "stored")


async def test_tls_required_without_the_ca_is_the_relays_deferral(
    make_env: Factory, postfix: Postfix
) -> None:
    """Postfix's certificate comes from a CA the relay does not know: never sent in clear."""
    env = await at_postfix(make_env, postfix, {"tls": "required"})
    sent = await env.send(["yann@example.com"])
    [e] = await env.wait_events(1, timeout=30, provider="legacy")
    assert (e["outcome"], e["smtp_code"], e["by"]) == ("deferred", None, "relay"), e
    assert "certificate verify failed" in e["smtp_response"], e
    await env.idle()
    assert stored(postfix, "yann@example.com", sent.marker) == 0


# ------------------------------------------------------------------ 450 / 550 rules


async def test_450_rule_defers_then_delivers_once_removed(
    make_env: Factory, postfix: Postfix
) -> None:
    await rules(postfix, {"held@example.com": "450 4.2.1 Mailbox busy, try later"})
    try:
        env = await at_postfix(make_env, postfix)
        sent = await env.send(["held@example.com"])
        [e] = await env.wait_events(1, timeout=30, provider="legacy")
        assert (e["outcome"], e["smtp_code"], e["enhanced_code"]) == ("deferred", 450, "4.2.1"), e[
            "smtp_response"
        ]
        assert re.search(r"reject: RCPT from [^:]+: 450 4\.2\.1 <held@example\.com>", postfix.log)
    finally:
        await rules(postfix, {})
    env.clock.advance(100)  # past the first retry, jitter included
    [_, e] = await env.wait_events(2, timeout=30, provider="legacy")
    assert (e["outcome"], e["attempt"]) == ("delivered", 2), (e["smtp_response"], e["smtp_code"])
    await until(lambda: stored(postfix, "held@example.com", sent.marker) == 1, 30, "stored")
    assert env.bounce.messages == []


async def test_550_rule_bounces_to_the_sender_for_legacy_not_for_the_shadow(
    make_env: Factory, postfix: Postfix
) -> None:
    await rules(postfix, {
        "refused@example.com": "550 5.7.1 Not accepted here",
        "ann@dev.example-new.com": "550 5.7.1 Not accepted here",
    })  # fmt: skip
    try:
        env = await at_postfix(make_env, postfix)
        sent = await env.send(["refused@example.com", "ann@dev.example.com"])
        events = await env.wait_events(3, timeout=30)
    finally:
        await rules(postfix, {})
    outcome = {
        (e["provider"], e["delivered_to"]): (e["outcome"], e["smtp_code"])
        for e in events
        if e["provider"] != "bounce"
    }
    assert outcome == {
        ("legacy", "refused@example.com"): ("bounced", 550),
        ("legacy", "ann@dev.example.com"): ("delivered", 250),
        ("new", "ann@dev.example-new.com"): ("bounced", 550),
    }
    [dsn] = await env.wait_events(1, timeout=30, event="bounce_sent")
    assert dsn["rcpt"] == "refused@example.com"  # the shadow copy's refusal: no DSN
    await env.bounce.wait_for_messages(1, timeout=30)
    [m] = env.bounce.messages
    assert m.rcpts == [SENDER] and m.mail_from == ""
    [dsn] = dsns(env.bounce)
    _, [_, status], _ = report_parts(dsn)
    assert status["Final-Recipient"] == "rfc822; refused@example.com"
    assert " ".join(status["Diagnostic-Code"].split()) == (
        "smtp; 550 5.7.1 <refused@example.com>: Recipient address rejected: Not accepted here"
    )  # Postfix's reply, as it said it
    await env.idle()
    assert len(env.bounce.messages) == 1
    await until(lambda: stored(postfix, "ann@dev.example.com", sent.marker) == 1, 30, "stored")


# ------------------------------------------------------------------ outage


async def test_legacy_outage_while_mail_flows(make_env: Factory, postfix: Postfix) -> None:
    """30 messages over one session while Postfix is stopped after the 10th and
    started again after the 20th: every one accepted with 250 ends up in the
    mailbox, once (or twice, where the stop cut the reply to "."); the ones sent
    while it was down were deferred first."""
    env = await at_postfix(make_env, postfix)
    rcpt = "zed@example.com"
    sent: list[tuple[str, str]] = []  # (queue id, marker)

    def ids(outcome: str) -> set[str]:
        return {e["queue_id"] for e in env.events(outcome=outcome)}

    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.relay.port, timeout=30)
    async with smtp:
        for i in range(30):
            if i == 10:
                # Postfix stores to the mailbox after its 250, in a process of its own
                # that the stop can cut mid-write (its queue then delivers a second
                # copy after the start): it stops once it has stored what it accepted
                # (the same race as tests/test_exim.py's outage test)
                before = {q for q, _ in sent}
                await until(lambda b=before: b <= ids("delivered"), 30, "first ten delivered")
                for q, m in sent:
                    await until(lambda m=m: stored(postfix, rcpt, m) == 1, 30, f"{q} stored")
                await asyncio.to_thread(postfix.stop)
            if i == 20:  # the ones sent during the outage were tried, and deferred
                down = {q for q, _ in sent[10:]}
                await until(lambda d=down: d <= ids("deferred"), 30, "deferrals while it is down")
                await asyncio.to_thread(postfix.start)
            marker = env.marker()
            errors, reply = await smtp.sendmail(SENDER, [rcpt], message(marker))
            assert errors == {} and reply.startswith("2.0.0 Ok: queued as "), reply
            sent.append((reply.rsplit(" ", 1)[1], marker))
    env.clock.advance(100)  # past the first retry, jitter included
    every = {q for q, _ in sent}
    await until(lambda: every <= ids("delivered"), 60, "every message delivered")
    for q, marker in sent:
        await until(lambda m=marker: stored(postfix, rcpt, m), 30, f"{q} stored")
    # Stored once; twice only where the reply to the final "." was lost (Postfix
    # killed after queueing it): the relay must then send again (RFC 5321 §6.1,
    # RFC 1047), never risk losing it.
    lost = {e["queue_id"] for e in env.events(outcome="deferred")
            if "at after_data" in e["smtp_response"]}  # fmt: skip
    copies = {q: stored(postfix, rcpt, m) for q, m in sent}
    assert {q: n for q, n in copies.items() if n != 1 and not (q in lost and n == 2)} == {}
    deferred = env.events(outcome="deferred")
    assert all(e["smtp_code"] is None for e in deferred), deferred  # no reply: nobody there
    assert len(env.events(outcome="delivered")) == 30


# ------------------------------------------------------------------ verification


async def test_verify_refuses_unknown_users_at_rcpt_450_while_down_cache_survives(
    make_env: Factory, postfix: Postfix, tmp_path: Path
) -> None:
    """`reject_unverified_recipient` against a real Postfix: 550 for a user it does
    not have (at RCPT: never accepted, so never bounced), 250 for one it has, 450
    while it is down for an address not in the cache; the cache (kept across a
    restart of the relay) answers a repeat without a second probe; a 4xx is
    450 and never cached."""
    verify = {"verify_recipients": True, "verify_timeout": 10}
    root = tmp_path / "verifying"
    env = await at_postfix(make_env, postfix, root=root, extra=verify)

    def probes(address: str) -> int:
        return postfix.commands().count(f"RCPT TO:<{address}>")

    async def answers(*addresses: str) -> list[tuple[int, str | None]]:
        c = await RawClient.open(env.relay.port)
        await c.ehlo()
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        out = []
        for a in addresses:
            r = await c.cmd(f"RCPT TO:<{a}>", timeout=15)
            out.append((r.code, r.enhanced))
        await c.close()
        return out

    asked = (probes("vera@example.com"), probes("ghost@example.com"))
    assert await answers("vera@example.com", "ghost@example.com") == [
        (250, "2.1.5"), (550, "5.1.1"),
    ]  # fmt: skip
    once = (asked[0] + 1, asked[1] + 1)
    assert (probes("vera@example.com"), probes("ghost@example.com")) == once
    await asyncio.to_thread(postfix.stop)
    try:
        assert await answers("vera@example.com", "ghost@example.com", "wraith@example.com") == [
            (250, "2.1.5"), (550, "5.1.1"), (450, "4.1.1"),
        ]  # fmt: skip
    finally:
        await asyncio.to_thread(postfix.start)
    await env.relay.stop()
    env = await at_postfix(make_env, postfix, root=root, extra=verify)  # same spool and cache
    assert await answers("vera@example.com", "ghost@example.com") == [
        (250, "2.1.5"), (550, "5.1.1"),
    ]  # fmt: skip
    assert (probes("vera@example.com"), probes("ghost@example.com")) == once
    # a message for both: the unknown one refused at RCPT, the known one delivered
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.relay.port, timeout=30)
    marker = env.marker()
    async with smtp:
        errors, _ = await smtp.sendmail(
            SENDER, ["vera@example.com", "ghost@example.com"], message(marker)
        )
    assert {r: e.code for r, e in errors.items()} == {"ghost@example.com": 550}
    await env.wait_events(1, timeout=30, outcome="delivered")
    await until(lambda: stored(postfix, "vera@example.com", marker), 30, "stored")
    await env.idle()
    assert env.events("bounce_sent") == [] and env.bounce.messages == []
    assert [e["rcpt"] for e in env.events()] == ["vera@example.com"]
    # a 4xx from Postfix is `450 4.1.1` and not kept: asked again, the answer is new
    held = probes("held@example.com")  # the 450 delivery test sent it too
    await rules(postfix, {"held@example.com": "450 4.2.1 Mailbox busy, try later"})
    try:
        assert await answers("held@example.com") == [(450, "4.1.1")]
    finally:
        await rules(postfix, {})
    assert await answers("held@example.com") == [(250, "2.1.5")]
    assert probes("held@example.com") == held + 2


# ------------------------------------------------------------------ the internet's MTA


@dataclass
class Internet:
    """A second Postfix, relaying everything not its own into the relay's port."""

    mta: Postfix
    relay_port: int  # where the relay under test must listen

    def listen(self) -> dict[str, Any]:
        return {"listen": {"host": "127.0.0.1", "port": self.relay_port, "hostname": "relay.test"}}

    def said(self, rcpt: str, status: str, reply: str, command: str) -> bool:
        """Whether its log says the relay answered `reply` (a regex) to `command`
        for `rcpt`, and that it made `status` of it (deferred, bounced)."""
        line = (
            rf"to=<{re.escape(rcpt)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{self.relay_port}, .*"
            rf"status={status} \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: {reply} .*"
            rf"\(in reply to {command} command\)\)"
        )
        return re.search(line, self.mta.log) is not None

    async def submit(self, rcpts: list[str], marker: str, how: str = "smtp") -> None:
        """A message from its user sender@internet.test, submitted over SMTP (or
        with its sendmail command)."""
        if how == "sendmail":
            await asyncio.to_thread(self.mta.sendmail, ORIGIN, rcpts, message(marker))
            return
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.mta.port, timeout=30)
        async with smtp:
            errors, _ = await smtp.sendmail(ORIGIN, rcpts, message(marker))
        assert errors == {}, errors


ORIGIN = "sender@internet.test"


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    port = free_port()
    build = Build("internet", [ORIGIN], relayhost=f"[127.0.0.1]:{port}",
                  main={"debug_peer_list": ""})  # fmt: skip
    with running(build) as mta:
        yield Internet(mta, port)


@pytest.mark.parametrize("how", ["smtp", "sendmail"])
async def test_internet_postfix_delivers_through_the_relay_to_both_providers(
    make_env: Factory, postfix: Postfix, internet: Internet, how: str
) -> None:
    env = await at_postfix(make_env, postfix, extra=internet.listen())
    marker = env.marker()
    before = len(internet.mta.statuses("alice@example.com"))
    await internet.submit(["alice@example.com"], marker, how)
    await until(lambda: internet.mta.statuses("alice@example.com")[before:] == ["sent"], 30,
                "sent")  # fmt: skip
    [e] = await env.wait_events(1, timeout=30, event="received")
    assert re.search(
        rf"to=<alice@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{internet.relay_port},"
        rf".* status=sent \(250 2\.0\.0 Ok: queued as {e['queue_id']}\)",
        internet.mta.log,
    ), internet.mta.log[-2000:]
    assert e["mail_from"] == ORIGIN and e["client_ip"] == "127.0.0.1"
    await env.wait_events(2, timeout=30, outcome="delivered")
    for user in ("alice@example.com", "alice@example-new.com"):
        await until(lambda u=user: stored(postfix, u, marker) == 1, 30, f"stored for {user}")
    [copy] = [m for m in postfix.mailbox("alice@example.com") if marker.encode() in m]
    assert b"by mx.internet.test (Postfix" in copy  # the hop before the relay


async def test_relay_4xx_full_spool_is_deferred_by_postfix_and_delivered_later(
    make_env: Factory, postfix: Postfix, internet: Internet, tmp_path: Path
) -> None:
    """The relay's spool disk is below `min_free_space`: `452 4.3.1` at MAIL, and
    the sending Postfix keeps the message; once there is room, a queue run
    (`postqueue -f`) delivers it."""
    root = tmp_path / "full"
    need = 8 << 20
    with tmpfs(root / "var", "16m"):
        filler = root / "var" / "filler"
        filler.write_bytes(b"\0" * (12 << 20))
        extra = {**internet.listen(), "limits": {"min_free_space": need}}
        env = await at_postfix(make_env, postfix, root=root, extra=extra)
        marker = env.marker()
        await internet.submit(["yann@example.com"], marker)
        await until(lambda: internet.mta.statuses("yann@example.com")[-1:] == ["deferred"],
                    30, "deferred by Postfix")  # fmt: skip
        assert internet.said("yann@example.com", "deferred", r"452 4\.3\.1", "MAIL FROM")
        assert env.events("received") == []
        filler.unlink()

        # the relay looks at the disk again after a second (has_room caches it)
        async def room() -> None:
            while not await env.relay.spool.has_room(need):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(room(), 10)
        await asyncio.to_thread(internet.mta.flush)
        await until(lambda: internet.mta.statuses("yann@example.com")[-1:] == ["sent"],
                    30, "sent on the queue run")  # fmt: skip
        await env.wait_events(1, timeout=30, outcome="delivered")
        await until(lambda: stored(postfix, "yann@example.com", marker) == 1, 30, "stored")
        await env.relay.stop()


async def test_relay_5xx_is_bounced_by_postfix_to_its_sender(
    make_env: Factory, postfix: Postfix, internet: Internet, tmp_path: Path
) -> None:
    """A foreign domain (`550 5.7.1`) and an unknown user (`550 5.1.1`, the
    recipients file): the sending Postfix bounces both to its user, in one
    bounce; the good recipient of the same message is delivered."""
    root = tmp_path / "relay-r"
    (root / "config").mkdir(parents=True)
    (root / "config" / "recipients.txt").write_text("yann@example.com\n")
    env = await at_postfix(make_env, postfix, root=root,
                           extra={**internet.listen(), "recipients": "recipients.txt"})  # fmt: skip
    marker = env.marker()
    before = len(internet.mta.statuses("yann@example.com"))  # other tests' deliveries
    await internet.submit(
        ["stranger@elsewhere.test", "nobody@example.com", "yann@example.com"], marker
    )
    for rcpt, code in (
        ("stranger@elsewhere.test", r"550 5\.7\.1"),
        ("nobody@example.com", r"550 5\.1\.1"),
    ):
        await until(lambda r=rcpt: internet.mta.statuses(r) == ["bounced"], 30, f"{rcpt} bounced")
        assert internet.said(rcpt, "bounced", code, "RCPT TO")
    await until(lambda: internet.mta.statuses("yann@example.com")[before:] == ["sent"], 30, "sent")
    await until(lambda: stored(postfix, "yann@example.com", marker) == 1, 30, "stored")
    await until(
        lambda: [m for m in internet.mta.mailbox(ORIGIN) if marker.encode() in m], 30, "bounce"
    )
    [bounce] = [m for m in internet.mta.mailbox(ORIGIN) if marker.encode() in m]
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx.internet.test>" in bounce
    assert b"Diagnostic-Code: smtp; 550 5.7.1 Relaying denied" in bounce
    assert b"Diagnostic-Code: smtp; 550 5.1.1 User unknown" in bounce
    assert b"Final-Recipient: rfc822; stranger@elsewhere.test" in bounce
    assert b"Final-Recipient: rfc822; nobody@example.com" in bounce
    rejected = {e["rcpt"]: e["enhanced_code"] for e in env.events("rejected")}
    assert rejected == {"stranger@elsewhere.test": "5.7.1", "nobody@example.com": "5.1.1"}


# ------------------------------------------------------------------ MX failover

MX_ZONE = """
legacy-mx.test.     300 IN MX 10 mx1.legacy-mx.test.
legacy-mx.test.     300 IN MX 20 mx2.legacy-mx.test.
legacy-mx.test.     300 IN MX 30 mx3.legacy-mx.test.
mx1.legacy-mx.test. 300 IN A 127.0.0.2
mx2.legacy-mx.test. 300 IN A 127.0.0.3
mx3.legacy-mx.test. 300 IN A 127.0.0.1
"""


class Broken:
    """A host that takes each connection and closes it before any greeting
    (a crashed smtpd behind a live port), counting the connections."""

    def __init__(self) -> None:
        self.connections = 0

    async def serve(self, address: str, port: int) -> asyncio.Server:
        async def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        return await asyncio.start_server(drop, address, port)


@pytest.fixture
async def broken_mx(postfix: Postfix) -> AsyncIterator[tuple[Broken, Broken]]:
    """mx1 and mx2 of legacy-mx.test, on Postfix's port at 127.0.0.2 and 127.0.0.3."""
    hosts = (Broken(), Broken())
    addresses = ("127.0.0.2", "127.0.0.3")
    servers = [await h.serve(a, postfix.port) for h, a in zip(hosts, addresses, strict=True)]
    yield hosts
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_mx_failover_first_two_down_delivers_through_postfix_then_skips_them(
    make_env: Factory, postfix: Postfix, broken_mx: tuple[Broken, Broken]
) -> None:
    """SPEC acceptance with a real third MX: `mx:` with three MX hosts, the first
    two failing at connect; the message goes through the third (Postfix), and the
    next message, on a new connection, skips the dead ones."""
    mx1, mx2 = broken_mx
    with LoopbackDNS(MX_ZONE) as dns:
        legacy = {"host": None, "mx": "legacy-mx.test", "dead_host_time": 3600}
        env = await at_postfix(make_env, postfix, legacy, extra={
            "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 2},
        })  # fmt: skip
        markers = []
        for n in (1, 2):
            sent = await env.send(["yann@example.com"])
            markers.append(sent.marker)
            [*_, e] = await env.wait_events(n, timeout=30, provider="legacy")
            assert (e["outcome"], e["attempt"]) == ("delivered", 1), e
            assert re.search(rf"{e['remote_id']}: client=localhost\[127\.0\.0\.1\]", postfix.log)
            await env.idle()
            await env.relay.scheduler.agent.close()  # the next message: a new connection
            assert (mx1.connections, mx2.connections) == (1, 1)  # tried once, then skipped
        assert dns.queries[("legacy-mx.test", "MX")] >= 1
    for m in markers:
        await until(lambda m=m: stored(postfix, "yann@example.com", m) == 1, 30, "stored")


async def test_relay_452_too_many_recipients_postfix_sends_the_rest_on_its_next_run(
    make_env: Factory, postfix: Postfix, internet: Internet
) -> None:
    """Over `limits.max_recipients` (2): `452 4.5.3` for the third recipient, which
    the sending Postfix defers and delivers on its next queue run; each
    recipient's copy stored once."""
    limits = {"min_free_space": 0, "max_recipients": 2}
    env = await at_postfix(make_env, postfix, extra={**internet.listen(), "limits": limits})
    marker = env.marker()
    rcpts = ["vera@example.com", "yann@example.com", "zed@example.com"]  # Postfix sorts them
    before = {r: len(internet.mta.statuses(r)) for r in rcpts}

    def since(r: str) -> list[str]:
        return internet.mta.statuses(r)[before[r] :]

    await internet.submit(rcpts, marker)
    await until(lambda: [since(r) for r in rcpts] == [["sent"], ["sent"], ["deferred"]], 30,
                "two sent, one deferred")  # fmt: skip
    assert internet.said(
        "zed@example.com", "deferred", r"452 4\.5\.3 Too many recipients", "RCPT TO"
    )
    await asyncio.to_thread(internet.mta.flush)
    await until(lambda: since("zed@example.com") == ["deferred", "sent"], 30, "sent on the run")
    for r in rcpts:
        await until(lambda r=r: stored(postfix, r, marker) == 1, 30, f"{r} stored")
    received = env.events("received")
    assert sorted(e["rcpts"] for e in received) == [
        ["vera@example.com", "yann@example.com"], ["zed@example.com"],
    ]  # fmt: skip
