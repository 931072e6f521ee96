"""A real Exim 4.96 as the `new` provider (slow; `pytest -m realservers`): every TLS mode,
its `250 OK id=...`, its bare `452 too many recipients`, its multi-line refusals, and
an outage while mail flows, asserted on the relay's delivery log and on what Exim
logged (mainlog, rejectlog) and stored (its maildirs).

The relay runs in-process (test_delivery's `make_env`, with a fake clock for
retries); `legacy` is a loopback `Provider` stand-in. The Exim instance
(tests/exim.py) is shared by the module; switches turn its STARTTLS and
SMTPUTF8 off per test. The fidelity matrix through Exim is in test_fidelity.py.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest

from relay.testing import Provider
from tests import exim as exim_helpers
from tests import test_delivery
from tests.exim import Exim
from tests.harness import RawClient
from tests.test_delivery import SENDER, Env, Factory, copies, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared
exim_fixture = exim_helpers.exim_fixture

pytestmark = [pytest.mark.slow, pytest.mark.realservers, pytest.mark.timeout(120)]


async def with_exim(make_env: Factory, exim: Exim, tls: str = "none", **keys: Any) -> Env:
    """A relay whose `new` is Exim (legacy a stand-in; make_env's `new` stand-in unused)."""
    return await make_env(new=Provider("unused-new"), new_cfg=exim.settings(tls, **keys))


def message(tag: str, extra: str = "") -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <alice@example.com>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@exim.test>\r\nX-Test-Marker: {tag}\r\n{extra}\r\nhello {tag}\r\n"
    ).encode()


def arrivals(exim: Exim, tag: str) -> list[str]:
    """Exim's `<=` lines for the message with Message-ID <tag@exim.test>."""
    return [line for line in exim.mainlog.splitlines() if f" id={tag}@exim.test " in line]


def exim_id(line: str) -> str:
    """The Exim message id of a mainlog line (after the time stamp)."""
    return line.split()[2]


TLS_CASES = {
    # mode, an Exim switch → the `tls` field, Exim's P= (protocol)
    "none": ("none", None, None, "esmtp"),
    "starttls": ("starttls", None, "TLSv1.3", "esmtps"),
    "starttls-not-offered": ("starttls", "no-starttls", None, "esmtp"),
    # opportunistic as Postfix's "may": plaintext on the same connection after a refused
    # STARTTLS, on a new one after a failed handshake
    "starttls-refused": ("starttls", "broken-tls", None, "esmtp"),
    "starttls-handshake-fails": ("starttls", "client-cert", None, "esmtp"),
    "required": ("required", None, "TLSv1.3", "esmtps"),
    "implicit": ("implicit", None, "TLSv1.3", "esmtps"),
}
TLS_ERRORS = {  # what Exim logs about its side of a failed STARTTLS
    "broken-tls": "(cert/key setup: cert=",
    "client-cert": "(gnutls_handshake): Certificate is required.",
}


@pytest.mark.parametrize("case", TLS_CASES)
async def test_tls_mode_against_exim(make_env: Factory, exim: Exim, case: str) -> None:
    """Each mode as Exim saw it: TLS or not in its `<=` line (P=, X= cipher), the relay's
    `tls` field, and `remote_id` equal to the id Exim logged (its `250 OK id=...`).
    `starttls` verifies nothing: the suite's test CA is not given to it."""
    mode, switch, tls, protocol = TLS_CASES[case]
    env = await with_exim(make_env, exim, mode)
    tag = env.marker()
    tls_error = f"TLS error on connection from (relay.test) [127.0.0.1] {TLS_ERRORS.get(switch)}"
    tls_errors = exim.mainlog.count(tls_error)
    with exim.switch(switch) if switch else contextlib.nullcontext():
        await env.send(["alice@example.com"], data=message(tag))
        [event] = await env.wait_events(1, provider="new", outcome="delivered", timeout=30)
    [line] = arrivals(exim, tag)
    assert event["tls"] == tls
    assert event["remote_id"] == exim_id(line), (event, line)
    assert f"OK id={exim_id(line)}" in event["smtp_response"]
    assert f" P={protocol} " in line, line
    assert (" X=TLS1.3:" in line) == (tls is not None), line
    assert " for alice@example-new.com" in line
    [copy] = await exim.stored("alice@example-new.com", f"<{tag}@exim.test>".encode())
    assert f"\tid {exim_id(line)}\r\n".encode() in copy
    if switch in TLS_ERRORS:  # this test's own failed STARTTLS, as Exim saw it
        await until(lambda: exim.mainlog.count(tls_error) > tls_errors, 10, "Exim's TLS error")


@pytest.mark.parametrize("switch", ["broken-tls", "client-cert"])
async def test_tls_required_failing_starttls_defers(
    make_env: Factory, exim: Exim, switch: str
) -> None:
    """Under `tls: required`, Exim's refused STARTTLS (its 454) or a failed handshake is
    a deferral, never plaintext: nothing reached Exim."""
    env = await with_exim(make_env, exim, "required")
    tag = env.marker()
    with exim.switch(switch):
        await env.send(["alice@example.com"], data=message(tag))
        [event] = await env.wait_events(1, provider="new", outcome="deferred", timeout=30)
    if switch == "broken-tls":
        assert (event["smtp_code"], event["smtp_response"]) == (454, "TLS currently unavailable")
    else:
        assert (event["smtp_code"], event["by"]) == (None, "relay"), event
        assert event["smtp_response"].startswith("TLS failed: "), event
    assert arrivals(exim, tag) == []
    assert env.bounce.messages == []


async def test_tls_required_without_starttls_defers_then_delivers(
    make_env: Factory, exim: Exim
) -> None:
    """Exim not offering STARTTLS under `tls: required`: deferred with the relay's reason
    (never plaintext, never a bounce), nothing reached Exim; offered again, delivered."""
    env = await with_exim(make_env, exim, "required")
    tag = env.marker()
    with exim.switch("no-starttls"):
        sent = await env.send(["alice@example.com"], data=message(tag))
        [event] = await env.wait_events(1, provider="new", outcome="deferred", timeout=30)
    assert (event["smtp_code"], event["by"]) == (None, "relay"), event
    assert event["smtp_response"] == "STARTTLS not offered (tls: required)"
    assert arrivals(exim, tag) == []
    assert f"{sent.queue_id}.msg" in env.queue_files()
    env.clock.advance(67)  # past the first retry
    [done] = await env.wait_events(1, provider="new", outcome="delivered", timeout=30)
    assert (done["attempt"], done["tls"]) == (2, "TLSv1.3")
    [line] = arrivals(exim, tag)
    assert " X=TLS1.3:" in line and done["remote_id"] == exim_id(line)
    assert env.bounce.messages == []


async def test_tls_required_with_an_unknown_ca_defers(make_env: Factory, exim: Exim) -> None:
    """A certificate the relay cannot verify (the system CAs do not know the test CA):
    deferred by the relay, and Exim logged the aborted handshake."""
    env = await with_exim(make_env, exim, "required", ca_file=None)
    tag = env.marker()
    aborted = (
        "TLS error on connection from (relay.test) [127.0.0.1] (gnutls_handshake): "
        "The TLS connection was non-properly terminated."
    )
    before = exim.mainlog.count(aborted)
    await env.send(["alice@example.com"], data=message(tag))
    [event] = await env.wait_events(1, provider="new", outcome="deferred", timeout=30)
    assert event["by"] == "relay" and "certificate verify failed" in event["smtp_response"]
    assert arrivals(exim, tag) == []
    await until(lambda: exim.mainlog.count(aborted) > before, 10, "Exim's log of the handshake")


async def test_bare_452_too_many_recipients_sends_the_rest_at_once(
    make_env: Factory, exim: Exim
) -> None:
    """Five recipients, Exim's recipients_max 3: `452 too many recipients` (no enhanced
    code) for two, which go in a second transaction at once, without a retry wait."""
    assert exim_helpers.RECIPIENTS_MAX == 3
    env = await with_exim(make_env, exim)
    tag = env.marker()
    rcpts = [f"r{i}@dev.example.com" for i in range(1, 6)]
    await env.send(rcpts, data=message(tag))
    delivered = await env.wait_events(5, provider="new", outcome="delivered", timeout=30)
    deferred = env.events(provider="new", outcome="deferred")
    assert sorted(e["rcpt"] for e in deferred) == rcpts[3:]
    assert {(e["smtp_code"], e["enhanced_code"], e["smtp_response"]) for e in deferred} == {
        (452, None, "too many recipients")
    }
    assert {e["rcpt"]: e["attempt"] for e in delivered} == {
        r: 1 if r in rcpts[:3] else 2 for r in rcpts
    }
    first, second = arrivals(exim, tag)
    assert first.endswith(
        " for r1@dev.example-new.com r2@dev.example-new.com r3@dev.example-new.com"
    )
    assert second.endswith(" for r4@dev.example-new.com r5@dev.example-new.com")
    assert {e["remote_id"] for e in delivered} == {exim_id(first), exim_id(second)}
    for i in range(1, 6):
        await exim.stored(f"r{i}@dev.example-new.com", f"<{tag}@exim.test>".encode())


@pytest.mark.parametrize("role", ["new", "legacy"])
async def test_exim_down_while_mail_flows_loses_nothing(
    make_env: Factory, exim: Exim, role: str
) -> None:
    """Exim (as `new`, or as `legacy` with the primary copies) stopped between messages:
    its copies are deferred and stay queued while the other provider's go on; after
    Exim's restart and the retry each is in its maildir exactly once, no DSN sent."""
    if role == "new":
        env, other, mailbox = await with_exim(make_env, exim), "legacy", "alice@example-new.com"
    else:
        env = await make_env(legacy=Provider("unused-legacy"), legacy_cfg=exim.settings())
        other, mailbox = "new", "alice@example.com"
    before = [env.marker() for _ in range(3)]
    during = [env.marker() for _ in range(3)]
    for tag in before:
        await env.send(["alice@example.com"], data=message(tag))
    await env.wait_events(3, provider=role, outcome="delivered", timeout=30)
    # Exim delivers to the maildir after its 250, in a process of its own that the
    # stop would kill (and with no queue runner the message would stay in its
    # queue): it stops once it has stored what it accepted
    for tag in before:
        await exim.stored(mailbox, f"<{tag}@exim.test>".encode())
    exim.stop()
    try:
        queued = [(await env.send(["alice@example.com"], data=message(t))).queue_id for t in during]
        deferred = await env.wait_events(3, provider=role, outcome="deferred", timeout=30)
        assert {(e["smtp_code"], e["smtp_response"]) for e in deferred} == {
            (None, f"SMTPConnectError at connect: Error connecting to 127.0.0.1 on port {exim.port}"
                   f": [Errno 111] Connect call failed ('127.0.0.1', {exim.port})")
        }  # fmt: skip
        await env.wait_events(6, provider=other, outcome="delivered", timeout=30)
        assert sorted({f.split(".")[0] for f in env.queue_files()}) == sorted(queued)
    finally:
        exim.start()
    env.clock.advance(67)
    await env.wait_events(6, provider=role, outcome="delivered", timeout=30)
    await until(lambda: env.queue_files() == [], 10, "queue emptied")
    for tag in before + during:
        await exim.stored(mailbox, f"<{tag}@exim.test>".encode())
        assert len(arrivals(exim, tag)) == 1
    assert env.bounce.messages == []


async def test_verify_recipients_asks_exim(make_env: Factory, exim: Exim) -> None:
    """`verify_recipients` with Exim as legacy (the primary of non-pilots and dual pilots):
    its answers at RCPT (`MAIL FROM:<>` probes, as its rejectlog shows) become the relay's,
    a repeat comes from the cache."""
    env = await make_env(
        legacy=Provider("unused-legacy"), legacy_cfg=exim.settings(),
        extra={"verify_recipients": True, "verify_timeout": 10},
    )  # fmt: skip
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<zed@example.com>")).code == 250
    unknown = await c.cmd("RCPT TO:<nobody@example.com>")
    assert (unknown.code, unknown.enhanced) == (550, "5.1.1"), unknown
    refused = await c.cmd("RCPT TO:<refused@example.com>")  # Exim: a two-line 550 5.7.1
    assert (refused.code, refused.enhanced) == (550, "5.1.1"), refused
    assert (await c.cmd("RCPT TO:<nobody@example.com>")).code == 550
    await c.close()
    rejected = re.findall(r"F=<> rejected RCPT <([^>]+)>: (.*)", exim.read("rejectlog"))
    assert rejected.count(("nobody@example.com", "5.1.1 unknown user")) == 1  # then the cache
    assert ("refused@example.com", "5.7.1 refused by policy: first line") in rejected


async def test_multiline_refusal_at_rcpt_of_a_shadow_copy(make_env: Factory, exim: Exim) -> None:
    """Exim's ACL refuses the shadow copy's recipient with a two-line 550: bounced at new,
    both lines in the logged reason, no DSN to the sender (SPEC: a shadow failure is
    logged only); the primary copy at legacy delivered."""
    env = await with_exim(make_env, exim)
    tag = env.marker()
    await env.send(["refused@dev.example.com"], data=message(tag))
    [event] = await env.wait_events(1, provider="new", outcome="bounced", timeout=30)
    assert (event["role"], event["smtp_code"], event["enhanced_code"]) == ("shadow", 550, "5.7.1")
    assert event["smtp_response"] == (
        "5.7.1 refused by policy: first line\nsecond line of the refusal"
    )
    await env.wait_events(1, provider="legacy", outcome="delivered", timeout=30)
    await env.idle()
    assert env.bounce.messages == []
    assert re.search(
        r"F=<sender@example\.org> rejected RCPT <refused@dev\.example-new\.com>: "
        r"5\.7\.1 refused by policy: first line",
        exim.read("rejectlog"),
    )


async def test_multiline_refusal_at_data_bounces_the_primary_only(
    make_env: Factory, exim: Exim
) -> None:
    """One transaction at Exim for a shadow (alice) and a primary (bob, new-only) copy,
    refused after DATA with a two-line 550: both bounced, one DSN, for bob only,
    quoting Exim's reply."""
    env = await with_exim(make_env, exim)
    tag = env.marker()
    await env.send(
        ["alice@example.com", "bob@example.com"], data=message(tag, "X-Test-Deny: yes\r\n")
    )
    events = await env.wait_events(2, provider="new", outcome="bounced", timeout=30)
    assert {(e["rcpt"], e["role"]) for e in events} == {
        ("alice@example.com", "shadow"), ("bob@example.com", "primary")
    }  # fmt: skip
    assert {e["smtp_response"] for e in events} == {
        "5.7.1 content refused: first line\nsecond line of the refusal"
    }
    await env.bounce.wait_for_messages(1, timeout=30)
    await env.idle()
    [dsn] = env.bounce.messages
    assert dsn.mail_from == "" and dsn.rcpts == [SENDER]
    assert b"Final-Recipient: rfc822; bob@example.com" in dsn.data
    assert dsn.data.count(b"Final-Recipient:") == 1  # none for alice's shadow copy
    assert b"Diagnostic-Code: smtp; 550 5.7.1 content refused: first line" in dsn.data
    assert re.search(r"rejected after DATA: 5\.7\.1 content refused: first line", exim.mainlog)
    assert copies(env.legacy, tag) != []  # alice's primary copy went to legacy


async def test_smtputf8_not_offered_by_exim(make_env: Factory, exim: Exim) -> None:
    """Exim without SMTPUTF8 (smtputf8_advertise_hosts empty): an ASCII message sent with
    SMTPUTF8 goes without the parameter; one with a UTF-8 address is the relay's 5.6.7,
    and as a shadow copy it bounces no DSN."""
    env = await with_exim(make_env, exim)
    ascii_tag, utf8_tag = env.marker(), env.marker()
    with exim.switch("no-smtputf8"):
        await env.send(["alice@example.com"], data=message(ascii_tag), options=["SMTPUTF8"])
        await env.send(["jürgen@dev.example.com"], data=message(utf8_tag), options=["SMTPUTF8"])
        [ok] = await env.wait_events(1, provider="new", outcome="delivered", timeout=30)
        [refused] = await env.wait_events(1, provider="new", outcome="bounced", timeout=30)
    [line] = arrivals(exim, ascii_tag)
    assert " P=esmtp " in line and ok["remote_id"] == exim_id(line)
    assert (refused["rcpt"], refused["enhanced_code"], refused["by"]) == (
        "jürgen@dev.example.com", "5.6.7", "relay"
    )  # fmt: skip
    assert arrivals(exim, utf8_tag) == []
    await env.wait_events(2, provider="legacy", outcome="delivered", timeout=30)
    await env.idle()
    assert env.bounce.messages == []


@pytest.mark.parametrize("dsn", [True, False], ids=["dsn-offered", "no-dsn"])
async def test_shadow_copy_failing_inside_exim_bounces_only_without_dsn(
    make_env: Factory, exim: Exim, dsn: bool
) -> None:
    """Exim accepts the shadow copy, then fails the mailbox in routing. Offering DSN,
    it got NOTIFY=NEVER and makes no bounce; without DSN the relay cannot ask, and
    Exim bounces to the sender (the limit SPEC's "when its provider offers DSN" means)."""
    env = await with_exim(make_env, exim)
    tag = env.marker()
    with exim.switch("dsn") if dsn else contextlib.nullcontext():
        await env.send(["disabled@dev.example.com"], data=message(tag))
        [event] = await env.wait_events(1, provider="new", outcome="delivered", timeout=30)
    [line] = arrivals(exim, tag)
    ident = exim_id(line)
    failed = await until(
        lambda: [x for x in exim.log_of(ident) if f" {ident} ** disabled@dev.example-new.com" in x],
        30, "Exim's failure of the address",
    )  # fmt: skip
    assert "R=disabled: 5.2.1 mailbox disabled" in failed[0]
    ignored = (
        f" {ident} disabled@dev.example-new.com: "
        "error ignored: RFC 3461 DSN, failure notify not requested"
    )
    bounce = f" <= <> R={ident} "
    await until(lambda: any(" Completed" in x for x in exim.log_of(ident)), 30, "Completed")
    if dsn:
        assert any(ignored in x for x in exim.log_of(ident)), exim.log_of(ident)
        assert bounce not in exim.mainlog
    else:  # Exim's bounce to the sender is logged after the original's Completed
        await until(lambda: bounce in exim.mainlog, 30, "Exim's bounce to the sender")
        assert not any(ignored in x for x in exim.log_of(ident))
    assert event["remote_id"] == ident and env.bounce.messages == []
