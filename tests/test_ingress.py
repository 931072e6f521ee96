"""Ingress against a real in-process relay, spoken to over raw sockets.

One test (or one parametrized test) per row of SPEC's reply table, the relay
tricks, durability order, spool contents, pipelining, STARTTLS, hot reload,
shutdown and the 50 MB memory bound.
"""

# ruff: noqa: F811 - the relay_factory fixture is imported, then named as a parameter
from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.ingress import policy
from relay.ingress.protocol import RelaySMTP
from relay.testing import Provider
from tests.conftest import PILOTS, read_content
from tests.harness import tmpfs, write_relay
from tests.helpers_ingress import (
    HOSTNAME,
    NODE,
    RawClient,
    RelayEnv,
    RelayFactory,
    dead_port,
    ingress_settings,
    relay_factory,  # noqa: F401
    spool_messages,
)

pytestmark = pytest.mark.timeout(20)
SENDER = "sender@origin.test"
BODY = b"Subject: hello\r\nMessage-ID: <m1@origin.test>\r\n\r\nbody line\r\n"


def stored(env: RelayEnv, qid: str) -> bytes:
    return read_content(env.relay.spool, qid)


def queue_id(reply: Any) -> str:
    m = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", reply.text)
    assert reply.code == 250 and m, reply
    return m.group(1)


def nothing_stored(env: RelayEnv) -> bool:
    return list(env.spool_queue.glob("*.msg")) == [] and list(env.spool_queue.glob("*.tmp")) == []


def rejected(env: RelayEnv) -> list[tuple[str, int, str]]:
    return [(e["stage"], e["smtp_code"], e["enhanced_code"]) for e in env.events("rejected")]


def expect(reply: Any, code: int, enhanced: str | None, text: str | None = None) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced), str(reply)
    if text is not None:
        assert text in reply.text, str(reply)


async def ready(env: RelayEnv, rcpts: list[str] | None = None) -> RawClient:
    """A client after EHLO, MAIL and RCPT."""
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    for r in ["alice@example.com"] if rcpts is None else rcpts:
        expect(await c.cmd(f"RCPT TO:<{r}>"), 250, "2.1.5")
    return c


async def send_data(c: RawClient, wire: bytes) -> Any:
    """DATA, then `wire` as given (dot-stuffed by the caller) and the final dot."""
    expect(await c.cmd("DATA"), 354, None)
    await c.send(wire + b".\r\n")
    return await c.reply()


# -- EHLO and enhanced status codes -------------------------------------------------


async def test_ehlo_lists_the_extensions(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_message_size: 1234567\n")
    c = await env.client()
    assert c.greeting is not None and c.greeting.code == 220
    r = await c.ehlo()
    assert r.lines[0] == HOSTNAME
    assert set(r.lines[1:]) >= {"SIZE 1234567", "8BITMIME", "SMTPUTF8", "PIPELINING",
                                "ENHANCEDSTATUSCODES"}  # fmt: skip
    assert not any(x.startswith(("STARTTLS", "AUTH")) for x in r.lines)


async def test_the_ehlo_reply_is_one_write(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every line of the EHLO reply goes out in one write (aiosmtpd wrote one per
    line: seven more writes, and as many wake-ups of the client, per session).
    `write_raw` is the engine's one call of the transport's write."""
    from relay.ingress.engine import SMTPEngine

    env = await relay_factory()
    writes: list[bytes] = []
    original = SMTPEngine.write_raw

    async def write(self: SMTPEngine, data: bytes) -> None:
        writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(SMTPEngine, "write_raw", write)
    c = await env.client()
    writes.clear()
    r = await c.ehlo()
    replies = [w for w in writes if w.startswith(b"250")]
    assert len(replies) == 1 and replies[0].count(b"\r\n") == len(r.lines) > 5, writes


async def test_every_reply_after_ehlo_carries_an_enhanced_code(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await env.client()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 503, "5.5.1")  # before EHLO
    await c.ehlo()
    script = [
        ("NOOP", 250, "2.0.0"),
        ("RSET", 250, "2.0.0"),
        ("VRFY alice@example.com", 252, "2.0.0"),
        ("HELP", 250, "2.0.0"),
        ("RCPT TO:<alice@example.com>", 503, "5.5.1"),  # no MAIL yet
        ("DATA", 503, "5.5.1"),
        ("AUTH PLAIN AGFsaWNlAHNlY3JldA==", 503, "5.5.1"),
        ("STARTTLS", 454, "4.7.0"),  # no certificate configured
        ("XYZZY", 500, "5.5.1"),
        ("", 500, "5.5.2"),
        ("MAIL FROM:", 501, "5.5.4"),
        ("MAIL TO:<a@b.test>", 501, "5.5.4"),
        (f"MAIL FROM:<{SENDER}> BODY=BINARYMIME", 501, "5.5.4"),
        (f"MAIL FROM:<{SENDER}> FOO=BAR", 555, "5.5.4"),
        (f"MAIL FROM:<{SENDER}> SIZE=abc", 501, "5.5.4"),
        (f"MAIL FROM:<{SENDER}> BODY=8BITMIME SMTPUTF8", 250, "2.1.0"),
        (f"MAIL FROM:<{SENDER}>", 503, "5.5.1"),  # nested
        # NOTIFY is accepted since the DSN extension (SPEC Part 2); other parameters are not
        ("RCPT TO:<alice@example.com> FOO=BAR", 555, "5.5.4"),
        ("RCPT TO:<alice@example.com> NOTIFY=SOMETIMES", 501, "5.5.4"),
        ("RCPT TO:", 501, "5.5.4"),
        ("RCPT TO:<alice@example.com>", 250, "2.1.5"),
        ("DATA now", 501, "5.5.4"),
        ("RSET", 250, "2.0.0"),
        ("QUIT", 221, "2.0.0"),
    ]
    for line, code, enhanced in script:
        expect(await c.cmd(line), code, enhanced)
    assert await c.closed()


async def test_helo_session_works_and_help_lists_the_commands(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await env.client()
    r = await c.cmd("HELO old.client.test")
    assert (r.code, r.text) == (250, HOSTNAME)  # RFC 2034: no enhanced code on HELO/EHLO
    help_ = await c.cmd("HELP")
    for word in ("DATA", "EHLO", "HELO", "MAIL", "NOOP", "QUIT", "RCPT", "RSET"):
        assert word in help_.text.split()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=10"), 501, "5.5.4")  # no ESMTP params
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<alice@example.com>"), 250, "2.1.5")
    qid = queue_id(await send_data(c, BODY))
    assert b"with SMTP id " + qid.encode() in stored(env, qid)


# -- accepted message --------------------------------------------------------------


async def test_accepted_message_is_stored_with_two_headers_and_logged(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()
    c = await ready(env)
    content = (
        b"Subject: fidelity\r\nMessage-ID: <fid@origin.test>\r\nX-8bit: caf\xc3\xa9\r\n\r\n"
        b".leading dot (stuffed on the wire)\r\n" + b"L" * 20000 + b"\r\n\r\n\tindented\r\n"
    )
    wire = content.replace(b"\r\n.", b"\r\n..")
    reply = await send_data(c, wire)
    expect(reply, 250, "2.0.0")
    qid = queue_id(reply)
    assert list(spool_messages(env.spool_queue)) == [qid]  # exactly one message
    data = stored(env, qid)
    head = re.match(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby relay\.test \(relay\) with ESMTP id (\w+)\r\n"
        rb"\tfor <alice@example\.com>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
        rb"X-Relay-Trace: test-node (\w+)\r\n",
        data,
    )
    assert head and head.group(1) == head.group(2) == qid.encode()
    assert data[head.end() :] == content  # nothing else changed
    env_rec = env.relay.spool.load(qid).envelope
    assert env_rec.mail_from == SENDER and env_rec.rcpts == ("alice@example.com",)
    assert [(p.provider, p.delivered_to, p.role) for p in env_rec.plan] == [
        ("legacy", "alice@example.com", "primary"),
        ("new", "alice@example-new.com", "shadow"),
    ]
    (ev,) = env.events("received")
    assert ev["queue_id"] == qid and ev["node"] == NODE
    assert ev["message_id"] == "<fid@origin.test>" and ev["mail_from"] == SENDER
    assert ev["client_ip"] == "127.0.0.1" and ev["size"] == len(wire)
    assert ev["rcpts"] == ["alice@example.com"] and ev["forwarded"] is False
    assert ev["plan"] == [p.to_dict() for p in env_rec.plan]
    assert all("pilot" in p for p in ev["plan"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ev["ts"])


async def test_null_sender_empty_message_and_several_recipients(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd("MAIL FROM:<>"), 250, "2.1.0")
    for r in ("zed@example.com", "Bob@Example.COM", "someone@dev.example.com"):
        expect(await c.cmd(f"RCPT TO:<{r}>"), 250, "2.1.5")
    qid = queue_id(await send_data(c, b""))
    data = stored(env, qid)
    assert b"\tfor <" not in data  # `for` only with one recipient
    # SPEC Part 2: a message without Message-ID gets one from the relay, on both copies
    added = f"<{qid}.test-node@relay.test>"
    assert data.endswith(
        b"X-Relay-Trace: test-node " + qid.encode() + b"\r\nMessage-ID: " + added.encode() + b"\r\n"
    )
    (ev,) = env.events("received")
    assert ev["mail_from"] == "" and ev["size"] == 0
    assert ev["message_id"] == added and ev["message_id_added"] is True
    plan = {(p["rcpt"], p["provider"], p["delivered_to"], p["role"]) for p in ev["plan"]}
    assert plan == {
        ("zed@example.com", "legacy", "zed@example.com", "primary"),
        ("Bob@Example.COM", "new", "robert@example-new.com", "primary"),
        ("someone@dev.example.com", "legacy", "someone@dev.example.com", "primary"),
        ("someone@dev.example.com", "new", "someone@dev.example-new.com", "shadow"),
    }


async def test_forward_domain_and_postmaster_are_accepted(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env, ["alice@fwd.example.com", "zed@fwd.example.com", "postmaster"])
    qid = queue_id(await send_data(c, BODY))
    (ev,) = env.events("received")
    assert ev["forwarded"] is True
    assert [(p["rcpt"], p["provider"], p["delivered_to"], p["role"]) for p in ev["plan"]] == [
        ("alice@fwd.example.com", "new", "alice@example-new.com", "shadow"),
        ("postmaster", "legacy", "postmaster@example.com", "primary"),
    ]
    assert [(e["queue_id"], e["rcpt"]) for e in env.events("discarded")] == [
        (qid, "zed@fwd.example.com")
    ]


async def test_forward_networks_limit_the_forward_domain(relay_factory: RelayFactory) -> None:
    env = await relay_factory(top="forward_networks: [192.0.2.0/24]\n")
    c = await ready(env)
    expect(await c.cmd("RCPT TO:<alice@fwd.example.com>"), 550, "5.7.1", "Relaying denied")


# -- relay tricks: raw socket, one per trick ---------------------------------------

CYRILLIC_E = "\u0435xample.com"  # е: looks like "example.com"
CYRILLIC_A = "ex\u0430mple.com"  # а


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone@elsewhere.org",
        "user%elsewhere.org@example.com",
        "elsewhere.org!user@example.com",
        '"user@elsewhere.org"@example.com',
        "user@[127.0.0.1]",
        "user@[IPv6:::1]",
        "user@sub.example.com",
        "user@example.com.elsewhere.org",
        "user@example.co",
        "user@" + CYRILLIC_E.encode("idna").decode(),
        "user@" + CYRILLIC_A.encode("idna").decode(),
        "user@xn--exmple-cua.com",
        "@elsewhere.org:user@elsewhere.org",
    ],
)
async def test_relay_trick_is_denied(relay_factory: RelayFactory, rcpt: str) -> None:
    env = await relay_factory()
    c = await ready(env, [])
    expect(await c.cmd(f"RCPT TO:<{rcpt}>"), 550, "5.7.1", "Relaying denied")
    assert rejected(env) == [("rcpt", 550, "5.7.1")]
    (ev,) = env.events("rejected")
    assert ev["client_ip"] == "127.0.0.1" and "queue_id" not in ev and ev["reason"]


@pytest.mark.parametrize(
    "domain", [CYRILLIC_E, CYRILLIC_A, "\uff45xample.com", "exa\u0301mple.com"]
)
async def test_unicode_look_alike_denied_under_smtputf8(
    relay_factory: RelayFactory, domain: str
) -> None:
    env = await relay_factory()
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8"), 250, "2.1.0")
    reply = await c.cmd(f"RCPT TO:<user@{domain}>".encode())
    expect(reply, 550, "5.7.1", "Relaying denied")


async def test_source_route_is_taken_as_the_bare_address(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env, [])
    expect(await c.cmd("RCPT TO:<@a.example.org,@b.example.org:alice@example.com>"), 250, "2.1.5")
    qid = queue_id(await send_data(c, BODY))
    rec = env.relay.spool.load(qid).envelope
    assert rec.rcpts == ("alice@example.com",)
    assert {p.delivered_to for p in rec.plan} == {
        "alice@example.com",
        "alice@example-new.com",
    }


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("<alice@example.com.>", 553),  # trailing dot
        ("<>", 501),
        ("<@example.com>", 553),
        ("<alice@>", 553),
        ("<alice@example..com>", 553),
        ("<alice example.com>", 501),
    ],
)
async def test_malformed_address(relay_factory: RelayFactory, rcpt: str, code: int) -> None:
    env = await relay_factory()
    c = await ready(env, [])
    expect(await c.cmd(f"RCPT TO:{rcpt}"), code, "5.1.3")


async def test_mixed_case_domain_is_ours(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env, ["Alice@EXAMPLE.Com"])
    qid = queue_id(await send_data(c, BODY))
    plan = env.relay.spool.load(qid).envelope.plan
    assert [p.delivered_to for p in plan] == ["Alice@example.com", "Alice@example-new.com"]


# -- limits ---------------------------------------------------------------------------


async def test_too_many_recipients(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_recipients: 2\n")
    c = await ready(env, ["a@example.com", "b@example.com"])
    expect(await c.cmd("RCPT TO:<c@example.com>"), 452, "4.5.3", "Too many recipients")
    qid = queue_id(await send_data(c, BODY))
    assert env.relay.spool.load(qid).envelope.rcpts == ("a@example.com", "b@example.com")
    assert rejected(env) == [("rcpt", 452, "4.5.3")]


async def test_size_declared_at_mail(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_message_size: 5000\n")
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=5001"), 552, "5.3.4")
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=5000"), 250, "2.1.0")
    assert rejected(env) == [("mail", 552, "5.3.4")]


async def test_data_over_the_size_limit(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_message_size: 5000\n")
    c = await ready(env)
    line = b"x" * 98 + b"\r\n"
    expect(await send_data(c, line * 51), 552, "5.3.4")
    assert nothing_stored(env)
    assert rejected(env) == [("data", 552, "5.3.4")]
    # the session goes on: exactly at the limit is fine
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<alice@example.com>"), 250, "2.1.5")
    expect(await send_data(c, line * 50), 250, "2.0.0")


async def test_command_line_limit(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd("NOOP " + "x" * (512 - 7)), 250, "2.0.0")  # 512 octets with CRLF
    expect(await c.cmd("NOOP " + "x" * (512 - 6)), 500, "5.5.2", "Line too long")
    expect(await c.cmd("NOOP " + "x" * 100_000), 500, "5.5.2", "Line too long")
    local = "a" * (512 - len("MAIL FROM:<@origin.test>") - 2)
    expect(await c.cmd(f"MAIL FROM:<{local}@origin.test> SIZE=100"), 250, "2.1.0")  # + SIZE
    expect(await c.cmd("RSET"), 250, "2.0.0")
    expect(await c.cmd(f"MAIL FROM:<{local}{'b' * 40}@origin.test>"), 500, "5.5.2")


async def test_command_limit_does_not_grow_with_ehlo(relay_factory: RelayFactory) -> None:
    # aiosmtpd raises a class-wide MAIL limit by 36 octets per EHLO
    env = await relay_factory()
    c = await env.client()
    for _ in range(30):
        await c.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{'a' * 900}@origin.test>"), 500, "5.5.2")
    other = await env.client()
    await other.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{'a' * 490}@origin.test> SIZE=10 SMTPUTF8"), 250, "2.1.0")


async def test_text_line_too_long_answered_after_the_end_of_data(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="max_line_length: 1000\n")
    c = await ready(env)
    expect(await c.cmd("DATA"), 354, None)
    await c.send(b"ok\r\n" + b"y" * 5000 + b"\r\nMAIL FROM:<evil@origin.test>\r\n")
    with pytest.raises(TimeoutError):
        await c.reply(timeout=0.2)  # no reply before the end of data
    await c.send(b"more\r\n.\r\n")
    expect(await c.reply(), 500, "5.5.2", "Line too long")
    assert nothing_stored(env)
    assert rejected(env) == [("data", 500, "5.5.2")]
    # a line exactly at the limit passes unchanged
    long_line = b"z" * 998 + b"\r\n"
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<alice@example.com>"), 250, "2.1.5")
    qid = queue_id(await send_data(c, b"Subject: l\r\n\r\n" + long_line))
    assert stored(env, qid).endswith(b"\r\n\r\n" + long_line)


async def test_long_lines_up_to_the_default_limit_pass(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env)
    line = b"w" * 65534 + b"\r\n"  # 65536 octets: the default max_line_length
    qid = queue_id(await send_data(c, b"\r\n" + line + line))
    assert stored(env, qid).endswith(b"\r\n" + line + line)


@pytest.mark.parametrize("bare", [b"\n", b"\r"])
async def test_bare_newline_rejected_when_configured(
    relay_factory: RelayFactory, bare: bytes
) -> None:
    env = await relay_factory(top="bare_newline: reject\n")
    c = await ready(env)
    expect(await send_data(c, b"Subject: x\r\n\r\none" + bare + b"two\r\n"), 550, "5.5.2")
    assert nothing_stored(env)
    assert rejected(env) == [("data", 550, "5.5.2")]
    expect(await c.cmd("NOOP"), 250, "2.0.0")


async def test_bare_newlines_normalized_in_spool_and_delivery(
    relay_factory: RelayFactory,
) -> None:
    async with Provider("legacy") as legacy:
        env = await relay_factory(legacy_port=legacy.port)
        c = await ready(env, ["zed@example.com"])
        wire = b"Subject: bare\n\nline one\nline two\rline three\r\n..dot\n.\nend\r\n"
        qid = queue_id(await send_data(c, wire))
        want = b"Subject: bare\r\n\r\nline one\r\nline two\r\nline three\r\n.dot\r\n\r\nend\r\n"
        data = stored(env, qid)
        assert data.endswith(b"\r\n" + want) and b"\n" not in data.replace(b"\r\n", b"")
        await legacy.wait_for_messages(1)
        assert legacy.messages[0].data == data  # the provider gets what was stored


async def test_smuggled_end_of_data_is_content(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env, ["zed@example.com"])
    smuggled = b"MAIL FROM:<evil@origin.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
    wire = b"Subject: a\r\n\r\nhi\n.\r\n" + smuggled + b"bad\r\n"
    reply = await send_data(c, wire)
    qid = queue_id(reply)
    assert smuggled in stored(env, qid)
    expect(await c.cmd("NOOP"), 250, "2.0.0")  # nothing smuggled was run as a command
    assert len(env.events("received")) == 1


@pytest.mark.parametrize(
    ("headers", "reply"),
    [
        (b"Received: a\r\n" * 3, (250, "2.0.0")),
        (b"Received: a\r\n" * 4, (554, "5.4.6")),
        (
            b"received: a\r\nRECEIVED: b\r\nReceived: c\r\n\tfolded\r\nReceived: d\r\n",
            (554, "5.4.6"),
        ),
        (b"X-Relay-Trace: " + NODE.encode() + b" 0123ABCD\r\n", (554, "5.4.6")),
        (b"x-relay-trace:  " + NODE.encode() + b"\r\n", (554, "5.4.6")),
        (b"X-Relay-Trace: other-node 0123ABCD\r\n", (250, "2.0.0")),
    ],
)
async def test_hops_and_own_trace(
    relay_factory: RelayFactory, headers: bytes, reply: tuple[int, str]
) -> None:
    env = await relay_factory(limits="max_hops: 3\n")
    c = await ready(env)
    got = await send_data(c, headers + b"Subject: loop\r\n\r\nReceived: in the body\r\n" * 1)
    expect(got, *reply)
    if reply[0] == 554:
        assert nothing_stored(env) and rejected(env) == [("data", 554, "5.4.6")]


async def test_received_lines_in_the_body_are_not_hops(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_hops: 1\n")
    c = await ready(env)
    body = b"\r\n" + b"Received: quoted\r\n" * 5 + b"X-Relay-Trace: " + NODE.encode() + b"\r\n"
    expect(await send_data(c, b"Subject: q\r\n" + body), 250, "2.0.0")
    c2 = await ready(env)
    expect(await send_data(c2, body), 250, "2.0.0")  # no header section at all


# -- spool full or unwritable ----------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    with tmpfs(tmp_path / "relay" / "var", "1m") as mnt:
        yield mnt


async def test_spool_below_min_free_space_at_mail(
    relay_factory: RelayFactory, small_tmpfs: Path
) -> None:
    env = await relay_factory(spool="../var/spool", limits="min_free_space: 2000000\n")
    assert env.relay.spool.root.is_relative_to(small_tmpfs)
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 452, "4.3.1")
    assert rejected(env) == [("mail", 452, "4.3.1")]


async def test_spool_full_during_data(relay_factory: RelayFactory, small_tmpfs: Path) -> None:
    env = await relay_factory(spool="../var/spool", limits="min_free_space: 1000\n")
    c = await ready(env)
    big = (b"f" * 998 + b"\r\n") * 2000  # 2 MB into a 1 MB file system
    expect(await send_data(c, b"Subject: big\r\n\r\n" + big), 452, "4.3.1")
    assert nothing_stored(env)
    assert ("data", 452, "4.3.1") in rejected(env)
    # room again (a small message fits): the next one is taken
    c2 = await ready(env)
    expect(await send_data(c2, BODY), 250, "2.0.0")


async def test_spool_unwritable(relay_factory: RelayFactory, tmp_path: Path) -> None:
    env = await relay_factory()
    queue = env.spool_queue
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(queue)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        c = await ready(env)
        expect(await send_data(c, BODY), 452, "4.3.1")
        assert rejected(env) == [("data", 452, "4.3.1")]
        expect(await c.cmd("NOOP"), 250, "2.0.0")
    finally:
        subprocess.run(["umount", "-l", str(queue)], check=False)


async def test_spool_full_at_data_command(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()
    c = await ready(env)
    answers = iter([False])

    async def has_room(min_free: int) -> bool:
        return next(answers, True)

    monkeypatch.setattr(env.relay.spool, "has_room", has_room)
    expect(await c.cmd("DATA"), 452, "4.3.1")
    assert rejected(env) == [("data", 452, "4.3.1")]
    expect(await send_data(c, BODY), 250, "2.0.0")  # the transaction is still open


# -- connections and timeouts ------------------------------------------------------


async def test_max_connections(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_connections: 2\n")
    a, b = await env.client(), await env.client()
    c = await RawClient.open(env.port)
    assert c.greeting is not None
    expect(c.greeting, 421, "4.7.0")
    assert await c.closed()
    assert rejected(env) == [("connect", 421, "4.7.0")]
    await a.cmd("QUIT")
    await a.closed()
    await env.wait_for(lambda: env.relay.handler.conns.total == 1)
    d = await env.client()
    assert d.greeting is not None and d.greeting.code == 220
    expect(await b.cmd("NOOP"), 250, "2.0.0")


async def test_max_connections_per_ip(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_connections: 10\nmax_connections_per_ip: 1\n")
    a = await env.client()
    b = await RawClient.open(env.port)
    assert b.greeting is not None
    expect(b.greeting, 421, "4.7.0", "from your address")
    assert await b.closed()
    expect(await a.cmd("NOOP"), 250, "2.0.0")


async def test_idle_timeout(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="idle_timeout: 0.3\n")
    c = await env.client()
    await c.ehlo()
    t0 = time.monotonic()
    expect(await c.reply(timeout=3), 421, "4.4.2")
    assert await c.closed()
    assert 0.25 < time.monotonic() - t0 < 2


async def test_data_slower_than_data_timeout(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="idle_timeout: 5\ndata_timeout: 0.4\n")
    c = await ready(env)
    expect(await c.cmd("DATA"), 354, None)
    t0 = time.monotonic()

    async def trickle() -> None:
        while True:
            await c.send(b"slow line\r\n")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        expect(await c.reply(timeout=3), 421, "4.4.2")
        assert 0.35 < time.monotonic() - t0 < 2
    finally:
        task.cancel()
    assert await c.closed()
    assert nothing_stored(env)
    assert rejected(env) == [("data", 421, "4.4.2")]


async def test_data_stalled_past_data_timeout(relay_factory: RelayFactory) -> None:
    """A client that stops sending mid-DATA gets the 421 when the deadline passes
    (the engine's timer ends the wait), well before the idle timeout."""
    env = await relay_factory(limits="idle_timeout: 30\ndata_timeout: 0.4\n")
    c = await ready(env)
    expect(await c.cmd("DATA"), 354, None)
    t0 = time.monotonic()
    await c.send(b"Subject: stalled\r\n\r\nfirst line\r\n")
    expect(await c.reply(timeout=5), 421, "4.4.2")
    assert 0.35 < time.monotonic() - t0 < 3
    assert await c.closed()
    assert nothing_stored(env)
    assert rejected(env) == [("data", 421, "4.4.2")]


# -- internal errors -------------------------------------------------------------------


async def test_internal_error_after_data_is_451_and_stores_nothing(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()

    def boom(*args: Any) -> Any:
        raise RuntimeError("routing exploded")

    monkeypatch.setattr(env.relay.handler.intake, "plan", boom)
    c = await ready(env)
    reply = await send_data(c, BODY)
    expect(reply, 451, "4.3.0")
    assert "exploded" not in reply.text and "Error:" not in reply.text
    assert nothing_stored(env) and rejected(env) == [("data", 451, "4.3.0")]
    monkeypatch.undo()
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")  # the envelope was reset


async def test_internal_error_while_storing_reads_to_the_end(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()

    async def broken(*args: Any) -> None:
        raise RuntimeError("bug in the spool")

    monkeypatch.setattr(env.relay.spool, "write", broken)
    c = await ready(env)
    wire = b"Subject: x\r\n\r\n" + b"filler line\r\n" * 30000 + b"MAIL FROM:<evil@origin.test>\r\n"
    expect(await send_data(c, wire), 451, "4.3.0")
    expect(await c.cmd("NOOP"), 250, "2.0.0")  # no reply to the MAIL inside the data
    assert nothing_stored(env)


async def test_internal_error_at_rcpt(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()

    def boom(*args: Any) -> Any:
        raise ValueError("resolver bug")

    monkeypatch.setattr(policy, "resolve_recipient", boom)
    c = await ready(env, [])
    reply = await c.cmd("RCPT TO:<alice@example.com>")
    expect(reply, 451, "4.3.0")
    assert "resolver" not in reply.text
    expect(await c.cmd("NOOP"), 250, "2.0.0")


# -- shutdown ----------------------------------------------------------------------


async def test_shutdown_finishes_transactions_and_421s_the_rest(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()
    idle = await env.client()
    await idle.ehlo()
    busy = await ready(env)
    stopping = asyncio.create_task(env.relay.stop())
    expect(await idle.reply(), 421, "4.3.2")
    assert await idle.closed()
    with pytest.raises(OSError):
        await RawClient.open(env.port)  # no longer accepting
    expect(await send_data(busy, BODY), 250, "2.0.0")  # the transaction in flight finishes
    with contextlib.suppress(ConnectionError):  # it may be closed (after its 421) already
        await busy.send(f"MAIL FROM:<{SENDER}>\r\n")
    expect(await busy.reply(), 421, "4.3.2")
    assert await busy.closed()
    await asyncio.wait_for(stopping, 5)
    assert len(spool_messages(env.spool_queue)) == 1


async def test_shutdown_refuses_new_sessions_with_421(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    env.relay.handler.shutting_down = True  # the listener is still open for an instant
    c = await RawClient.open(env.port)
    assert c.greeting is not None
    expect(c.greeting, 421, "4.3.2")
    assert await c.closed()


# -- durability ---------------------------------------------------------------------


async def test_250_only_after_data_and_directory_sync(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()
    events: list[tuple[str, str]] = []
    env.relay.spool.on_sync = lambda path: events.append(("sync", Path(path).name))
    original = RelaySMTP.push

    async def push(self: RelaySMTP, status: str | bytes) -> None:
        text = status.decode() if isinstance(status, bytes) else status
        if text.startswith("250 2.0.0 Ok: queued as "):
            events.append(("250", text.rsplit(" ", 1)[1]))  # before it reaches the socket
        await original(self, status)

    monkeypatch.setattr(RelaySMTP, "push", push)

    async def client(i: int) -> list[str]:
        c = await env.client()
        await c.ehlo()
        ids = []
        for j in range(3):
            reply = await c.transaction(
                ["alice@example.com"], b"Subject: %d/%d\r\n\r\nx\r\n" % (i, j)
            )
            ids.append(queue_id(reply))
        return ids

    qids = [q for ids in await asyncio.gather(*(client(i) for i in range(8))) for q in ids]
    assert len(set(qids)) == 24
    queue_syncs = [i for i, e in enumerate(events) if e == ("sync", "queue")]
    for qid in qids:
        data_sync = events.index(("sync", qid))
        reply = events.index(("250", qid))
        assert any(data_sync < d < reply for d in queue_syncs), (qid, events)
    assert set(spool_messages(env.spool_queue)) <= set(qids)


async def test_client_gone_mid_data_leaves_nothing(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await ready(env)
    expect(await c.cmd("DATA"), 354, None)
    await c.send(b"Subject: half\r\n\r\n" + (b"h" * 998 + b"\r\n") * 3000)  # > 1 MB: on disk
    await env.wait_for(lambda: any(env.spool_queue.glob("*.tmp")))
    c.writer.transport.abort()
    await env.wait_for(lambda: nothing_stored(env))
    assert env.events("received") == []


async def test_client_gone_during_commit_message_still_queued(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await relay_factory()
    entered, release = asyncio.Event(), asyncio.Event()
    commit = env.relay.spool.commit

    async def slow_commit(*args: Any, **kwargs: Any) -> None:
        entered.set()
        await release.wait()
        await commit(*args, **kwargs)

    monkeypatch.setattr(env.relay.spool, "commit", slow_commit)
    scheduled: list[str] = []
    add = env.relay.handler.intake.on_queued
    assert add is not None
    env.relay.handler.intake.on_queued = lambda qid, rec: (scheduled.append(qid), add(qid, rec))
    c = await ready(env)
    expect(await c.cmd("DATA"), 354, None)
    await c.send(BODY + b".\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    c.writer.transport.abort()  # the client gives up before the 250
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    release.set()
    await env.wait_for(lambda: bool(scheduled))
    assert list(spool_messages(env.spool_queue)) == scheduled  # on disk and scheduled
    assert [e["queue_id"] for e in env.events("received")] == scheduled


# -- pipelining and STARTTLS ---------------------------------------------------------


async def test_pipelined_transaction_in_one_write(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    c = await env.client()
    await c.ehlo()
    batch = (
        (
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<x@elsewhere.org>\r\n"
            "RCPT TO:<zed@example.com>\r\nDATA\r\n"
        ).encode()
        + BODY
        + b".\r\n"
    )
    second = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n".encode()
    await c.send(batch + second + b"..two\r\n.\r\nQUIT\r\n")
    want = [(250, "2.1.0"), (250, "2.1.5"), (550, "5.7.1"), (250, "2.1.5"), (354, None),
            (250, "2.0.0"), (250, "2.1.0"), (250, "2.1.5"), (354, None), (250, "2.0.0"),
            (221, "2.0.0")]  # fmt: skip
    got = [await c.reply() for _ in want]
    assert [(r.code, r.enhanced) for r in got] == want
    first, second_id = queue_id(got[5]), queue_id(got[9])
    assert env.relay.spool.load(first).envelope.rcpts == ("alice@example.com", "zed@example.com")
    added = f"Message-ID: <{second_id}.test-node@relay.test>\r\n".encode()  # SPEC Part 2
    assert stored(env, second_id).endswith(b"X-Relay-Trace: test-node " + second_id.encode()
                                           + b"\r\n" + added + b".two\r\n")  # fmt: skip


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.CA]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return folder / "cert.pem", folder / "key.pem", ca


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_starttls_session(relay_factory: RelayFactory, tls_files: Any) -> None:
    cert, key, ca = tls_files
    env = await relay_factory(listen=f", tls_cert: {cert}, tls_key: {key}")
    c = await env.client()
    assert "STARTTLS" in (await c.ehlo()).lines
    expect(await c.cmd("STARTTLS"), 220, "2.0.0")
    await c.starttls(client_context(ca))
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 503, "5.5.1")  # state reset: EHLO again
    r = await c.ehlo()
    assert "STARTTLS" not in r.lines and not any(x.startswith("AUTH") for x in r.lines)
    expect(await c.cmd("STARTTLS"), 503, "5.5.1")  # no TLS inside TLS
    expect(await c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), 503, "5.5.1")
    qid = queue_id(await c.transaction(["alice@example.com"], BODY))
    assert b"\tby relay.test (relay) with ESMTPS id " + qid.encode() in stored(env, qid)


async def test_commands_pipelined_after_starttls_are_discarded(
    relay_factory: RelayFactory, tls_files: Any
) -> None:
    cert, key, ca = tls_files
    env = await relay_factory(listen=f", tls_cert: {cert}, tls_key: {key}")
    c = await env.client()
    await c.ehlo()
    await c.send(
        b"STARTTLS\r\nMAIL FROM:<evil@origin.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
    )
    expect(await c.reply(), 220, "2.0.0")
    await c.starttls(client_context(ca))
    await c.ehlo()
    expect(await c.cmd("RCPT TO:<alice@example.com>"), 503, "5.5.1")  # no MAIL survived
    assert env.events("received") == []


async def test_starttls_counts_one_connection(relay_factory: RelayFactory, tls_files: Any) -> None:
    cert, key, ca = tls_files
    env = await relay_factory(
        listen=f", tls_cert: {cert}, tls_key: {key}", limits="max_connections_per_ip: 1\n"
    )
    c = await env.client()
    await c.ehlo()
    await c.cmd("STARTTLS")
    await c.starttls(client_context(ca))
    await c.ehlo()
    assert env.relay.handler.conns.total == 1
    await c.cmd("QUIT")
    await c.close()
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    d = await env.client()
    assert d.greeting is not None and d.greeting.code == 220


async def test_failed_tls_handshake_frees_the_slot(
    relay_factory: RelayFactory, tls_files: Any
) -> None:
    cert, key, _ = tls_files
    env = await relay_factory(
        listen=f", tls_cert: {cert}, tls_key: {key}", limits="max_connections_per_ip: 1\n"
    )
    c = await env.client()
    await c.ehlo()
    expect(await c.cmd("STARTTLS"), 220, "2.0.0")
    await c.send(b"this is not a TLS client hello\r\n" * 10)
    assert await c.closed()
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    d = await env.client()
    assert d.greeting is not None and d.greeting.code == 220


# -- hot reload of the pilot list ----------------------------------------------------

ZOE = "  - address: zoe@example.com\n    group: sales\n"


async def plan_for(env: RelayEnv, rcpt: str) -> list[tuple[str, str]]:
    c = await ready(env, [rcpt])
    qid = queue_id(await send_data(c, BODY))
    await c.cmd("QUIT")
    stored_plan = env.relay.spool.load(qid).envelope.plan
    logged = next(e for e in env.events("received") if e["queue_id"] == qid)["plan"]
    assert logged == [p.to_dict() for p in stored_plan]
    return [(p.provider, p.role) for p in stored_plan]


async def test_pilot_edit_changes_the_next_plan_within_2s(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    assert await plan_for(env, "zoe@example.com") == [("legacy", "primary")]
    await asyncio.sleep(0.1)  # let the watcher settle on the directory
    (env.folder / "pilot-users.yaml").write_text(PILOTS + ZOE)
    t0 = time.monotonic()
    while await plan_for(env, "zoe@example.com") == [("legacy", "primary")]:
        assert time.monotonic() - t0 < 2, "pilot edit not in force after 2 s"
        await asyncio.sleep(0.05)
    assert await plan_for(env, "zoe@example.com") == [("legacy", "primary"), ("new", "shadow")]


async def test_broken_pilot_edit_keeps_the_last_good_list(relay_factory: RelayFactory) -> None:
    env = await relay_factory(pilots=PILOTS + ZOE)
    results: list[bool] = []
    reload = env.relay.pilots.reload

    def counting() -> bool:
        results.append(reload())
        return results[-1]

    env.relay.pilots.reload = counting  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    (env.folder / "pilot-users.yaml").write_text(PILOTS + ZOE + "    mode: sideways\n")
    await env.wait_for(lambda: bool(results), timeout=2)
    assert results == [False]
    assert await plan_for(env, "zoe@example.com") == [("legacy", "primary"), ("new", "shadow")]
    assert await plan_for(env, "alice@example.com") == [("legacy", "primary"), ("new", "shadow")]


async def test_reload_call_changes_the_plan(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    (env.folder / "pilot-users.yaml").write_text(PILOTS + ZOE)
    assert env.relay.pilots.reload() is True  # what SIGHUP does
    assert await plan_for(env, "zoe@example.com") == [("legacy", "primary"), ("new", "shadow")]


# -- a 50 MB message in bounded memory -----------------------------------------------

DRIVER = """
import asyncio, sys
from relay import config
from relay.app import Relay

async def main():
    relay = Relay(config.load(sys.argv[1]))
    relay.handler.intake.on_queued = None  # ingress only: no delivery reads the message back
    await relay.start()
    print(relay.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await relay.stop()

asyncio.run(main())
"""


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(60)
async def test_50mb_message_peak_rss_growth_under_100mb(tmp_path: Path) -> None:
    sock_l, legacy = dead_port()
    sock_n, new = dead_port()
    cfg = write_relay(tmp_path / "config", ingress_settings(legacy, new))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DRIVER, str(cfg), cwd=Path(__file__).parent.parent,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin and proc.stdout
    try:
        port = 0
        while not port:  # the first line that is just a number; the rest is the oplog
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "relay did not start"
            port = int(line) if line.strip().isdigit() else 0
        c = await RawClient.open(port)
        await c.ehlo()
        queue_id(await c.transaction(["alice@example.com"], BODY))  # warm up every code path
        before = vm_hwm_kb(proc.pid)
        block = (b"0123456789" * 7 + b"abcdefgh\r\n") * 12500  # 1 MB of 80-octet lines
        expect(await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=50000000"), 250, "2.1.0")
        expect(await c.cmd("RCPT TO:<alice@example.com>"), 250, "2.1.5")
        expect(await c.cmd("DATA"), 354, None)
        for _ in range(50):
            await c.send(block)
        await c.send(b".\r\n")
        qid = queue_id(await c.reply(timeout=40))
        growth_mb = (vm_hwm_kb(proc.pid) - before) / 1024
        msg = tmp_path / "var" / "spool" / "queue" / f"{qid}.msg"
        assert msg.stat().st_size > 50_000_000
        print(f"50 MB message: peak RSS grew by {growth_mb:.1f} MB")
        assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB"
        await c.cmd("QUIT")
    finally:
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
        sock_l.close()
        sock_n.close()
