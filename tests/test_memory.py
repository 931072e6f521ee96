"""SPEC "Bounded memory": relaying a 50 MB message raises peak RSS by less than 100 MB.

End to end through a real `python -m relay serve` (uvloop, as in production):
the message is streamed into the spool on the way in and from the spool file
in chunks on the way out, to two providers at once. Peak RSS is the
process's VmHWM (/proc/PID/status), read after a warm-up message and again
once both providers hold the big one; both copies must be byte-exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import aiosmtplib
import pytest

from relay.testing import Provider
from tests.harness import free_port
from tests.relayproc import RelayProcess, write_relay_config

pytestmark = pytest.mark.timeout(180)

TRACE = re.compile(
    rb"Received: from [^\r\n]+\r\n\tby relay\.test \(relay\) with ESMTP id (\w+)\r\n"
    rb"\tfor <alice@example(?:-new)?\.com>; [^\r\n]+\r\nX-Relay-Trace: crash (\w+)\r\n"
)


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def big_message(size: int) -> bytes:
    """About `size` bytes of CRLF lines: dot lines (stuffing across every chunk
    boundary the sender may pick), long lines, blank lines, 8-bit-free text."""
    head = (
        b"From: big@example.org\r\nTo: alice@example.com\r\nSubject: fifty megabytes\r\n"
        b"Message-ID: <big@test>\r\n\r\n"
    )
    block = b"".join(
        [
            b".leading dot on a line of its own kind\r\n",
            b"..two leading dots\r\n",
            b".\r\nx.\r\n",  # a lone dot line, and a dot ending a line
            b"0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n" * 97,
            b"\r\n",
        ]
    )
    long_line = b"L" * 60_000 + b"\r\n"  # under limits.max_line_length (65536)
    body: list[bytes] = []
    total = len(head)
    n = 0
    while total < size:
        part = long_line if n % 50 == 49 else block
        body.append(part)
        total += len(part)
        n += 1
    return head + b"".join(body) + b".\r\nend\r\n"


async def send(port: int, rcpts: list[str], data: bytes) -> str:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=120,
        local_hostname="client.test",
    )  # fmt: skip
    async with smtp:
        errors, reply = await smtp.sendmail("big@example.org", rcpts, data)
    assert errors == {}, errors
    m = re.search(r"queued as (\w+)", reply)
    assert m, reply
    return m.group(1)


async def test_50mb_message_relayed_to_two_providers_in_bounded_memory(tmp_path: Path) -> None:
    legacy = Provider("legacy", size_limit=None)
    new = Provider("new", size_limit=None)
    await legacy.start()
    await new.start()
    port = free_port()
    slow = {"command_timeout": 120, "data_timeout": 120}  # the test providers parse line by line
    cfg = write_relay_config(tmp_path, port, legacy, new, {"legacy": slow, "new": slow})
    relay = RelayProcess(cfg, port, tmp_path / "relay-stderr.log")
    try:
        relay.start()
        await relay.wait_ready()
        assert relay.proc is not None
        # warm up every code path (ingress, spool, both deliveries) before the baseline
        await send(port, ["alice@example.com"], b"Subject: warm-up\r\n\r\nhello\r\n")
        await legacy.wait_for_messages(1)
        await new.wait_for_messages(1)
        await asyncio.sleep(0.2)
        before = vm_hwm_kb(relay.proc.pid)

        content = big_message(50_000_000)
        assert len(content) >= 50_000_000
        digest = hashlib.sha256(content).hexdigest()
        qid = await send(port, ["alice@example.com"], content)
        await legacy.wait_for_messages(2, timeout=120)
        await new.wait_for_messages(2, timeout=120)
        after = vm_hwm_kb(relay.proc.pid)
        growth_mb = (after - before) / 1024
        print(f"50 MB message to two providers: peak RSS grew by {growth_mb:.1f} MB")

        for p in (legacy, new):
            got = p.messages[1].data
            prefix = got[: len(got) - len(content)]
            m = TRACE.fullmatch(prefix)
            assert m, prefix[:400]
            assert m.group(1).decode() == m.group(2).decode() == qid
            assert hashlib.sha256(got[len(prefix) :]).hexdigest() == digest, p.name
            assert len(p.messages) == 2 and p.dropped_after_data == []
        assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB"
    finally:
        relay.stop_quietly()
        await legacy.stop()
        await new.stop()
