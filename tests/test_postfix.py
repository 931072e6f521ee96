"""A real Postfix as both providers (slow): what it saw of the relay's DSN parameters
(its smtpd logs every command of a debug peer) and its answers to verification probes.

A private instance (as /work/shared anchors' pf_instance.sh, RECIPES.md "Postfix
as a provider"): its own config, queue and log under a temporary folder, smtpd on
a free loopback port, virtual mailboxes for the users it has. Stopped with
`postfix -c DIR stop`, which acts on that instance only.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from relay.testing import Provider
from tests import test_delivery
from tests.harness import RawClient
from tests.postfix_server import SASL_PASSWORD, SASL_USER, Build, Postfix, running
from tests.test_delivery import SENDER, Env, Factory, until
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
    "ann@dev.example.com", "ann@dev.example-new.com",
)  # fmt: skip


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """The legacy provider: mailboxes for USERS, STARTTLS and implicit TLS (a test
    CA), SASL AUTH through Dovecot, access rules a test sets."""
    with running(Build("postfix", USERS, tls=True, sasl=True)) as pf:
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


# ------------------------------------------------------------------ AUTH (Dovecot SASL)


async def test_auth_right_is_delivered_and_postfix_logs_the_login(
    make_env: Factory, postfix: Postfix, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_PF_PW", SASL_PASSWORD)
    env = await at_postfix(
        make_env, postfix, {"username": SASL_USER, "password_env": "RELAY_PF_PW"}
    )
    sent = await env.send(["yann@example.com"])
    [e] = await env.wait_events(1, timeout=30, provider="legacy", outcome="delivered")
    assert (e["smtp_code"], e["enhanced_code"]) == (250, "2.0.0"), e
    # Postfix's own record of the message: who logged in, with which mechanism
    qid = e["remote_id"]
    assert re.search(
        rf"{qid}: client=[^,]+, sasl_method=PLAIN, sasl_username={SASL_USER}$", postfix.log, re.M
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
    env = await at_postfix(
        make_env, postfix,
        {"username": SASL_USER, "password_env": "RELAY_PF_PW", "auth_failure_hold": 300},
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
    for s in sent:
        await until(lambda s=s: stored(postfix, "yann@example.com", s.marker) == 1, 30, "stored")
    assert "not-the-password" not in env.log_path.read_text()
    assert SASL_PASSWORD not in env.log_path.read_text()
    out, err = capfd.readouterr()
    assert "not-the-password" not in out + err and SASL_PASSWORD not in out + err


# ------------------------------------------------------------------ TLS


@pytest.mark.parametrize("mode", ["starttls", "required", "implicit"])
async def test_tls_modes_against_postfix(make_env: Factory, postfix: Postfix, mode: str) -> None:
    cfg: dict[str, Any] = {"tls": mode, "ca_file": str(postfix.ca_file)}
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
