"""The loopback test provider (relay.testing) driven by aiosmtplib, smtplib and raw sockets."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Iterator

import aiosmtplib
import pytest
import trustme

from relay.testing import Provider, ProviderThread, ReceivedMessage, Rule

pytestmark = pytest.mark.timeout(20)

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    async with Provider("legacy") as p:
        yield p
    assert p.errors == []


@pytest.fixture(scope="module")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def client(p: Provider, **kwargs: object) -> aiosmtplib.SMTP:
    kwargs.setdefault("start_tls", False)
    kwargs.setdefault("timeout", 5)
    return aiosmtplib.SMTP(hostname=p.host, port=p.port, **kwargs)  # type: ignore[arg-type]


async def send(p: Provider, sender: str, rcpts: list[str], data: bytes = MESSAGE, **kw: object):
    async with client(p, **kw) as smtp:
        return await smtp.sendmail(sender, rcpts, data)


class Raw:
    """A raw SMTP client: exact bytes out, reply lines in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, p: Provider) -> Raw:
        return cls(*await asyncio.open_connection(p.host, p.port))

    async def reply(self, timeout: float = 5) -> str:
        """One complete (possibly multi-line) reply, lines joined with newlines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise ConnectionError("closed: " + "\n".join(lines))
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5) -> bool:
        """True once the server closed the connection (which is then closed here too)."""
        rest = await asyncio.wait_for(self.reader.read(), timeout)
        self.close()
        return rest == b""

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------- accepting


async def test_accept_records_message_byte_exact(provider: Provider) -> None:
    long_line = b"x" * 200_000
    data = (
        b"Subject: t\r\n\r\n"
        + long_line
        + b"\r\n.leading dot\r\n..two dots\r\n.\r\n"  # a lone "." inside is stuffed and back
        + "ünïcödé 8bit\r\n".encode()
        + b"\ttabs and trailing spaces  \r\n\r\n"
    )
    async with client(provider) as smtp:
        errors, reply = await smtp.sendmail(
            "a@example.com", ["B@Example.com"], data, mail_options=["BODY=8BITMIME"]
        )
    assert errors == {}
    [msg] = provider.messages
    assert msg.data == data
    assert msg.mail_from == "a@example.com"
    assert msg.rcpts == ["B@Example.com"]
    assert "BODY=8BITMIME" in msg.mail_options
    assert f"SIZE={len(data)}" in msg.mail_options
    assert (msg.tls, msg.auth_user, msg.connection) == (False, None, 1)
    assert re.fullmatch(r"2\.0\.0 Ok: queued as [0-9A-F]{12}", reply)
    assert reply.endswith(msg.queue_id)
    assert provider.received_for("b@example.com") == [msg]
    assert provider.received_for("a@example.com") == []
    assert provider.dropped_after_data == []


async def test_ehlo_advertises_extensions(provider: Provider) -> None:
    async with client(provider) as smtp:
        await smtp.ehlo()
        for ext in ("8bitmime", "smtputf8", "size", "pipelining", "enhancedstatuscodes"):
            assert smtp.supports_extension(ext), ext
        assert not smtp.supports_extension("starttls")
        assert not smtp.supports_extension("auth")
        assert smtp.esmtp_extensions["size"] == str(32 * 1024 * 1024)


async def test_null_sender_and_smtputf8(provider: Provider) -> None:
    await send(provider, "", ["postmaster@example.com"])
    async with client(provider) as smtp:
        await smtp.sendmail("ä@example.com", ["ö@example.com"], MESSAGE, mail_options=["SMTPUTF8"])
    bounce, utf8 = provider.messages
    assert bounce.mail_from == ""
    assert any(c.startswith("MAIL FROM:<>") for c in provider.commands)
    assert (utf8.mail_from, utf8.rcpts) == ("ä@example.com", ["ö@example.com"])
    assert "SMTPUTF8" in utf8.mail_options


async def test_extensions_can_be_switched_off() -> None:
    async with Provider("old", smtputf8=False, eight_bit_mime=False) as p:
        async with client(p) as smtp:
            await smtp.ehlo()
            assert not smtp.supports_extension("smtputf8")
            assert not smtp.supports_extension("8bitmime")
            with pytest.raises(aiosmtplib.SMTPNotSupported):
                await smtp.sendmail("ä@x", ["b@x"], MESSAGE, mail_options=["SMTPUTF8"])
        raw = await Raw.connect(p)
        await raw.reply()
        await raw.cmd("EHLO me")
        assert (await raw.cmd("MAIL FROM:<a@x> BODY=8BITMIME")).startswith("555 5.5.4")
        raw.close()


async def test_dsn_flag_offers_dsn_and_records_the_parameters_as_sent() -> None:
    async with Provider("dsn", dsn=True) as p:
        async with client(p) as smtp:
            await smtp.ehlo()
            assert smtp.supports_extension("dsn")
            await smtp.mail("a@x", options=["RET=HDRS", "ENVID=Id+2B1"])
            await smtp.rcpt("b@x", options=["NOTIFY=NEVER", "ORCPT=rfc822;B@X"])
            await smtp.rcpt("c@x")
            await smtp.data(MESSAGE)
        [m] = p.messages
        assert m.mail_options[-2:] == ["RET=HDRS", "ENVID=Id+2B1"]  # case kept
        assert m.rcpt_options == {"b@x": ["NOTIFY=NEVER", "ORCPT=rfc822;B@X"], "c@x": []}
    async with Provider("plain") as p:  # without the flag: no DSN, its parameters refused
        raw = await Raw.connect(p)
        await raw.reply()
        assert "DSN" not in await raw.cmd("EHLO me")
        assert (await raw.cmd("MAIL FROM:<a@x> RET=FULL")).startswith("555")
        assert (await raw.cmd("MAIL FROM:<a@x>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<b@x> NOTIFY=NEVER")).startswith("555")
        raw.close()


async def test_max_line_length_and_size_limit() -> None:
    async with Provider("strict", max_line_length=998, size_limit=5000) as p:
        async with client(p) as smtp:
            with pytest.raises(aiosmtplib.SMTPDataError) as too_long:
                await smtp.sendmail("a@x", ["b@x"], b"y" * 999 + b"\r\n")
            assert too_long.value.code == 500
            assert too_long.value.message.startswith("5.5.2")
            await smtp.sendmail("a@x", ["b@x"], b"y" * 998 + b"\r\n")
        raw = await Raw.connect(p)  # no SIZE= given, so only the DATA reader can tell
        await raw.reply()
        for line in ("EHLO me", "MAIL FROM:<a@x>", "RCPT TO:<b@x>", "DATA"):
            await raw.cmd(line)
        await raw.send((b"z" * 900 + b"\r\n") * 10 + b".\r\n")
        assert (await raw.reply()).startswith("552 5.3.4")
        assert (await raw.cmd("NOOP")).startswith("250")  # session still usable
        raw.close()
        assert [len(m.data) for m in p.messages] == [1000]


async def test_raw_pipelining_dot_stuffing_and_empty_message(provider: Provider) -> None:
    raw = await Raw.connect(provider)
    assert (await raw.reply()).startswith("220 legacy.test ESMTP")
    assert "PIPELINING" in await raw.cmd("EHLO raw.example")
    await raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    assert [await raw.reply() for _ in range(3)] == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    # Bare CR and LF stay in the content; only CRLF.CRLF ends it; the next
    # transaction is pipelined right behind the final dot, in the same write.
    body = b"a\nb\rc\r\n..x\r\n...\r\n.\r\nMAIL FROM:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n"
    await raw.send(body)
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert [await raw.reply() for _ in range(3)][2].startswith("354")
    await raw.send(b".\r\nQUIT\r\n")  # empty message
    assert (await raw.reply()).startswith("250 2.0.0")
    assert await raw.reply() == "221 Bye"
    assert await raw.closed()
    first, empty = provider.messages
    assert first.data == b"a\nb\rc\r\n.x\r\n..\r\n"
    assert (empty.mail_from, empty.rcpts, empty.data) == ("c@x", ["d@x"], b"")
    assert provider.commands == [
        "EHLO raw.example",
        "MAIL FROM:<a@x>",
        "RCPT TO:<b@x>",
        "DATA",
        "MAIL FROM:<c@x>",
        "RCPT TO:<d@x>",
        "DATA",
        "QUIT",
    ]


async def test_abrupt_disconnects_leave_no_errors(provider: Provider) -> None:
    for cut_after in (b"", b"EHLO x\r\n", b"EHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n"):
        raw = await Raw.connect(provider)
        await raw.send(cut_after)
        raw.writer.transport.abort()
    raw = await Raw.connect(provider)  # in the middle of DATA
    await raw.reply()
    for line in ("EHLO x", "MAIL FROM:<a@x>", "RCPT TO:<b@x>", "DATA"):
        await raw.cmd(line)
    await raw.send(b"half a message\r\n")
    raw.close()
    await provider.wait_for_connections(4)
    await asyncio.sleep(0.1)
    await send(provider, "a@x", ["b@x"])  # still serving
    assert len(provider.messages) == 1
    # the fixture asserts provider.errors == []


# ----------------------------------------------------------------------- rules


async def test_partial_acceptance_per_recipient(provider: Provider) -> None:
    provider.add(Rule("defer", rcpt="Later@x"))
    provider.add(Rule("reject", rcpt="nobody@x"))
    errors, _ = await send(provider, "a@x", ["ok@x", "later@x", "nobody@x"])
    assert {r: (e.code, e.message) for r, e in errors.items()} == {
        "later@x": (451, "4.3.0 Try again later"),
        "nobody@x": (550, "5.1.1 User unknown"),
    }
    [msg] = provider.messages
    assert msg.rcpts == ["ok@x"]


async def test_defer_once_then_accept(provider: Provider) -> None:
    rule = provider.add(Rule("defer", rcpt="b@x", times=1))
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(provider, "a@x", ["b@x"])
    assert refused.value.recipients[0].code == 451
    assert provider.messages == []
    errors, _ = await send(provider, "a@x", ["b@x"])
    assert errors == {}
    assert rule.applied == 1 and rule.used_up
    assert [m.rcpts for m in provider.messages] == [["b@x"]]


async def test_first_matching_rule_wins_and_custom_replies(provider: Provider) -> None:
    provider.add(Rule("accept", rcpt="vip@x"))
    provider.add(Rule("reject", code=554, text="5.7.1 Go away"))
    provider.add(Rule("defer", rcpt="vip@x"))  # never reached
    provider.add(Rule("defer", stage="mail", code=452, times=1))  # 452 + default text
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as sender:
        await send(provider, "a@x", ["vip@x"])
    assert (sender.value.code, sender.value.message) == (452, "4.3.0 Try again later")
    errors, _ = await send(provider, "a@x", ["vip@x", "other@x"])
    assert {r: (e.code, e.message) for r, e in errors.items()} == {
        "other@x": (554, "5.7.1 Go away")
    }
    # the enhanced code's class follows a custom code
    assert Rule("reject", code=450).reply() == "450 4.1.1 User unknown"
    assert Rule("defer", stage="connect").reply().startswith("421 4.3.2")


async def test_reject_after_data_when_content_matches(provider: Provider) -> None:
    provider.add(Rule("reject", stage="after_data", contains=b"SPAM", text="5.7.1 Spam"))
    with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
        await send(provider, "a@x", ["b@x"], b"Subject: SPAM SPAM\r\n\r\nbuy\r\n")
    assert (rejected.value.code, rejected.value.message) == (550, "5.7.1 Spam")
    await send(provider, "a@x", ["b@x"], b"Subject: ham\r\n\r\nhi\r\n")
    assert [m.data for m in provider.messages] == [b"Subject: ham\r\n\r\nhi\r\n"]
    assert provider.dropped_after_data == []


async def test_stage_rules_data_and_connect_and_ehlo(provider: Provider) -> None:
    provider.add(Rule("defer", stage="data", rcpt="b@x", times=1))
    with pytest.raises(aiosmtplib.SMTPDataError) as deferred:
        await send(provider, "a@x", ["b@x"])
    assert deferred.value.code == 451
    provider.add(Rule("reject", stage="connect", times=1))
    with pytest.raises(aiosmtplib.SMTPConnectError, match="554"):
        await send(provider, "a@x", ["b@x"])
    provider.add(Rule("defer", stage="ehlo", code=421, times=1))
    with pytest.raises(aiosmtplib.SMTPResponseException) as ehlo:
        await send(provider, "a@x", ["b@x"])
    assert ehlo.value.code == 421
    await send(provider, "a@x", ["b@x"])
    assert len(provider.messages) == 1
    assert provider.connections == 4


async def test_hang_at_rcpt_times_out_client_and_stop_closes_it() -> None:
    p = Provider("hangs")
    await p.start()
    p.add(Rule("hang", rcpt="slow@x"))
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await send(p, "a@x", ["slow@x"], timeout=0.3)
    raw = await Raw.connect(p)  # a hung connection the client keeps open
    await raw.reply()
    for line in ("EHLO x", "MAIL FROM:<a@x>"):
        await raw.cmd(line)
    await raw.send(b"RCPT TO:<slow@x>\r\n")
    await p.wait_until(lambda: p.commands.count("RCPT TO:<slow@x>") == 2, what="2nd RCPT")
    started = time.monotonic()
    await p.stop()
    assert await raw.closed(timeout=2)
    assert time.monotonic() - started < 1
    assert p.messages == [] and p.errors == []


async def test_hang_after_data_counts_as_dropped(provider: Provider) -> None:
    provider.add(Rule("hang", stage="after_data", times=1))
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await send(provider, "a@x", ["b@x"], timeout=0.3)
    assert provider.messages == []
    [maybe] = provider.dropped_after_data
    assert maybe.data == MESSAGE
    await send(provider, "a@x", ["b@x"])  # rule used up
    assert len(provider.messages) == 1


async def test_drop_after_data(provider: Provider) -> None:
    provider.add(Rule("drop", stage="after_data", rcpt="b@x"))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(provider, "a@x", ["b@x"])
    assert provider.messages == []
    assert [m.rcpts for m in provider.dropped_after_data] == [["b@x"]]
    assert provider.dropped_after_data[0].queue_id == ""


async def test_drop_at_rcpt_and_connect(provider: Provider) -> None:
    provider.add(Rule("drop", rcpt="b@x"))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(provider, "a@x", ["b@x"])
    provider.clear()
    provider.add(Rule("drop", stage="connect"))
    with pytest.raises((aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected)):
        await send(provider, "a@x", ["b@x"])
    assert provider.messages == [] and provider.dropped_after_data == []


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="contains"):
        Rule("reject", stage="rcpt", contains=b"x")
    with pytest.raises(ValueError, match="rcpt"):
        Rule("reject", stage="mail", rcpt="a@x")
    with pytest.raises(ValueError, match="action"):
        Rule("bounce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loopback"):
        Provider(host="0.0.0.0")


# ----------------------------------------------------------------- connections


async def test_connection_counting(provider: Provider) -> None:
    for i in range(3):
        await send(provider, "a@x", [f"r{i}@x"])
    assert provider.connections == 3
    assert [m.connection for m in provider.messages] == [1, 2, 3]
    async with client(provider) as smtp:  # two transactions, one connection
        await smtp.sendmail("a@x", ["r3@x"], MESSAGE)
        await smtp.sendmail("a@x", ["r4@x"], MESSAGE)
    assert provider.connections == 4
    assert [m.connection for m in provider.messages[3:]] == [4, 4]


async def test_restart_on_same_port(provider: Provider) -> None:
    port = provider.port
    await provider.stop()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await send(provider, "a@x", ["b@x"])
    await provider.start()
    assert provider.port == port
    await send(provider, "a@x", ["b@x"])
    assert len(provider.messages) == 1


# -------------------------------------------------------------------------- TLS


async def test_starttls(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    async with Provider("new", tls_context=server_tls, starttls=True) as p:
        async with client(p, start_tls=True, tls_context=client_tls) as smtp:
            assert smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
            await smtp.sendmail("a@x", ["b@x"], MESSAGE)
        await send(p, "a@x", ["c@x"])  # same provider, plain
        assert [(m.tls, m.connection) for m in p.messages] == [(True, 1), (False, 2)]
        assert p.connections == 2  # STARTTLS does not count as a connection
        assert p.commands.count("STARTTLS") == 1
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust it
            await send(p, "a@x", ["d@x"], start_tls=True)
        assert len(p.messages) == 2
        assert p.errors == []  # a failed handshake is the client's business


async def test_require_starttls(server_tls: ssl.SSLContext) -> None:
    strict = Provider("strict", tls_context=server_tls, starttls=True, require_starttls=True)
    async with strict as p, client(p) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.sendmail("a@x", ["b@x"], MESSAGE)
        assert refused.value.code == 530


async def test_implicit_tls(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    async with Provider("tls", tls_context=server_tls, implicit_tls=True) as p:
        async with client(p, use_tls=True, tls_context=client_tls) as smtp:
            await smtp.ehlo()
            assert not smtp.supports_extension("starttls")
            await smtp.sendmail("a@x", ["b@x"], MESSAGE)
        assert [(m.tls, m.data) for m in p.messages] == [(True, MESSAGE)]
        # a client that does not trust the certificate fails the handshake
        with pytest.raises(aiosmtplib.SMTPConnectError):
            await send(p, "a@x", ["b@x"], use_tls=True)
        assert p.errors == []


# ------------------------------------------------------------------------- AUTH


async def test_auth_success_and_failure() -> None:
    async with Provider("auth", auth={"relay": "s3cret"}) as p:
        async with client(p) as smtp:
            await smtp.ehlo()
            assert set(smtp.server_auth_methods) == {"plain", "login"}
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as unauth:
                await smtp.sendmail("a@x", ["b@x"], MESSAGE)
            assert (unauth.value.code, unauth.value.message[:5]) == (530, "5.7.0")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
                await smtp.auth_login("relay", "wrong")
            assert (bad.value.code, bad.value.message[:5]) == (535, "5.7.8")
            await smtp.auth_plain("relay", "s3cret")
            await smtp.sendmail("a@x", ["b@x"], MESSAGE)
        [msg] = p.messages
        assert msg.auth_user == "relay"
        assert p.auth_attempts == [("LOGIN", "relay"), ("PLAIN", "relay")]
        assert [c for c in p.commands if c.startswith("AUTH")] == [
            "AUTH LOGIN <redacted>",
            "AUTH PLAIN <redacted>",
        ]
        secret = base64.b64encode(b"\0relay\0s3cret").decode()
        assert not any(secret in c or "s3cret" in c for c in p.commands)


async def test_auth_not_offered_without_users(provider: Provider) -> None:
    raw = await Raw.connect(provider)
    await raw.reply()
    assert "AUTH" not in await raw.cmd("EHLO x")
    assert (await raw.cmd("AUTH PLAIN AHUAcA==")).startswith("502 5.5.1")
    raw.close()
    assert provider.auth_attempts == []


# ---------------------------------------------------------------------- waiting


async def test_wait_for_messages(provider: Provider) -> None:
    sender = asyncio.create_task(send(provider, "a@x", ["b@x"]))
    await provider.wait_for_messages(1, timeout=5)
    await sender
    with pytest.raises(TimeoutError, match=r"2 message\(s\).*1 message\(s\) accepted"):
        await provider.wait_for_messages(2, timeout=0.2)


# ---------------------------------------------------------------------- threads


@pytest.fixture
def provider_thread() -> Iterator[ProviderThread]:
    with ProviderThread("threaded") as pt:
        yield pt
    assert pt.provider.errors == []


def test_provider_thread_with_sync_client(provider_thread: ProviderThread) -> None:
    pt = provider_thread
    pt.provider.add(Rule("defer", rcpt="later@x", times=1))
    with smtplib.SMTP(pt.host, pt.port, timeout=5) as smtp:
        refused = smtp.sendmail("a@x", ["b@x", "later@x"], MESSAGE)
        assert refused == {"later@x": (451, b"4.3.0 Try again later")}
        smtp.sendmail("a@x", ["later@x"], MESSAGE)
    pt.wait_for_messages(2, timeout=5)
    assert [m.rcpts for m in pt.messages] == [["b@x"], ["later@x"]]
    assert all(isinstance(m, ReceivedMessage) for m in pt.messages)
    assert pt.call(len, pt.provider.messages) == 2
    with pytest.raises(TimeoutError, match="3 message"):
        pt.wait_for_messages(3, timeout=0.1)


def test_provider_thread_stop_with_hung_connection() -> None:
    pt = ProviderThread("hung").start()
    pt.provider.add(Rule("hang", stage="connect"))
    sock = smtplib.socket.create_connection((pt.host, pt.port), timeout=5)
    pt.wait_until(lambda: pt.provider.connections == 1)
    started = time.monotonic()
    pt.stop()
    assert time.monotonic() - started < 2
    assert sock.recv(100) == b""
    sock.close()
    assert pt.provider.errors == []
