"""Incremental SMTP DATA parser: terminator, dot-unstuffing, bare newlines, limits.

aiosmtpd's own reader splits at CRLF with a 1001-byte line limit and keeps the
whole message in memory (DESIGN traps 5 and 11). This one is fed chunks as
they arrive and returns content to stream into the spool.

Only `<CRLF>.<CRLF>` ends DATA: a "." line after a bare LF does not (SMTP
smuggling). Under `normalize` a bare LF or CR becomes CRLF, as Postfix 3.9's
`smtpd_forbid_bare_newline = normalize`; under `reject` the message is refused
after the end of data.
"""

from __future__ import annotations

import enum


class DataError(enum.Enum):
    TOO_BIG = "size"
    LINE_TOO_LONG = "line"
    BARE_NEWLINE = "bare"


class DataParser:
    def __init__(self, *, max_size: int, max_line_length: int, reject_bare: bool):
        self.max_size = max_size
        self.max_line = max_line_length
        self.reject_bare = reject_bare
        self.size = 0  # octets received, as sent (before unstuffing)
        self.done = False
        self.error: DataError | None = None
        self.rest = b""  # bytes after the terminator: pipelined commands
        self._pending = b""
        self._prev_crlf = True  # the 354 reply counts as a line start

    def _fail(self, err: DataError) -> None:
        if self.error is None:
            self.error = err

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return content to store (empty once an error is set)."""
        buf = self._pending + chunk
        last = buf.rfind(b"\n")
        if last < 0:
            self._pending = buf
            if len(buf) > self.max_line:
                self._fail(DataError.LINE_TOO_LONG)
                self._pending = buf[-1:]  # only a trailing CR could still matter
            self._count(len(chunk))
            return b""
        block, self._pending = buf[: last + 1], buf[last + 1 :]
        out: list[bytes] = []
        consumed = 0
        for line in block.split(b"\n")[:-1]:
            consumed += len(line) + 1
            crlf = line.endswith(b"\r")
            body = line[:-1] if crlf else line
            if crlf and self._prev_crlf and body == b".":
                self.done = True
                self.rest = block[consumed:] + self._pending
                self._pending = b""
                break
            self._prev_crlf = crlf
            if not crlf or b"\r" in body:
                if self.reject_bare:
                    self._fail(DataError.BARE_NEWLINE)
                    continue
                parts = body.split(b"\r")
            else:
                parts = [body]
            for part in parts:
                if part.startswith(b"."):
                    part = part[1:]
                if len(part) + 2 > self.max_line:
                    self._fail(DataError.LINE_TOO_LONG)
                out.append(part)
        # the size as received: content octets, without the final ".\r\n"
        received = len(chunk) - (len(self.rest) + 3 if self.done else 0)
        self._count(received)
        if self.error is not None or not out:
            return b""
        return b"\r\n".join(out) + b"\r\n"

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.max_size:
            self._fail(DataError.TOO_BIG)
