"""Real messages through the relay into real servers' mailboxes (slow; `-m realservers`):
the corpus of tests/fidelity.py (multipart with a binary attachment, 8-bit bodies,
SMTPUTF8, lines over 998 octets, 20 MB) byte for byte, through Exim 4.96 (as `new`,
a `Provider` stand-in as legacy) and through Postfix (as both providers).

Each stored file must be the client's DATA content with only the header fields
fidelity.py allows in front of it; the server's own `Received:` names the id it
answered the relay with (the delivery log's `remote_id`).

Lines over 998 octets: the relay passes them unchanged (SPEC: up to
`limits.max_line_length`), and both servers accept and store them unchanged
into a mailbox (Exim 4.96's `message_linelength_limit` binds only its smtp
transport; Postfix's smtpd splits lines over `line_length_limit` into records
that virtual(8) writes back joined). What a server's own onward SMTP would do
with them is not the relay's to decide.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.testing import Provider
from tests import exim as exim_helpers
from tests import fidelity, test_delivery, test_postfix
from tests.exim import Exim
from tests.test_delivery import Env, Factory, Sent, assert_faithful, until
from tests.test_postfix import Postfix

make_env = test_delivery.make_env  # the relay-in-process fixture, shared
exim_fixture = exim_helpers.exim_fixture
postfix = test_postfix.postfix  # its private Postfix fixture, shared

pytestmark = [pytest.mark.slow, pytest.mark.realservers, pytest.mark.timeout(120)]


async def send(env: Env, name: str, rcpt: str) -> tuple[fidelity.Case, Sent, bytes]:
    """Send corpus message `name` to `rcpt`; the case, what was sent and its Message-ID."""
    tag = env.marker()
    case = fidelity.CORPUS[name](tag)
    sent = await env.send([rcpt], sender=case.sender, options=case.options, data=case.data)
    return case, sent, f"<{tag}@fidelity.test>".encode()


@pytest.mark.parametrize("name", fidelity.CORPUS)
async def test_fidelity_through_exim(make_env: Factory, exim: Exim, name: str) -> None:
    env = await make_env(new=Provider("unused-new"), new_cfg=exim.settings(data_timeout=60))
    utf8 = name == "smtputf8"
    rcpt, mailbox = (
        ("jürgen@dev.example.com", "jürgen@dev.example-new.com")
        if utf8
        else ("alice@example.com", "alice@example-new.com")
    )
    case, sent, needle = await send(env, name, rcpt)
    await env.wait_events(2, outcome="delivered", timeout=60)
    [legacy] = [m for m in env.legacy.messages if needle in m.data]
    assert_faithful(legacy, sent)  # the stand-in adds nothing: only the relay's two headers
    [event] = env.events(provider="new")
    [stored] = await exim.stored(mailbox, needle)
    [received] = fidelity.check(stored, case.data, sent.queue_id, fidelity.EXIM)
    protocol = "utf8esmtp" if utf8 else "esmtp"
    assert f"\tby {exim_helpers.HOSTNAME} with {protocol} (Exim 4.96)\r\n".encode() in received
    assert f"\tid {event['remote_id']}\r\n".encode() in received, (received, event)
    [arrival] = [line for line in exim.log_of(event["remote_id"]) if " <= " in line]
    assert f" <= {case.sender} " in arrival and f" P={protocol} " in arrival, arrival
    assert f" for {mailbox}" in arrival


@pytest.fixture(scope="module")
def big_postfix(postfix: Postfix) -> Iterator[Postfix]:
    """The module's Postfix, taking 50 MB messages (its default limit is 10 MB)."""
    etc = str(postfix.base / "etc")
    subprocess.run(["postconf", "-c", etc, "-e", "message_size_limit = 52428800"], check=True)
    reloads = postfix.log.count("reload -- version")
    subprocess.run(["postfix", "-c", etc, "reload"], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while postfix.log.count("reload -- version") == reloads:
        assert time.monotonic() < deadline, "postfix did not reload"
        time.sleep(0.1)
    yield postfix


def postfix_mailbox(postfix: Postfix, address: str, needle: bytes) -> list[bytes]:
    folder = Path(postfix.base / "mail" / address / "new")
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return [data for p in files if needle in (data := p.read_bytes())]


@pytest.mark.parametrize("name", fidelity.CORPUS)
async def test_fidelity_through_postfix(make_env: Factory, big_postfix: Postfix, name: str) -> None:
    """Postfix as both providers: the primary copy at alice@example.com, the shadow at
    alice@example-new.com, both stored by virtual(8) in Maildir (LF line ends)."""
    postfix = big_postfix
    at = {"host": "127.0.0.1", "port": postfix.port, "data_timeout": 60}
    env = await make_env(
        legacy=Provider("unused"), new=Provider("unused-new"), legacy_cfg=at, new_cfg=at
    )
    case, sent, needle = await send(env, name, "alice@example.com")
    events = await env.wait_events(2, outcome="delivered", timeout=60)
    for address in ("alice@example.com", "alice@example-new.com"):
        [stored] = await until(lambda a=address: postfix_mailbox(postfix, a, needle), 30,
                               f"{name} in {address}'s maildir")  # fmt: skip
        fields = fidelity.check(stored, case.data, sent.queue_id, fidelity.POSTFIX)
        [received] = [f for f in fields if f.startswith(b"Received:")]
        [event] = [e for e in events if e["delivered_to"] == address]
        m = re.search(rb"\(Postfix\) with (\w+) id (\w+)", received)
        assert m, received
        assert m[2].decode() == event["remote_id"], (received, event)
        assert m[1] == (b"UTF8SMTP" if name == "smtputf8" else b"ESMTP")
        assert f"Delivered-To: {address}\r\n".encode() in fields
