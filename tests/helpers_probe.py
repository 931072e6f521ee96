"""Helpers for the placement probe's tests: configuration, a relay with stand-ins, waits."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib

PILOTS = """\
new_domains:
  example.com: example-new.com
pilots:
  - {address: ann@example.com, group: sales}
  - {address: ben@example.com, group: sales}
  - {address: cid@example.com, group: support}
  - {address: dot@example.com, group: support}
  - {address: eve@example.com, group: support, probe: false}
"""


def probe_yaml(
    legacy_smtp: int,
    new_smtp: int,
    providers: dict[str, str],
    *,
    delays: str = "[0.4, 1.2]",
    give_up_after: float = 2.5,
    extra: str = "",
) -> str:
    """relay.yaml with a `placement:` section; `providers` maps a name to its flow mapping."""
    probed = "".join(f"    {name}: {body}\n" for name, body in providers.items())
    return (
        textwrap.dedent(f"""\
        listen: {{host: 127.0.0.1, port: 0, hostname: relay.test}}
        node: node1
        domains: [example.com]
        providers:
          legacy: {{port: {legacy_smtp}, connect_timeout: 2}}
          new: {{port: {new_smtp}, connect_timeout: 2}}
        bounce: {{port: {legacy_smtp}}}
        spool: spool
        log: deliveries.jsonl
        shutdown_timeout: 1
        metrics: {{host: 127.0.0.1, port: 0}}
        retry: {{schedule: [0.2]}}
        limits: {{min_free_space: 0}}
        placement:
          enabled: true
          log: placement.jsonl
          delays: {delays}
          give_up_after: {give_up_after}
          metrics_port: 0
          providers:
        """)
        + probed
        + textwrap.dedent(extra)
    )


def message(i: int, rcpt: str, headers: dict[str, str], message_id: bool = True) -> bytes:
    lines = [f"From: <sender{i}@origin.test>", f"To: <{rcpt}>", f"Subject: test {i}"]
    if message_id:
        lines.append(f"Message-ID: <probe-{i}@origin.test>")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\nBody of message " + str(i) + ".\r\n").encode()


async def send_all(port: int, items: list[tuple[str, bytes]]) -> list[str]:
    """Send each (rcpt, data) in one session; the queue ids in order."""
    ids: list[str] = []
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await smtp.connect()
    for i, (rcpt, data) in enumerate(items):
        _, reply = await smtp.sendmail(f"sender{i}@origin.test", [rcpt], data)
        ids.append(reply.split()[-1])
    await smtp.quit()
    return ids


def events(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


async def wait_until(pred: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    """Poll `pred` (cheap, local state) until it holds; fail with `what` after `timeout`."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)
    assert pred(), what
