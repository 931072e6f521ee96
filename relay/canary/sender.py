"""The canary sender inside `relay serve`: every `canary.every` seconds one
DKIM-signed message through the relay's own listener, so it takes exactly the
path of pilot mail (ingress, spool, plan, both providers)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

import aiosmtplib
import dkim

from relay.canary import CANARY_GROUP, CANARY_HEADER
from relay.canary.config import CanarySettings
from relay.config import Config, ConfigIssue
from relay.log import oplog
from relay.routing import PilotTable, route

KINDS = ("plain", "link", "attachment")  # rotated, so a filter on one kind shows up
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id", CANARY_HEADER.lower().encode()]


def route_issues(cfg: Config) -> list[ConfigIssue]:
    """`relay check`: the legacy canary mailbox must be a `(canary)` pilot entry whose
    plan reaches exactly the two `canary.mailboxes`."""
    c = cfg.relay.canary
    if not c.enabled:
        return []

    def issue(key: str, msg: str) -> ConfigIssue:
        loc = ("canary", *key.split("."))
        return ConfigIssue(cfg.shown, cfg.line_of(loc), f"canary.{key}", msg)

    issues = []
    key = c.dkim.key_file
    if key is not None and not key.is_file():
        issues.append(issue("dkim.key_file", f"{key}: file not found"))
    r = route(c.mailboxes.legacy, PilotTable.build(cfg.pilots, cfg.relay), datetime.now(UTC))
    by = {d.provider: d for d in r.deliveries}
    if not by or any(d.group != CANARY_GROUP for d in by.values()):
        issues.append(issue("mailboxes.legacy", f"not a pilot entry of group {CANARY_GROUP}"))
    elif by.get("legacy") is None or by["legacy"].delivered_to != c.mailboxes.legacy:
        issues.append(issue("mailboxes.legacy", "not routed to the legacy provider"))
    elif by.get("new") is None or by["new"].delivered_to.lower() != c.mailboxes.new.lower():
        got = by["new"].delivered_to if "new" in by else "nothing"
        issues.append(issue("mailboxes.new", f"the pilot entry routes to {got} at new"))
    return issues


def build(c: CanarySettings, n: int, now: datetime, node: str) -> tuple[str, bytes]:
    """The `n`th canary (kind `KINDS[n % 3]`) and its id, signed when a key is set."""
    cid = f"{node}.{int(now.timestamp())}.{uuid.uuid4().hex[:12]}"
    kind = KINDS[n % len(KINDS)]
    msg = EmailMessage()
    msg["From"] = c.from_
    msg["To"] = c.mailboxes.legacy
    msg["Subject"] = f"relay canary {cid}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<canary.{cid}@{c.dkim.domain}>"
    msg[CANARY_HEADER] = cid
    text = f"Canary {cid} ({kind}) from relay node {node}.\n"
    if kind == "link":
        text += f"Status: https://{c.dkim.domain}/canary/{cid}\n"
    msg.set_content(text)
    if kind == "attachment":
        msg.add_attachment(f"canary {cid}\n".encode(), "text", "plain", filename="canary.txt")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    if c.dkim.key_file is not None:
        sig = dkim.sign(
            data, c.dkim.selector.encode(), c.dkim.domain.encode(), c.dkim.key_file.read_bytes(),
            canonicalize=(b"relaxed", b"simple"), include_headers=SIGNED,
        )  # fmt: skip
        data = sig + data
    return cid, data


class CanarySender:
    """One canary per interval to 127.0.0.1:`port`; a failed send is logged, never fatal."""

    def __init__(
        self,
        c: CanarySettings,
        port: int,
        node: str,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.c, self.port, self.node, self.now, self.sleep = c, port, node, now, sleep
        self.sent = 0

    async def send_one(self) -> str:
        """Send the next canary; its id."""
        cid, data = build(self.c, self.sent, self.now(), self.node)
        self.sent += 1
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False, timeout=60)
        await smtp.connect()
        try:
            _, reply = await smtp.sendmail(self.c.from_, [self.c.mailboxes.legacy], data)
        finally:
            await smtp.quit()
        oplog.info("canary sent", canary=cid, reply=reply)
        return cid

    async def run(self) -> None:
        while True:
            await self.sleep(self.c.every)
            try:
                await self.send_one()
            except (aiosmtplib.SMTPException, OSError) as exc:
                oplog.warning("canary not sent", error=str(exc))
