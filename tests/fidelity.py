"""Real messages, and what a server's mailbox may differ in from what the client sent.

The corpus: the kinds of mail a pilot user really gets, each built to make a
sloppy hop show (a re-encoded attachment, a stripped 8th bit, a downgraded
UTF-8 header, a folded long line, a truncated big message).

What may differ between the client's DATA content and the file the server
stored (`check`), and nothing else may:

1. header fields prepended in front of the content: the server's own
   (`Store.fields`: exactly one `Received:`, and for Postfix's virtual(8) the
   delivery headers `Return-Path:`, `X-Original-To:`, `Delivered-To:`), then
   the relay's `Received:` and `X-Relay-Trace: <node> <queue id>` (SPEC
   "Fidelity"), in that order;
2. the line ending, where the server stores LF (`Store.newline`: Postfix's
   maildir), never within a line.

Every octet of the client's content, header and body, follows unchanged:
long lines unfolded, 8-bit octets as sent, no header added, removed or
re-encoded inside the message.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass

SENDER = "sender@example.org"
LONG_LINES = (999, 1000, 2048, 10_000)  # octets before CRLF; RFC 5321 §4.5.3.1.6 allows 998
BIG = 20 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One message of the corpus: its content (CRLF lines, not dot-stuffed) and envelope."""

    name: str
    data: bytes
    options: tuple[str, ...] = ()
    sender: str = SENDER


def _head(tag: str, subject: str, extra: str = "", sender: str = SENDER) -> str:
    return (
        f"From: Sender <{sender}>\r\n"
        f"To: Alice <alice@example.com>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        f"Message-ID: <{tag}@fidelity.test>\r\n"
        "MIME-Version: 1.0\r\n"
        f"{extra}"
    )


def _base64(data: bytes) -> bytes:
    """Base64 in 76-character lines with CRLF (RFC 2045 §6.8)."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def multipart(tag: str) -> Case:
    """multipart/mixed: a text part, an HTML part and a binary attachment (every octet value)."""
    blob = bytes(range(256)) * 4 + random.Random(tag).randbytes(300_000)
    b = f"=_b_{tag}"
    data = (
        (
            _head(tag, "Quarterly report", f'Content-Type: multipart/mixed; boundary="{b}"\r\n')
            + "\r\nThis is a multi-part message in MIME format.\r\n"
            f"--{b}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Hello Alice,\r\n\r\nthe report is attached.\r\n.\r\n..leading dots stay\r\n"
            f"--{b}\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
            "<p>Hello Alice,</p>\r\n<p>the report is attached.</p>\r\n"
            f"--{b}\r\nContent-Type: application/octet-stream; name=report.bin\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=report.bin\r\n\r\n"
        ).encode()
        + _base64(blob)
        + f"--{b}--\r\n".encode()
    )
    return Case("multipart", data)


def eight_bit(tag: str) -> Case:
    """8-bit bodies (BODY=8BITMIME): a UTF-8 part and a Latin-1 part, no transfer encoding."""
    b = f"=_b_{tag}"
    data = (
        _head(tag, "Gruesse", f'Content-Type: multipart/mixed; boundary="{b}"\r\n').encode()
        + f"\r\n--{b}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße aus Köln, ½ € für Ärger — naïve café, 日本語, emoji 📬\r\n".encode()
        + f"--{b}\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n".encode()
        + "Grüße aus Köln, ½ Preis, ÿ þ ß é\r\n".encode("latin-1")
        + bytes(range(0x80, 0x100)).replace(b"\x85", b"")  # every high octet (NEL aside)
        + f"\r\n--{b}--\r\n".encode()
    )
    return Case("8bit", data, ("BODY=8BITMIME",))


def smtputf8(tag: str) -> Case:
    """SMTPUTF8 (RFC 6531/6532): a UTF-8 sender address and raw UTF-8 in the headers."""
    sender = "jörg@example.org"
    data = (
        f"From: Jörg Müller <{sender}>\r\n"
        "To: Jürgen <jürgen@dev.example.com>\r\n"
        "Subject: Grüße aus Köln ✉\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        f"Message-ID: <{tag}@fidelity.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hallo Jürgen, schöne Grüße! 📨\r\n"
    ).encode()
    return Case("smtputf8", data, ("SMTPUTF8", "BODY=8BITMIME"), sender)


def long_lines(tag: str) -> Case:
    """Body lines over RFC 5321's 998 octets, and one header line of 1100 (no folding point)."""
    lines = b"".join(
        f"{n:05d}:".encode() + b"x" * (n - 6) + b"\r\n" for n in LONG_LINES
    )  # each line exactly n octets before its CRLF
    data = (
        _head(tag, "long lines", "X-Long-Header: " + "h" * 1085 + "\r\n").encode()
        + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        + lines
        + b"end\r\n"
    )
    return Case("long-lines", data)


def big(tag: str) -> Case:
    """A 20 MB message: a base64 attachment of random octets, as a big scan would be."""
    b = f"=_b_{tag}"
    head = (
        _head(tag, "20 MB", f'Content-Type: multipart/mixed; boundary="{b}"\r\n')
        + f"\r\n--{b}\r\nContent-Type: text/plain\r\n\r\nSee the scan.\r\n"
        f"--{b}\r\nContent-Type: application/pdf; name=scan.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = f"--{b}--\r\n".encode()
    raw = (BIG - len(head) - len(tail)) * 57 // 78  # 57 octets per 76-character line + CRLF
    data = head + _base64(random.Random(tag).randbytes(raw)) + tail
    return Case("20MB", data)


CORPUS = {f.__name__: f for f in (multipart, eight_bit, smtputf8, long_lines, big)}


@dataclass(frozen=True)
class Store:
    """How a server's mailbox files differ from the wire by design (see the module doc)."""

    fields: tuple[str, ...]  # header fields the server prepends (exactly one Received among them)
    newline: bytes = b"\r\n"


EXIM = Store(("Received",))
POSTFIX = Store(("Return-Path", "X-Original-To", "Delivered-To", "Received"), b"\n")
RELAY_TRACE = re.compile(
    rb"Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby \S+ \(relay\) with ESMTPS? id (?P<id1>\w+)(?:\r\n\tfor <[^>\r\n]+>)?; [^\r\n]+\r\n"
    rb"X-Relay-Trace: \S+ (?P<id2>\w+)\r\n"
)
_FIELD = re.compile(rb"[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def check(stored: bytes, sent: bytes, queue_id: str, store: Store) -> list[bytes]:
    """Assert that `stored` is `sent` with only the allowed differences; return the
    server's own prepended fields (CRLF lines), for the caller to look into."""
    wire = sent if store.newline == b"\r\n" else sent.replace(b"\r\n", store.newline)
    if not stored.endswith(wire):
        raise AssertionError(f"content changed on the way: {_first_difference(stored, wire)}")
    prefix = stored[: len(stored) - len(wire)]
    if store.newline != b"\r\n":
        assert b"\r" not in prefix, prefix
        prefix = prefix.replace(store.newline, b"\r\n")
    fields = _FIELD.findall(prefix)
    assert b"".join(fields) == prefix, f"not header fields: {prefix!r}"
    relay = RELAY_TRACE.fullmatch(b"".join(fields[-2:]))
    assert relay, f"the relay's trace headers are not last: {prefix!r}"
    assert relay["id1"].decode() == relay["id2"].decode() == queue_id, prefix
    own = fields[:-2]
    names = [f.split(b":", 1)[0].decode() for f in own]
    assert set(names) <= set(store.fields), f"unexpected fields prepended: {names}"
    assert names.count("Received") == 1, names
    return own


def _first_difference(stored: bytes, wire: bytes) -> str:
    """Where, counted from the end, `stored` stops matching `wire` (for the failure message)."""
    n = 0
    while n < min(len(stored), len(wire)) and stored[-1 - n] == wire[-1 - n]:
        n += 1
    at, there = len(wire) - n, len(stored) - n
    return (
        f"{len(stored)} octets stored for {len(wire)} sent; they differ at sent offset {at}: "
        f"sent {wire[max(0, at - 40) : at + 40]!r}, "
        f"stored {stored[max(0, there - 40) : there + 40]!r}"
    )
