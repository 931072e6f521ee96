"""RFC 3461 DSN parameters: `RET` and `ENVID` on MAIL, `NOTIFY` and `ORCPT` on RCPT.

Read at the ingress (`parse_mail`, `parse_rcpt`: any bad syntax is a
`DsnSyntaxError`, answered `501 5.5.4`), stored decoded with the message
(relay/records.py), written back as xtext to a provider that offers DSN
(`mail_options`, `rcpt_options`), and read by the relay's own DSNs
(relay/bounce.py). The SMTP engine upper-cases every parameter and refuses any on
RCPT (as aiosmtpd did), so the ingress takes these out of the command line before it
sees it (`split_parameters`): ENVID and ORCPT keep their case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from relay.records import PlanEntry, Status

Action = Literal["failed", "delayed", "relayed"]  # the DSNs the relay itself sends
MAIL_KEYWORDS = frozenset({"RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
NOTIFY_CONDITIONS = ("SUCCESS", "FAILURE", "DELAY")
# RFC 3461 §4: the room DSN parameters add to a MAIL and a RCPT command line.
MAIL_ROOM = 113
RCPT_ROOM = 523
ENVID_MAX = 100  # octets of the xtext (RFC 3461 §4.4)
ORCPT_MAX = 500  # octets of the xtext (RFC 3461 §4.2)

# xtext (RFC 3461 §4): "!".."~" but "+" and "=", or "+" and two upper-case hex digits
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_XCHAR_SAFE = frozenset(chr(c) for c in range(33, 127)) - {"+", "="}
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*/=?^_`{|}~+-]+")


class DsnSyntaxError(ValueError):
    """A DSN parameter the client got wrong; the message says which and how."""


@dataclass(frozen=True, slots=True)
class MailDsn:
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None  # decoded


@dataclass(frozen=True, slots=True)
class RcptDsn:
    notify: str | None = None  # NEVER, or some of SUCCESS,FAILURE,DELAY (comma-separated)
    orcpt: str | None = None  # decoded: "rfc822;alice@example.com"


def xtext_decode(value: str, what: str) -> str:
    if not _XTEXT.fullmatch(value):
        raise DsnSyntaxError(f"{what}: not xtext (RFC 3461 section 4)")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    """xtext of a decoded value; a non-ASCII character as its UTF-8 octets."""
    return "".join(
        c if c in _XCHAR_SAFE else "".join(f"+{b:02X}" for b in c.encode("utf-8", "replace"))
        for c in value
    )


def split_parameters(arg: str, keywords: frozenset[str]) -> tuple[str, list[str]]:
    """`FROM:<a> SIZE=1 RET=FULL` → (`FROM:<a> SIZE=1`, [`RET=FULL`]): the command
    argument without the parameters named by `keywords`, and those parameters.

    The address ends at the `>` that closes it outside a quoted string (or, without
    angle brackets, at the first space): a quoted local part may hold spaces.
    """
    colon = arg.find(":")
    if colon < 0:
        return arg, []
    start = colon + 1
    while start < len(arg) and arg[start] == " ":
        start += 1
    end = _address_end(arg, start)
    head, tokens = arg[:end], arg[end:].split()
    taken = [t for t in tokens if t.partition("=")[0].upper() in keywords]
    if not taken:
        return arg, []
    kept = [t for t in tokens if t.partition("=")[0].upper() not in keywords]
    return " ".join([head, *kept]), taken


def _address_end(arg: str, start: int) -> int:
    if arg[start : start + 1] != "<":
        space = arg.find(" ", start)
        return len(arg) if space < 0 else space
    quoted = escaped = False
    for i in range(start + 1, len(arg)):
        c = arg[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i + 1
    return len(arg)  # unterminated: the engine refuses the address


def _by_keyword(tokens: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in tokens:
        keyword, eq, value = token.partition("=")
        keyword = keyword.upper()
        if not eq or not value:
            raise DsnSyntaxError(f"{keyword} needs a value")
        if keyword in out:
            raise DsnSyntaxError(f"{keyword} given twice")
        out[keyword] = value
    return out


def parse_mail(tokens: list[str]) -> MailDsn:
    """RET and ENVID of a MAIL command (RFC 3461 §4.3, §4.4)."""
    params = _by_keyword(tokens)
    ret = params.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnSyntaxError("RET must be FULL or HDRS")
    envid = params.get("ENVID")
    if envid is not None:
        if len(envid) > ENVID_MAX:
            raise DsnSyntaxError(f"ENVID longer than {ENVID_MAX} characters")
        envid = xtext_decode(envid, "ENVID")
    return MailDsn(ret, envid)


def parse_rcpt(tokens: list[str]) -> RcptDsn:
    """NOTIFY and ORCPT of a RCPT command (RFC 3461 §4.1, §4.2)."""
    params = _by_keyword(tokens)
    notify = params.get("NOTIFY")
    if notify is not None:
        conditions = notify.upper().split(",")
        if conditions != ["NEVER"] and (
            len(set(conditions)) != len(conditions) or not set(conditions) <= set(NOTIFY_CONDITIONS)
        ):
            raise DsnSyntaxError("NOTIFY must be NEVER or some of SUCCESS,FAILURE,DELAY")
        notify = ",".join(conditions)
    orcpt = params.get("ORCPT")
    if orcpt is not None:
        kind, semicolon, address = orcpt.partition(";")
        if not semicolon or not _ATOM.fullmatch(kind) or not address:
            raise DsnSyntaxError("ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com")
        if len(orcpt) > ORCPT_MAX:
            raise DsnSyntaxError(f"ORCPT longer than {ORCPT_MAX} characters")
        orcpt = f"{kind};{xtext_decode(address, 'ORCPT')}"
    return RcptDsn(notify, orcpt)


def notifies(notify: str | None, condition: str) -> bool:
    """Whether the relay sends a DSN for `condition` (FAILURE, DELAY, SUCCESS).

    Without NOTIFY: failures and delays, RFC 3461 §4.1's "FAILURE,DELAY" default
    (delay warnings only where `retry.delay_warning` is set); never a success.
    """
    if notify is None:
        return condition != "SUCCESS"
    return condition in notify.split(",")


def notice(plan: PlanEntry, status: Status, provider_dsn: bool, warn: bool) -> Action | None:
    """The DSN a delivery's new status calls for, as its NOTIFY says (relay/dsn.py).

    `provider_dsn`: the provider offers DSN (a success is then its to report);
    `warn`: the message is past `retry.delay_warning` and not yet warned about.
    """
    if plan.role != "primary":
        return None
    if status in ("bounced", "expired"):
        return "failed" if notifies(plan.notify, "FAILURE") else None
    if status == "delivered":
        return "relayed" if not provider_dsn and notifies(plan.notify, "SUCCESS") else None
    if status == "deferred" and warn and notifies(plan.notify, "DELAY"):
        return "delayed"
    return None


def mail_options(ret: str | None, envid: str | None) -> list[str]:
    """RET and ENVID for a provider's MAIL command."""
    out = [f"RET={ret}"] if ret else []
    return out + ([f"ENVID={xtext_encode(envid)}"] if envid is not None else [])


def rcpt_options(notify: str | None, orcpt: str | None) -> list[str]:
    """NOTIFY and ORCPT for a provider's RCPT command."""
    out = [f"NOTIFY={notify}"] if notify else []
    if orcpt is not None:
        kind, _, address = orcpt.partition(";")
        out.append(f"ORCPT={kind};{xtext_encode(address)}")
    return out
