"""What an attempt ends with: one `Reply` per recipient, classified.

Inside this package every aiosmtplib exception becomes a `Reply` (most through
`error_reply`), so none reaches the scheduler; whether a reply is done,
transient or permanent is decided here (`ok`, `permanent`).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPResponseException

Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "after_data"]
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b\s*")
_AUTH_CODES = frozenset({530, 534, 535, 538})
# The provider's id for the message in its final reply, in the forms the big
# MTAs and mailbox providers use; the first that matches wins.
_REMOTE_ID = tuple(
    re.compile(pattern, re.I)
    for pattern in (
        r"queued as\s+<?([^\s>]+)",  # Postfix: "2.0.0 Ok: queued as 4WxYz1abcD"
        r"\bid=([^\s,;]+)",  # Exim: "OK id=1tWxyz-000abc-De"
        r"\bOK\s+\d+\s+(\S+)\s+-\s+gsmtp\b",  # Gmail: "2.0.0 OK  1717171717 ID - gsmtp"
        r"<([^<>\s]+@[^<>\s]+)>.*queued mail for delivery",  # Microsoft 365
        r"\[InternalId=(\d+)",  # Microsoft 365, no Message-ID in the reply
        r"^(\S*\d\S*)\s+(?:message\s+)?accepted for delivery",  # Sendmail: "ID Message accepted…"
        r"^(?:ok\s+)?([\w.@-]*\d[\w.@-]{5,})$",  # a bare id: "2.0.0 ID", "Ok ID"
    )
)


@dataclass(frozen=True)
class Reply:
    """One recipient's outcome of an attempt; `code` is None when no reply came."""

    code: int | None
    text: str
    stage: Stage
    enhanced: str | None = None
    by: Literal["relay"] | None = None  # "relay": the relay decided it, no provider said it

    @classmethod
    def from_smtp(cls, code: int, message: str, stage: Stage) -> Reply:
        m = _ENHANCED.match(message)
        return cls(code, message, stage, m.group(1) if m else None)

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx is final (bounced), except configuration faults, which are deferred.

        SPEC: any failure at the AUTH stage (530, 534, 535, 538 or AUTH not
        offered) is deferred and logged, never bounced; the same codes at MAIL or
        later ("530 5.7.0 Authentication required", "must issue STARTTLS first")
        say the same thing. TLS failures are retried too.
        """
        if self.code is None or self.code < 500:
            return False
        return self.stage not in ("auth", "tls") and not self.auth_fault

    @property
    def auth_fault(self) -> bool:
        """A failure at the AUTH stage, or an AUTH code later: a wrong or missing login."""
        return not self.ok and (self.stage == "auth" or self.code in _AUTH_CODES)

    @property
    def too_many_recipients(self) -> bool:
        """A per-transaction recipient limit: "452 4.5.3", or Exim's bare "452 too many
        recipients" (RFC 5321 §4.5.3.1.10 gives 452 without an enhanced code)."""
        if self.code != 452:
            return False
        if self.enhanced is not None:
            return self.enhanced == "4.5.3"
        return "too many recipients" in self.text.lower()


@dataclass
class Attempt:
    """What one `Agent.send` found: a reply per recipient, and about the session."""

    replies: dict[str, Reply]
    tls: str | None = None
    remote_id: str | None = None
    dsn: bool = False  # the provider offers DSN (RFC 3461): it reports on, not the relay
    notes: list[str] = field(default_factory=list)


class Failed(Exception):
    """Every recipient still open gets this reply."""

    def __init__(self, reply: Reply):
        self.reply = reply


def error_reply(exc: BaseException, stage: Stage) -> Reply:
    """The reply an exception stands for: the provider's, or one with no code."""
    if isinstance(exc, SMTPResponseException) and exc.code >= 0:
        return Reply.from_smtp(exc.code, exc.message, stage)
    if isinstance(exc, asyncio.TimeoutError | aiosmtplib.SMTPTimeoutError):
        return Reply(None, f"timeout at {stage}", stage)
    return Reply(None, f"{type(exc).__name__} at {stage}: {exc}", stage)


def fill(replies: dict[str, Reply], rcpts: list[str], reply: Reply) -> None:
    """`reply` for each of `rcpts` that has none yet."""
    for rcpt in rcpts:
        replies.setdefault(rcpt, reply)


def remote_id(message: str) -> str | None:
    """The provider's id for the message in its final reply, if it gives one."""
    text = _ENHANCED.sub("", message.strip(), count=1)
    for pattern in _REMOTE_ID:
        if m := pattern.search(text):
            return m.group(1)
    return None
