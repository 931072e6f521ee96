"""Hostile input at the ingress (SPEC Part 2 "Hostile input"), sent as an attacker would.

Raw sockets send exact bytes: control characters and broken UTF-8 in
envelope addresses, Unicode look-alikes of listed domains, floods of errors
and junk commands, terminal escapes in EHLO, and the fake end-of-data
sequences of a public SMTP smuggling scanner. Each is judged by the reply,
the delivery log, stderr, or what the stand-in providers received.
"""

# ruff: noqa: F811 - the relay_factory fixture is imported, then named as a parameter
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from relay.testing import Provider
from tests.harness import free_port
from tests.helpers_ingress import RawClient, RelayEnv, RelayFactory, relay_factory  # noqa: F401
from tests.relayproc import RelayProcess, write_relay_config

pytestmark = pytest.mark.timeout(30)
SENDER = "sender@origin.test"
BODY = b"Subject: hello\r\n\r\nbody\r\n"


def expect(reply: Any, code: int, enhanced: str | None) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced), str(reply)


def queued(reply: Any) -> str:
    m = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", reply.text)
    assert reply.code == 250 and m, reply
    return m.group(1)


async def greeted(env: RelayEnv, name: bytes = b"client.test") -> RawClient:
    c = await env.client()
    expect(await c.cmd(b"EHLO " + name), 250, None)
    return c


async def _data(c: RawClient, body: bytes = BODY) -> Any:
    """DATA, `body` (CRLF lines, nothing to dot-stuff) and the final dot; the reply."""
    expect(await c.cmd("DATA"), 354, None)
    await c.send(body + b".\r\n")
    return await c.reply()


def only_printable_ascii(data: bytes, allowed: bytes = b"") -> bool:
    return all(0x20 <= b < 0x7F or b in allowed for b in data)


# -- 1. control characters, NUL, DEL, a quoted tab, invalid UTF-8 --------------------

BAD_ADDRESSES = [
    b"a\x01b@example.com",  # C0 control
    b"a\x00b@example.com",  # NUL
    b"a\x7fb@example.com",  # DEL
    b'"a\tb"@example.com',  # a tab, even quoted (RFC 5321 qtextSMTP has none)
    b"a\rb@example.com",  # a bare CR inside the command line
    b"a\xffb@example.com",  # not UTF-8
    b"a\xc3(b@example.com",  # a broken UTF-8 sequence
    b"a\xc2\x85b@example.com",  # U+0085, a C1 control, as valid UTF-8
    b"ab@exa\x1bmple.com",  # ESC in the domain
]


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=repr)
async def test_bad_octets_in_mail_from_are_refused(
    relay_factory: RelayFactory, address: bytes
) -> None:
    env = await relay_factory()
    c = await greeted(env)
    reply = await c.cmd(b"MAIL FROM:<" + address + b"> SMTPUTF8")
    assert reply.code in (501, 553) and reply.enhanced == "5.1.3", reply
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")  # the session goes on
    (ev,) = env.events("rejected")
    assert (ev["stage"], ev["smtp_code"], ev["enhanced_code"]) == ("mail", 553, "5.1.3")
    assert only_printable_ascii(ev["mail_from"].encode())


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=repr)
async def test_bad_octets_in_rcpt_are_refused(relay_factory: RelayFactory, address: bytes) -> None:
    env = await relay_factory()
    c = await greeted(env)
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8"), 250, "2.1.0")
    reply = await c.cmd(b"RCPT TO:<" + address + b">")
    assert reply.code in (501, 553) and reply.enhanced == "5.1.3", reply
    expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
    (ev,) = env.events("rejected")
    assert (ev["stage"], ev["smtp_code"], ev["enhanced_code"]) == ("rcpt", 553, "5.1.3")
    assert only_printable_ascii(ev["rcpt"].encode())


# -- 2. a non-ASCII address needs SMTPUTF8 ----------------------------------------------


async def test_non_ascii_address_without_smtputf8_is_553_5_6_7(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()
    c = await greeted(env)
    expect(await c.cmd("MAIL FROM:<jörg@origin.test>".encode()), 553, "5.6.7")
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<jörg@example.com>".encode()), 553, "5.6.7")
    expect(await c.cmd("RSET"), 250, "2.0.0")
    expect(await c.cmd("MAIL FROM:<jörg@origin.test> SMTPUTF8".encode()), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<jörg@example.com>".encode()), 250, "2.1.5")
    queued(await _data(c))
    assert [(e["stage"], e["reason"]) for e in env.events("rejected")] == [
        ("mail", "non-ASCII address without SMTPUTF8"),
        ("rcpt", "non-ASCII address without SMTPUTF8"),
    ]


# -- 3. domains compare in their ASCII form -----------------------------------------------

KELVIN = "\u212a"  # KELVIN SIGN: lowercases to an ASCII "k"
IDN_DOMAINS = "[example.com, dev.example.com, work.example, bücher.example]"


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        (f"user@wor{KELVIN}.example", 550),  # only "work.example" after Unicode folding
        ("user@BÜCHER.example", 550),  # Ü folds to ü only in Unicode
        ("user@WORK.Example", 250),
        ("user@bücher.example", 250),
        ("user@XN--BCHER-KVA.example", 250),  # the listed domain's A-label
    ],
)
async def test_domains_compare_in_their_ascii_form(
    relay_factory: RelayFactory, rcpt: str, code: int
) -> None:
    env = await relay_factory(domains=IDN_DOMAINS)
    c = await greeted(env)
    expect(await c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8"), 250, "2.1.0")
    reply = await c.cmd(f"RCPT TO:<{rcpt}>".encode())
    if code == 550:
        expect(reply, 550, "5.7.1")
        return
    expect(reply, 250, "2.1.5")
    qid = queued(await _data(c))
    (delivery,) = env.relay.spool.load(qid).envelope.plan
    assert delivery.delivered_to.encode().isascii()
    assert delivery.delivered_to.split("@")[1] in ("work.example", "xn--bcher-kva.example")


# -- 4. one bad recipient never holds back the others ----------------------------------


async def test_a_refused_recipient_does_not_hold_back_the_good_one(
    relay_factory: RelayFactory,
) -> None:
    async with Provider("legacy") as legacy:
        env = await relay_factory(legacy_port=legacy.port)
        c = await greeted(env)
        expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
        bad = await c.cmd(b"RCPT TO:<eve\x01@example.com>")
        queued(await _data(c))
        await legacy.wait_for_messages(1, timeout=5)
        assert [m.rcpts for m in legacy.messages] == [["zed@example.com"]]
        expect(bad, 553, "5.1.3")


# -- 5. hard error limit, junk commands, bounded logging ---------------------------------


async def test_hard_error_limit_closes_the_session_and_runs_nothing_pipelined(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()  # hard_error_limit: 20, the default
    c = await greeted(env)
    await c.send(
        f"MAIL FROM:<{SENDER}>\r\n".encode()
        + b"".join(b"RCPT TO:<u%d@elsewhere.test>\r\n" % i for i in range(25))
        + b"RCPT TO:<zed@example.com>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n"
    )  # fmt: skip
    expect(await c.reply(), 250, "2.1.0")
    for _ in range(20):
        expect(await c.reply(), 550, "5.7.1")
    expect(await c.reply(), 421, "4.7.0")
    assert await c.closed()
    assert env.events("received") == []
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    events = env.events("rejected")
    assert len(events) <= 21
    assert sum(e.get("count", 1) for e in events) == 21  # 20 refusals and the 421
    assert events[-1]["smtp_code"] == 421 and events[-1]["reason"] == "too many errors"


async def test_error_count_restarts_after_a_queued_message(relay_factory: RelayFactory) -> None:
    env = await relay_factory()  # hard_error_limit: 20
    c = await greeted(env)
    for _ in range(19):
        expect(await c.cmd("RCPT TO:<zed@example.com>"), 503, "5.5.1")  # no MAIL yet
    expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
    queued(await _data(c))
    for _ in range(19):
        expect(await c.cmd("DATA"), 503, "5.5.1")
    expect(await c.cmd("NOOP"), 250, "2.0.0")  # still open: 19 errors since the message
    expect(await c.cmd("DATA"), 503, "5.5.1")
    expect(await c.reply(), 421, "4.7.0")
    assert await c.closed()


async def noops_until_closed(c: RawClient, every: float, give_up: float) -> list[Any]:
    """A NOOP every `every` seconds; the replies until one is not 250 or `give_up` passes."""

    async def keep_sending() -> None:
        while True:
            await asyncio.sleep(every)
            await c.send(b"NOOP\r\n")

    task = asyncio.create_task(keep_sending())
    replies: list[Any] = []
    try:
        async with asyncio.timeout(give_up):
            while not replies or replies[-1].code == 250:
                replies.append(await c.reply(timeout=give_up))
    except TimeoutError:
        pass
    finally:
        task.cancel()
    return replies


async def test_a_noop_a_second_past_the_junk_limit_does_not_keep_the_session_open(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="idle_timeout: 1.5\n")  # junk_command_limit: 100
    c = await greeted(env)  # EHLO is the first junk command, 99 NOOPs the rest
    await c.send(b"NOOP\r\n" * 99)
    for _ in range(99):
        expect(await c.reply(), 250, "2.0.0")
    t0 = time.monotonic()
    replies = await noops_until_closed(c, every=1.0, give_up=5)
    assert replies and replies[-1].code == 421, [str(r) for r in replies]
    expect(replies[-1], 421, "4.4.2")
    assert 1.3 < time.monotonic() - t0 < 3
    assert await c.closed()


async def test_junk_commands_under_the_limit_still_restart_the_idle_timer(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="idle_timeout: 0.6\njunk_command_limit: 4\n")
    c = await greeted(env)  # EHLO is the first junk command: 3 NOOPs restart the timer
    t0 = time.monotonic()
    replies = await noops_until_closed(c, every=0.3, give_up=5)
    expect(replies[-1], 421, "4.4.2")
    # NOOPs at 0.3, 0.6, 0.9 s restart the timer (deadline 1.5 s), the next ones do not
    assert 1.3 < time.monotonic() - t0 < 2.2
    assert 4 <= len(replies) - 1 <= 5


async def test_real_commands_still_restart_the_idle_timer_past_the_junk_limit(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="idle_timeout: 0.5\njunk_command_limit: 0\n")
    c = await greeted(env)
    for _ in range(4):  # 1.2 s in all, each MAIL well within the idle timeout
        await asyncio.sleep(0.3)
        expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        expect(await c.cmd("RSET"), 250, "2.0.0")
    expect(await c.reply(timeout=3), 421, "4.4.2")


async def flood(c: RawClient, n: int) -> list[Any]:
    """MAIL, `n` RCPTs for a foreign domain and QUIT in one write; every reply until EOF."""

    async def replies() -> list[Any]:
        got = []
        while True:
            try:
                got.append(await c.reply(timeout=20))
            except ConnectionError:
                return got

    reading = asyncio.create_task(replies())  # read while writing: no deadlock on full buffers
    lines = b"".join(b"RCPT TO:<u%d@elsewhere.test>\r\n" % i for i in range(n))
    with contextlib.suppress(ConnectionError):  # the relay may close before reading it all
        await c.send(f"MAIL FROM:<{SENDER}>\r\n".encode() + lines + b"QUIT\r\n")
    return await reading


@pytest.mark.timeout(60)
async def test_10000_refusals_in_one_session_log_at_most_21_events(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="hard_error_limit: 1000000\n")
    c = await greeted(env, b"flood.test")
    replies = await flood(c, 10_000)
    assert [r.code for r in replies] == [250] + [550] * 10_000 + [221]
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    events = env.events("rejected")
    assert len(events) == 21
    assert [e.get("count") for e in events] == [None] * 20 + [9980]
    summary = events[-1]
    assert (summary["stage"], summary["smtp_code"], summary["reason"]) == (
        "rcpt", 550, "relay denied",
    )  # fmt: skip
    assert summary["rcpt"] == "u9999@elsewhere.test" and summary["helo"] == "flood.test"


@pytest.mark.timeout(60)
async def test_10000_refusals_at_the_defaults_end_at_the_hard_error_limit(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory()
    c = await greeted(env)
    replies = await flood(c, 10_000)
    # Closing with the rest of the flood unread makes the kernel reset the connection,
    # which may cost the client the last replies before they are read.
    want = [(250, "2.1.0")] + [(550, "5.7.1")] * 20 + [(421, "4.7.0")]
    assert [(r.code, r.enhanced) for r in replies] == want[: len(replies)]
    await env.wait_for(lambda: env.relay.handler.conns.total == 0)
    events = env.events("rejected")
    assert len(events) == 21  # 20 refusals, then the 421 in the summary; nothing more was run
    assert events[-1]["count"] == 1 and events[-1]["reason"] == "too many errors"


# -- 6. rejected events say who, from whom, to whom ---------------------------------------


async def test_rejected_events_carry_helo_mail_from_and_rcpt_escaped(
    relay_factory: RelayFactory,
) -> None:
    env = await relay_factory(limits="max_message_size: 1000\n")
    helo = b"h\x1b[31m" + b"x" * 300
    c = await greeted(env, helo)
    expect(await c.cmd(b"MAIL FROM:<ev\x00il@origin.test>"), 553, "5.1.3")
    expect(await c.cmd("MAIL FROM:<>"), 250, "2.1.0")
    expect(await c.cmd("RCPT TO:<someone@elsewhere.test>"), 550, "5.7.1")
    expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
    expect(await c.cmd("RCPT TO:<amy@example.com>"), 250, "2.1.5")
    expect(await _data(c, b"x" * 998 + b"\r\n" + b"y" * 100 + b"\r\n"), 552, "5.3.4")
    mail, rcpt, data = env.events("rejected")
    want_helo = "h\\x1b[31m" + "x" * (256 - 9)
    assert mail["helo"] == rcpt["helo"] == data["helo"] == want_helo and len(want_helo) == 256
    assert mail["mail_from"] == "ev\\x00il@origin.test" and "rcpt" not in mail
    assert (rcpt["mail_from"], rcpt["rcpt"]) == ("", "someone@elsewhere.test")
    assert (data["mail_from"], data["rcpt"]) == ("", "zed@example.com")
    assert data["rcpts"] == ["zed@example.com", "amy@example.com"]


async def test_refused_connection_has_no_transaction_fields(relay_factory: RelayFactory) -> None:
    env = await relay_factory(limits="max_connections: 1\n")
    first = await env.client()
    second = await RawClient.open(env.port)
    assert second.greeting is not None and second.greeting.code == 421
    (ev,) = env.events("rejected")
    assert not {"helo", "mail_from", "rcpt"} & set(ev)
    await first.close()


# -- 7. client text reaches a header or stderr only escaped -------------------------------

HOSTILE_EHLO = b"\x1b[31mevil\x00host\x07\xff\xfe\xc3\xa9"
HOSTILE_COMMANDS = [
    b"\x1b[2J\x1b[H\x1b]0;owned\x07",  # clear the screen, set the terminal title
    b"NO\x00OP",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x1b\x07\x08",  # a TLS record's start
    b"\xc3\xa9t\xc3\xa9 8bit",
    b"XYZZY \x1b[5m\x00\xff",
]


@pytest.mark.timeout(60)
async def test_client_bytes_reach_the_received_header_and_stderr_only_escaped(
    tmp_path: Path,
) -> None:
    async with Provider("legacy") as legacy, Provider("new") as new:
        port = free_port()
        relay = RelayProcess(
            write_relay_config(tmp_path, port, legacy, new, bounce={"port": legacy.port}),
            port,
            tmp_path / "stderr.log",
        )  # fmt: skip  (a bounce route: no plain-text config warning on stderr)
        relay.start()
        try:
            await relay.wait_ready()
            for command in HOSTILE_COMMANDS:  # each in a fresh session: the relay ends
                c = await RawClient.open(port)  # a session after a few unknown commands
                await c.cmd(b"EHLO " + HOSTILE_EHLO)
                assert (await c.cmd(command)).code == 500, command
                await c.close()
            c = await RawClient.open(port)
            expect(await c.cmd(b"EHLO " + HOSTILE_EHLO), 250, None)
            await c.cmd(b"\x1b[2J")
            expect(await c.cmd(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
            expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
            queued(await _data(c))
            await c.cmd("QUIT")
            await legacy.wait_for_messages(1, timeout=10)
        finally:
            code, _ = await relay.terminate(10)
            relay.stop_quietly()
    data = legacy.messages[0].data
    received = data[: data.index(b"X-Relay-Trace:")]
    assert received.startswith(b"Received: from \\x1b[31mevil\\x00host\\x07\\xff\\xfe\\xc3\\xa9 (")
    assert only_printable_ascii(received, b"\r\n\t"), received
    stderr = (tmp_path / "stderr.log").read_bytes()
    assert only_printable_ascii(stderr, b"\n"), stderr
    lines = stderr.decode().splitlines()
    assert all(json.loads(line) for line in lines)  # every line is an operational-log event
    assert code == 0


# -- 8. SMTP smuggling: the end-of-data variants of a public scanner -----------------------
# The cases of The-Login's SMTP Smuggling Tools, smtp_smuggling_scanner.py
# (https://github.com/The-Login/SMTP-Smuggling-Tools, commit 2d10d45): every fake
# end-of-data sequence it sends, inbound list and outbound list, in its own message.
SCANNER_EOD = [
    "\n.\n", "\n.\r", "\r.\n", "\r.\r", "\n.\r\n", "\r.\r\n", "\r\n\x00.\r\n",  # inbound
    "\r\n.\r\r\n", "\r\r\n.\r\r\n",  # the scanner's outbound list adds these
]  # fmt: skip
SMUGGLED = "smuggled@origin.test"


def scanner_message(eod: str, receiver: str) -> bytes:
    """The scanner's inbound check message: CRLF lines, the sequence inserted raw."""
    text = (
        "From: test@origin.test\nTo: {receiver}\nSubject: CHECK EMAIL ({name})\n"
        "Message-ID: <check@origin.test>\n\n"
        'TESTING {name} as "fake" end-of-data sequence!\n{inject}\n'
        "mail FROM:<{smuggled}>\nrcpt TO:<{receiver}>\ndata\n"
        "From: {smuggled}\nTo: {receiver}\nSubject: SMUGGLED EMAIL ({name})\n"
        "Message-ID: <smuggled@origin.test>\n\n"
        'SMUGGLING WORKS with {name} as "fake" end-of-data sequence!\n.\n'
    ).replace("\n", "\r\n")
    return text.format(inject=eod, name=repr(eod), smuggled=SMUGGLED, receiver=receiver).encode()


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("eod", SCANNER_EOD, ids=repr)
async def test_smuggling_scanner_sequences_deliver_no_second_message(
    relay_factory: RelayFactory, eod: str, mode: str
) -> None:
    async with Provider("legacy") as legacy:
        env = await relay_factory(legacy_port=legacy.port, top=f"bare_newline: {mode}\n")
        c = await greeted(env)
        expect(await c.cmd("MAIL FROM:<test@origin.test>"), 250, "2.1.0")
        expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
        expect(await c.cmd("DATA"), 354, None)
        await c.send(scanner_message(eod, "zed@example.com"))  # ends in the real <CRLF>.<CRLF>
        bare = "\r" in eod.replace("\r\n", "") or "\n" in eod.replace("\r\n", "")
        refused = mode == "reject" and bare
        first = await c.reply()
        expect(first, *((550, "5.5.2") if refused else (250, "2.0.0")))
        # The session is in step: the next transaction is the client's, not a smuggled one.
        expect(await c.cmd("MAIL FROM:<after@origin.test>"), 250, "2.1.0")
        expect(await c.cmd("RCPT TO:<zed@example.com>"), 250, "2.1.5")
        queued(await _data(c, b"Subject: after\r\n\r\nafter\r\n"))
        expect(await c.cmd("QUIT"), 221, "2.0.0")
        want = ["after@origin.test"] if refused else ["test@origin.test", "after@origin.test"]
        await legacy.wait_for_messages(len(want), timeout=10)
        await asyncio.sleep(0.2)  # a smuggled extra copy would arrive as well
        assert [e["mail_from"] for e in env.events("received")] == want
        assert sorted(m.mail_from for m in legacy.messages) == sorted(want)
        if not refused:
            (outer,) = [m for m in legacy.messages if m.mail_from == "test@origin.test"]
            assert f"mail FROM:<{SMUGGLED}>".encode() in outer.data  # carried as content
