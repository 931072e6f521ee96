"""SPEC Part 2: a message received without Message-ID gets one at ingress, on both copies."""

# ruff: noqa: F811 - the relay_factory fixture is imported, then named as a parameter
from __future__ import annotations

import re

import pytest

from tests.helpers_ingress import RelayFactory, relay_factory  # noqa: F401

pytestmark = pytest.mark.timeout(20)


def _qid(text: str) -> str:
    m = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", text)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize(
    ("chunks", "has_id"),
    [
        ([b"Subject: x\r\nMessage-ID: <keep@origin.test>\r\n\r\nbody\r\n"], True),
        ([b"Subject: x\r\nmessage-id:\r\n <folded@origin.test>\r\n\r\nbody\r\n"], True),
        ([b"Subject: x\r\nFrom: a@origin.test\r\n\r\nbody\r\n"], False),
        # the header section arrives in pieces: the added header still goes on top, once
        ([b"Subject: x\r\nFr", b"om: a@origin.test\r", b"\n\r\nbody\r\n"], False),
        ([b"Subject: only a header\r\n"], False),  # no blank line, no body
        ([b"\r\nbody without a header section\r\n"], False),
    ],
)
async def test_message_id_added_only_when_absent(
    relay_factory: RelayFactory, chunks: list[bytes], has_id: bool
) -> None:
    env = await relay_factory()
    c = await env.client()
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<s@origin.test>")).code == 250
    assert (await c.cmd("RCPT TO:<alice@example.com>")).code == 250  # a pilot: two copies
    assert (await c.cmd("DATA")).code == 354
    for chunk in chunks:
        await c.send(chunk)
    await c.send(b".\r\n")
    qid = _qid((await c.reply()).text)
    data = env.content(qid)
    sent = b"".join(chunks)
    head, _, rest = data.partition(b"X-Relay-Trace: test-node " + qid.encode() + b"\r\n")
    assert head.startswith(b"Received: ")
    (ev,) = env.events("received")
    if has_id:
        assert rest == sent
        assert "message_id_added" not in ev and ev["message_id"].endswith("@origin.test>")
    else:
        added = f"<{qid}.test-node@relay.test>"
        assert rest == f"Message-ID: {added}\r\n".encode() + sent
        assert ev["message_id"] == added and ev["message_id_added"] is True
        assert ev["size"] == len(sent)  # as received: the added header is not counted
    assert len(ev["plan"]) == 2  # the one spooled content is what both providers get
