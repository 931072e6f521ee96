"""The relay's SMTP replies: every code and text it sends, enhanced codes for the rest.

`Reply` names each reply of SPEC "Replies"; `with_enhanced` gives aiosmtpd's
own replies (syntax errors, HELP, QUIT...) an RFC 3463 enhanced status code too.
"""

from __future__ import annotations

import re

# Enhanced status codes (RFC 3463) for aiosmtpd's own replies, by reply code.
_ENHANCED = {
    "221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "421": "4.3.0", "451": "4.3.0", "452": "4.3.1",
    "454": "4.7.0", "500": "5.5.1", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "535": "5.7.8", "550": "5.7.1", "552": "5.3.4",
    "553": "5.1.3", "554": "5.7.0", "555": "5.5.4",
}  # fmt: skip
_HAS_ENHANCED = re.compile(rb"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b")
# aiosmtpd texts that need a different code or wording than the default above.
_REWRITE = {
    b"500 Command line too long": b"500 5.5.2 Line too long",
    b"500 Error: bad syntax": b"500 5.5.2 Error: bad syntax",
    b"220 Ready to start TLS": b"220 2.0.0 Ready to start TLS",
}


class Reply:
    """Named replies (SPEC "Replies"); one place for every code and text."""

    OK_MAIL = "250 2.1.0 Ok"
    OK_RCPT = "250 2.1.5 Ok"
    RELAY_DENIED = "550 5.7.1 Relaying denied"
    BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
    BAD_ADDRESS_OCTETS = "553 5.1.3 Bad address syntax: control character or invalid UTF-8"
    NEED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send a non-ASCII address"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    UNKNOWN_USER = "550 5.1.1 User unknown"
    VERIFY_PENDING = "450 4.1.1 Recipient address verification pending"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
    LINE_TOO_LONG = "500 5.5.2 Line too long"
    BARE_NEWLINE = "550 5.5.2 Bare <LF> or <CR> received; use <CR><LF> line endings"
    LOOP = "554 5.4.6 Too many hops (mail loop?)"
    LOOP_TRACE = "554 5.4.6 Mail loop: this relay's own trace header seen"
    NO_SPACE = "452 4.3.1 Insufficient system storage"
    TOO_MANY_CONN = "421 4.7.0 Too many connections, try again later"
    TOO_MANY_CONN_IP = "421 4.7.0 Too many connections from your address, try again later"
    TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors, closing connection"
    IDLE = "421 4.4.2 Idle timeout, closing connection"
    DATA_SLOW = "421 4.4.2 DATA timeout, closing connection"
    INTERNAL = "451 4.3.0 Internal error, try again later"
    SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
    NO_AUTH = "503 5.5.1 Error: authentication not enabled"
    TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
    NEED_RCPT = "503 5.5.1 Error: need RCPT command"
    DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
    DSN_SYNTAX = "501 5.5.4 Bad DSN parameter"
    GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"

    @staticmethod
    def queued(queue_id: str) -> str:
        return f"250 2.0.0 Ok: queued as {queue_id}"


def with_enhanced(status: bytes) -> bytes:
    """Give an aiosmtpd reply an enhanced status code if it lacks one."""
    if status in _REWRITE:
        return _REWRITE[status]
    code = status[:3].decode("ascii", "replace")
    if len(status) < 4 or status[3:4] != b" " or code not in _ENHANCED:
        return status
    if _HAS_ENHANCED.match(status):
        return status
    if status.startswith(b"500 Error: command"):
        return b"500 5.5.1 " + status[4:]
    return f"{code} {_ENHANCED[code]} ".encode() + status[4:]
