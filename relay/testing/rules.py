"""How a stand-in provider answers (Rule) and what it records (ReceivedMessage)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

Action = Literal["accept", "defer", "reject", "hang", "drop"]
Stage = Literal["connect", "ehlo", "mail", "rcpt", "data", "after_data"]

ACTIONS: tuple[str, ...] = get_args(Action)
STAGES: tuple[str, ...] = get_args(Stage)
_RCPT_STAGES = ("rcpt", "data", "after_data")


@dataclass
class ReceivedMessage:
    """One transaction the provider accepted (or swallowed, see ``dropped_after_data``)."""

    mail_from: str
    """Envelope sender; ``""`` for the null sender ``<>``."""
    rcpts: list[str]
    """The recipients the provider accepted, in RCPT order."""
    data: bytes
    """DATA content after dot-unstuffing, line endings as sent, without the final ``.\\r\\n``."""
    mail_options: list[str]
    """MAIL FROM parameters, upper-cased by aiosmtpd, e.g. ``["SIZE=123", "BODY=8BITMIME"]``."""
    tls: bool
    """The session was under TLS (STARTTLS or implicit)."""
    auth_user: str | None
    """The user the session authenticated as, if any."""
    connection: int
    """1-based index of the TCP connection that carried the message."""
    queue_id: str = ""
    """The id given in the ``250 2.0.0 Ok: queued as <id>`` reply ("" if never accepted)."""
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)
    """RCPT parameters per accepted recipient, as sent (``dsn=True``: NOTIFY, ORCPT)."""


# Default (code, text) per (action, stage); anything not listed uses the action default.
_DEFAULT_REPLIES: dict[tuple[str, str], tuple[int, str]] = {
    ("defer", "connect"): (421, "4.3.2 Service not available, try again later"),
    ("reject", "connect"): (554, "5.7.1 Connection refused"),
    ("reject", "ehlo"): (550, "5.7.1 Client host rejected"),
    ("reject", "mail"): (550, "5.7.1 Sender address rejected"),
    ("reject", "rcpt"): (550, "5.1.1 User unknown"),
    ("reject", "data"): (550, "5.7.1 Transaction rejected"),
    ("reject", "after_data"): (550, "5.7.1 Message rejected"),
}
_ACTION_DEFAULTS: dict[str, tuple[int, str]] = {
    "defer": (451, "4.3.0 Try again later"),
    "reject": (550, "5.7.1 Rejected"),
}


@dataclass
class Rule:
    """How the provider answers at one stage of the session.

    Rules are evaluated in list order and the first match wins; a stage with no
    matching rule is accepted.  ``times`` limits how often a rule applies
    (``applied`` counts the uses), so ``Rule("defer", rcpt="b@x", times=1)``
    defers the first RCPT for ``b@x`` and accepts the next.

    * ``stage="connect"``: the greeting.  defer → ``421`` and close, reject →
      ``554`` and close.
    * ``"ehlo"`` (also HELO), ``"mail"``, ``"rcpt"`` (one answer per recipient).
    * ``"data"``: the answer to the DATA command itself.
    * ``"after_data"``: the answer after the final ``.``.  Only an accept
      records the message in ``Provider.messages``; hang and drop record it in
      ``Provider.dropped_after_data`` (the provider may have it, the client
      never got an answer).  ``code``/``text`` of an accept rule replace the
      ``250 2.0.0 Ok: queued as <id>`` reply there (and are ignored elsewhere).

    ``rcpt`` matches one recipient at the rcpt stage, and any recipient of the
    transaction at the data/after_data stages (case-insensitive).  ``contains``
    matches the message content (after_data only).  A reply whose code is 421
    closes the connection after it is sent, as RFC 5321 says.
    """

    action: Action
    stage: Stage = "rcpt"
    rcpt: str | None = None
    contains: bytes | None = None
    code: int | None = None
    text: str | None = None
    times: int | None = None
    applied: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Rule.action must be one of {ACTIONS}, not {self.action!r}")
        if self.stage not in STAGES:
            raise ValueError(f"Rule.stage must be one of {STAGES}, not {self.stage!r}")
        if self.rcpt is not None and self.stage not in _RCPT_STAGES:
            raise ValueError(f"Rule.rcpt only applies at stages {_RCPT_STAGES}")
        if self.contains is not None and self.stage != "after_data":
            raise ValueError("Rule.contains only applies at stage 'after_data'")
        if self.code is not None and not 200 <= self.code <= 599:
            raise ValueError(f"Rule.code must be an SMTP reply code, not {self.code}")
        if self.times is not None and self.times < 0:
            raise ValueError("Rule.times must be >= 0 or None")

    @property
    def used_up(self) -> bool:
        return self.times is not None and self.applied >= self.times

    def matches(
        self,
        stage: str,
        *,
        rcpt: str | None = None,
        rcpts: Sequence[str] = (),
        content: bytes | None = None,
    ) -> bool:
        if self.stage != stage or self.used_up:
            return False
        if self.rcpt is not None:
            wanted = self.rcpt.lower()
            if stage == "rcpt":
                if rcpt is None or rcpt.lower() != wanted:
                    return False
            elif all(r.lower() != wanted for r in rcpts):
                return False
        return self.contains is None or (content is not None and self.contains in content)

    def reply(self) -> str:
        """The reply line for a defer/reject (also used for hang/drop in error messages)."""
        default_code, default_text = _DEFAULT_REPLIES.get(
            (self.action, self.stage), _ACTION_DEFAULTS.get(self.action, (250, "2.0.0 Ok"))
        )
        if self.contains is not None and self.action == "reject":
            default_text = "5.7.1 Message content rejected"
        code = self.code if self.code is not None else default_code
        text = self.text
        if text is None:
            text = default_text
            if str(code)[0] != text[0]:  # keep the enhanced code's class in step with the code
                text = str(code)[0] + text[1:]
        return f"{code} {text}"
