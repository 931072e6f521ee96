"""Delivery status notifications (RFC 3464) for a primary delivery's final failure.

A DSN is queued in the spool like any message and sent through the `bounce`
smarthost (or the legacy provider's settings). Never for a null sender, never
for a DSN, never for a shadow delivery: the sender never hears of the pilot.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message as EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, make_msgid

from relay.delivery import Reply
from relay.log import DeliveryLog, utc_ts
from relay.records import Envelope, PlanEntry
from relay.scheduler import DeliveryState
from relay.spool import Spool, new_queue_id

HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Failure:
    rcpt: str  # the original recipient, as the sender wrote it
    status: str  # RFC 3463, e.g. 5.7.1; 4.4.7 when expired
    remote_mta: str
    diagnostic: str  # the provider's reply, or why there was none


def original_headers(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n", 0, HEADER_LIMIT)
    return content[: end + 2] if end >= 0 else content[:HEADER_LIMIT]


def build_dsn(
    *,
    hostname: str,
    sender: str,
    queue_id: str,
    arrival: datetime,
    failures: list[Failure],
    headers: bytes,
) -> bytes:
    """The multipart/report message, CRLF line endings.

    With a non-ASCII address or header it is an RFC 6533 report (global-*
    parts, sent with SMTPUTF8); otherwise plain RFC 3464.
    """
    utf8 = (
        not all(x.isascii() for x in (sender, *(f.rcpt for f in failures))) or not headers.isascii()
    )
    kind = "global-delivery-status" if utf8 else "delivery-status"
    report = MIMEMultipart("report", report_type=kind)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(datetime.now(UTC))
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    lines += [f"<{f.rcpt}>: {f.diagnostic}" for f in failures]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "utf-8"))

    blocks = [
        [
            ("Reporting-MTA", f"dns; {hostname}"),
            ("X-Relay-Queue-ID", queue_id),
            ("Arrival-Date", format_datetime(arrival)),
        ]
    ]
    blocks += [
        [
            ("Final-Recipient", f"{'utf-8' if utf8 else 'rfc822'}; {f.rcpt}"),
            ("Action", "failed"),
            ("Status", f.status),
            ("Remote-MTA", f"dns; {f.remote_mta}"),
            ("Diagnostic-Code", f"smtp; {f.diagnostic}"),
        ]
        for f in failures
    ]
    if utf8:
        text = "\r\n".join("".join(f"{k}: {v}\r\n" for k, v in b) for b in blocks)
        status = _base64_part(kind, text.encode())
        original = _base64_part("global-headers", headers)
    else:
        status = MIMENonMultipart("message", kind)
        status.set_payload([_fields(*b) for b in blocks])
        original = MIMENonMultipart("text", "rfc822-headers")
        original.set_payload(headers.decode("ascii").replace("\r\n", "\n"))
    report.attach(status)
    report.attach(original)
    return EmailMessage.as_bytes(report, policy=SMTPUTF8 if utf8 else SMTP)


def _base64_part(subtype: str, data: bytes) -> MIMENonMultipart:
    """An RFC 6533 message/global-* part; base64 keeps its UTF-8 intact on any path."""
    part = MIMENonMultipart("message", subtype)
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(base64.encodebytes(data).decode("ascii"))
    return part


def _fields(*pairs: tuple[str, str]) -> EmailMessage:
    block = EmailMessage()
    for name, value in pairs:
        block[name] = value
    return block


def failure_status(outcome: str, code: int | None, enhanced: str | None) -> str:
    if enhanced and enhanced[0] in "45":
        # an expired delivery's last reply was transient; the DSN reports failure
        return "5" + enhanced[1:] if outcome == "expired" else enhanced
    if outcome == "expired":
        return "4.4.7"
    return f"{code // 100}.0.0" if code else "5.0.0"


class Bouncer:
    """Turns final failures of primary deliveries into queued DSNs."""

    def __init__(
        self,
        spool: Spool,
        log: DeliveryLog,
        hostname: str,
        remote_mta: Callable[[str], str],
        clock: Callable[[], float],
        enqueue: Callable[[str, Envelope], object],
    ):
        self.spool = spool
        self.log = log
        self.hostname = hostname
        self.remote_mta = remote_mta  # provider name → host, for Remote-MTA
        self.clock = clock  # the scheduler's: expiry and latency use the same time
        self.enqueue = enqueue  # schedules the queued DSN: the scheduler's add

    def _head(self, queue_id: str) -> bytes:
        """The start of the message, enough for its header (never the whole body)."""
        fh, length = self.spool.open_content(queue_id)
        with fh:
            return fh.read(min(length, HEADER_LIMIT))

    async def bounce(
        self, queue_id: str, envelope: Envelope, failed: Sequence[tuple[DeliveryState, Reply]]
    ) -> str | None:
        """Queue one DSN for these failures; returns its queue id (None: no DSN due)."""
        sender = envelope.mail_from
        if not sender or envelope.dsn:
            return None
        failures = [
            Failure(
                d.plan.rcpt,
                failure_status(d.status, reply.code, reply.enhanced),
                self.remote_mta(d.plan.provider),
                f"{reply.code} {reply.text}" if reply.code else reply.text,
            )
            for d, reply in failed
            if d.plan.role == "primary"
        ]
        if not failures:
            return None
        content = await asyncio.to_thread(self._head, queue_id)
        dsn = build_dsn(
            hostname=self.hostname,
            sender=sender,
            queue_id=queue_id,
            arrival=datetime.fromtimestamp(envelope.received_epoch, UTC),
            failures=failures,
            headers=original_headers(content),
        )
        dsn_id = new_queue_id()
        now = datetime.fromtimestamp(self.clock(), UTC)
        record = Envelope(
            queue_id=dsn_id, received=utc_ts(now), received_epoch=now.timestamp(),
            mail_from="", rcpts=(sender,), options=() if sender.isascii() else ("SMTPUTF8",),
            client_ip=None, message_id=None, size=len(dsn), forwarded=False,
            plan=(PlanEntry(sender, "bounce", sender, "primary", None, None, False),),
            dsn=True, dsn_for=queue_id,
        )  # fmt: skip
        incoming = self.spool.begin(dsn_id)
        await self.spool.write(incoming, dsn)
        await self.spool.commit(incoming, record)
        for f in failures:
            self.log.emit("bounce_sent", queue_id=queue_id, rcpt=f.rcpt, dsn_queue_id=dsn_id)
        self.enqueue(dsn_id, record)
        return dsn_id
