"""Delivery status notifications (RFC 3464) about primary deliveries, as RFC 3461's
NOTIFY asks: a final failure (`failed`), a delay warning (`delayed`, with
`retry.delay_warning`), and `relayed` for NOTIFY=SUCCESS to a provider that
does not offer DSN (one that does reports the success itself).

A DSN is queued in the spool like any message and sent through the `bounce`
smarthost (or the legacy provider's settings). Never for a null sender, never
for a DSN, never for a shadow delivery: the sender never hears of the pilot.
It carries the message's headers, or the whole message for RET=FULL up to
FULL_LIMIT octets (Postfix's bounce_size_limit).
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
from relay.dsn import Action
from relay.log import DeliveryLog, utc_ts
from relay.records import Envelope, PlanEntry
from relay.scheduler import DeliveryState
from relay.spool import Spool, new_queue_id

HEADER_LIMIT = 256 * 1024
FULL_LIMIT = 50_000  # octets: a larger message is returned as its headers (Postfix's default)
_WORDING: dict[Action, tuple[str, str]] = {  # (Subject, what the text part says)
    "failed": (
        "Undelivered Mail Returned to Sender",
        "Your message could not be delivered to one or more recipients.",
    ),
    "delayed": (
        "Delayed Mail (still being retried)",
        "Your message could not be delivered yet to one or more recipients. Delivery is "
        "still being tried; you do not need to resend it.",
    ),
    "relayed": (
        "Successful Mail Delivery Report",
        "Your message was relayed to the destination(s) listed below, which do not report "
        "delivery: you may still hear of a failure from them.",
    ),
}


@dataclass(frozen=True)
class Failure:
    """One recipient's block in a DSN (of whichever action)."""

    rcpt: str  # the original recipient, as the sender wrote it
    status: str  # RFC 3463, e.g. 5.7.1; 4.4.7 when expired
    remote_mta: str
    diagnostic: str  # the provider's reply, or why there was none
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded ("rfc822;alice@example.com")


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
    action: Action = "failed",
    envid: str | None = None,
    full: bool = False,
    retry_until: datetime | None = None,
) -> bytes:
    """The multipart/report message, CRLF line endings.

    `headers` is the returned part: the message's header section, or with `full`
    the whole message (message/rfc822, its bytes unchanged). `retry_until`: a
    delay warning's Will-Retry-Until. With a non-ASCII address or header it is
    an RFC 6533 report (global-* parts, sent with SMTPUTF8); otherwise plain
    RFC 3464.
    """
    head = original_headers(headers) if full else headers
    utf8 = not all(x.isascii() for x in (sender, *(f.rcpt for f in failures))) or not (
        head.isascii()
    )
    kind = "global-delivery-status" if utf8 else "delivery-status"
    subject, summary = _WORDING[action]
    report = MIMEMultipart("report", report_type=kind)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = sender
    report["Subject"] = subject
    report["Date"] = format_datetime(datetime.now(UTC))
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    lines = [f"This is the mail system at host {hostname}.", "", summary, ""]
    lines += [f"<{f.rcpt}>: {f.diagnostic}" for f in failures]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "utf-8"))

    blocks = [
        [
            *([("Original-Envelope-Id", envid)] if envid is not None else []),
            ("Reporting-MTA", f"dns; {hostname}"),
            ("X-Relay-Queue-ID", queue_id),
            ("Arrival-Date", format_datetime(arrival)),
        ]
    ]
    blocks += [
        [
            *([("Original-Recipient", f.orcpt)] if f.orcpt is not None else []),
            ("Final-Recipient", f"{'utf-8' if utf8 else 'rfc822'}; {f.rcpt}"),
            ("Action", action),
            ("Status", f.status),
            ("Remote-MTA", f"dns; {f.remote_mta}"),
            ("Diagnostic-Code", f"smtp; {f.diagnostic}"),
            *([("Will-Retry-Until", format_datetime(retry_until))] if retry_until else []),
        ]
        for f in failures
    ]
    if utf8:
        text = "\r\n".join("".join(f"{k}: {v}\r\n" for k, v in b) for b in blocks)
        status = _base64_part(kind, text.encode())
        original = _base64_part("global" if full else "global-headers", headers)
    else:
        status = MIMENonMultipart("message", kind)
        status.set_payload([_fields(*b) for b in blocks])
        if full:  # a string payload is written as it is: the message's own bytes
            original = MIMENonMultipart("message", "rfc822")
            original.set_payload(headers.decode("ascii", "surrogateescape"))
        else:
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
    """The Status field: the reply's enhanced code, in the class of what is reported."""
    if outcome == "delivered":
        return enhanced if enhanced and enhanced[0] == "2" else "2.0.0"
    if enhanced and enhanced[0] in "45":
        # an expired delivery's last reply was transient; the DSN reports failure
        return "5" + enhanced[1:] if outcome == "expired" else enhanced
    if outcome == "expired":
        return "4.4.7"
    if outcome == "deferred":
        return f"{code // 100}.0.0" if code and code // 100 == 4 else "4.4.1"
    return f"{code // 100}.0.0" if code else "5.0.0"


class Bouncer:
    """Turns what happened to primary deliveries into queued DSNs."""

    def __init__(
        self,
        spool: Spool,
        log: DeliveryLog,
        hostname: str,
        remote_mta: Callable[[str], str],
        clock: Callable[[], float],
        enqueue: Callable[[str, Envelope], object],
        max_age: float = 432_000,
    ):
        self.spool = spool
        self.log = log
        self.hostname = hostname
        self.remote_mta = remote_mta  # provider name → host, for Remote-MTA
        self.clock = clock  # the scheduler's: expiry and latency use the same time
        self.enqueue = enqueue  # schedules the queued DSN: the scheduler's add
        self.max_age = max_age  # retry.max_age: a delay warning's Will-Retry-Until

    def _returned(self, queue_id: str, full: bool) -> tuple[bytes, bool]:
        """What the DSN returns: the whole message when `full` and it fits FULL_LIMIT
        (then True), else the start of it, enough for its header."""
        fh, length = self.spool.open_content(queue_id)
        with fh:
            if full and length <= FULL_LIMIT:
                return fh.read(length), True
            return original_headers(fh.read(min(length, HEADER_LIMIT))), False

    async def bounce(
        self,
        queue_id: str,
        envelope: Envelope,
        items: Sequence[tuple[DeliveryState, Reply]],
        action: Action = "failed",
    ) -> str | None:
        """Queue one DSN of `action` about these deliveries; returns its queue id
        (None: no DSN due)."""
        sender = envelope.mail_from
        if not sender or envelope.dsn:
            return None
        failures = [
            Failure(
                d.entry.rcpt,
                failure_status(d.status, reply.code, reply.enhanced),
                self.remote_mta(d.entry.provider),
                f"{reply.code} {reply.text}" if reply.code else reply.text,
                d.entry.orcpt,
            )
            for d, reply in items
            if d.entry.role == "primary"
        ]
        if not failures:
            return None
        full = action == "failed" and envelope.ret == "FULL"  # RFC 3461 §4.3
        returned, full = await asyncio.to_thread(self._returned, queue_id, full)
        dsn = build_dsn(
            hostname=self.hostname,
            sender=sender,
            queue_id=queue_id,
            arrival=datetime.fromtimestamp(envelope.received_epoch, UTC),
            failures=failures,
            headers=returned,
            action=action,
            envid=envelope.envid,
            full=full,
            retry_until=(
                datetime.fromtimestamp(envelope.received_epoch + self.max_age, UTC)
                if action == "delayed" else None
            ),
        )  # fmt: skip
        dsn_id = new_queue_id()
        now = datetime.fromtimestamp(self.clock(), UTC)
        options: tuple[str, ...] = ("SMTPUTF8",) if not sender.isascii() else ()
        if not dsn.isascii():  # a returned message with an 8-bit body
            options += ("BODY=8BITMIME",)
        record = Envelope(
            queue_id=dsn_id, received=utc_ts(now), received_epoch=now.timestamp(),
            mail_from="", rcpts=(sender,), options=options,
            client_ip=None, message_id=None, size=len(dsn), forwarded=False,
            plan=(PlanEntry(sender, "bounce", sender, "primary", None, None, False),),
            dsn=True, dsn_for=queue_id,
        )  # fmt: skip
        incoming = self.spool.begin(dsn_id)
        await self.spool.write(incoming, dsn)
        await self.spool.commit(incoming, record)
        for f in failures:
            self.log.emit(
                "bounce_sent", queue_id=queue_id, rcpt=f.rcpt, dsn_queue_id=dsn_id,
                **({"action": action} if action != "failed" else {}),
            )  # fmt: skip
        self.enqueue(dsn_id, record)
        return dsn_id
