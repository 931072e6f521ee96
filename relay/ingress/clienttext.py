"""Text a client wrote (EHLO name, addresses), checked before use and escaped before display.

An envelope address with a control character or invalid UTF-8 would be
accepted by the SMTP engine's parser and then be impossible to send on: it is refused at
MAIL/RCPT (`address_refusal`). What does get in reaches a header or a log
only through `printable`, so no client can write raw bytes (terminal escapes,
NUL, 8-bit) into the relay's `Received:` header, its logs or stderr.
"""

from __future__ import annotations

import re

from relay.ingress.replies import Reply

FIELD_LIMIT = 256  # octets of client text in a header or log field (SPEC "Hostile input")
# C0 controls (tab included: RFC 5321 allows none, quoted or not), DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What the engine's surrogateescape decoding makes of octets that are not UTF-8.
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")
_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # everything but printable ASCII minus "\"
_TOKEN = re.compile(r"\\\\|\\x..|.", re.DOTALL)  # one character of `printable`'s output


def address_refusal(address: str, smtputf8: bool) -> tuple[str, str] | None:
    """(reply, reason for the log) for an address no provider could be sent, or None."""
    if _NOT_UTF8.search(address):
        return Reply.BAD_ADDRESS_OCTETS, "invalid UTF-8 in address"
    if _CONTROL.search(address):
        return Reply.BAD_ADDRESS_OCTETS, "control character in address"
    if not smtputf8 and not address.isascii():
        return Reply.NEED_SMTPUTF8, "non-ASCII address without SMTPUTF8"
    return None


def _escape(match: re.Match[bytes]) -> bytes:
    octet = match.group()[0]
    return b"\\\\" if octet == 0x5C else b"\\x%02x" % octet


def printable(text: str, limit: int = FIELD_LIMIT) -> str:
    """`text` as printable ASCII: other octets as `\\xNN`, "\\" as `\\\\`; at most `limit` octets.

    Octets are those the client sent (UTF-8, or raw octets the engine decoded
    with surrogateescape). A cut never splits an escape.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from somewhere other than the wire
        raw = text.encode("utf-8", "backslashreplace")
    escaped = _UNSAFE.sub(_escape, raw).decode("ascii")
    if len(escaped) <= limit:
        return escaped
    # Every "\\" in `escaped` starts an escape, so reading tokens from the start is exact.
    cuts = (token.start() for token in _TOKEN.finditer(escaped) if token.end() > limit)
    return escaped[: next(cuts)]
