"""A spooled message's content, read back in chunks for streaming to a provider."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, cast

CHUNK = 256 * 1024  # content read from the spool and written to the provider at a time


class ContentError(Exception):
    """The spool could not give the content back: our fault, never the provider's."""


class Content:
    """A message's content as the spool holds it: CRLF lines, not dot-stuffed.

    `open` opens the spool file and reads the first chunk in one thread hop
    (for most messages, all of it); later chunks are read by position in a
    thread, so the event loop never waits on the disk and a transaction
    retried at once simply reads from the start again. Close it after use.
    """

    def __init__(
        self, length: int, head: bytes, fh: BinaryIO | None = None, start: int = 0,
        prefix: bytes = b"", plain: bool = False,
    ):  # fmt: skip
        self.length = len(prefix) + length
        # known to have no line beginning with "." (the ingress saw none): sent
        # without a dot-stuffing pass (80 µs per 100 KiB, per copy)
        self.plain = plain
        self._head = prefix + head  # the first chunk (without a file: the whole content)
        self._fh = fh
        # file position of content offset len(self._head): header fields put above the
        # spooled content (relay/records.py Envelope.prepend) shift every later read
        self._start = start - len(prefix)
        self._eight_bit: tuple[bool, bool] | None = None

    @classmethod
    def from_bytes(cls, data: bytes, prefix: bytes = b"", plain: bool = False) -> Content:
        return cls(len(data), data, prefix=prefix, plain=plain)

    @classmethod
    async def open(
        cls, opener: Callable[[], tuple[BinaryIO, int]], inline: bool = False,
        prefix: bytes = b"",
    ) -> Content:  # fmt: skip
        """`opener()` gives (file positioned at the content, its length), as
        `partial(spool.open_content, queue_id)` does. `inline`: open and read on
        the event loop, for a message known to be small (a page-cache read of a
        few KiB costs less than a thread hop). `prefix`: header fields sent above
        the spooled content (our Authentication-Results, an ARC set)."""

        def _open() -> Content:
            fh, length = opener()
            try:
                start = fh.tell()
                head = _pread(fh, min(length, CHUNK), start)
            except BaseException:
                fh.close()
                raise
            if length <= CHUNK:  # all of it read: the file is not needed any more
                fh.close()
                return cls(length, head, prefix=prefix)
            return cls(length, head, fh, start, prefix)

        return _open() if inline else await asyncio.to_thread(_open)

    async def read(self, offset: int) -> bytes:
        """The next at most `CHUNK` bytes from `offset` (0 ≤ offset < length)."""
        if self._fh is None:
            return self._head[offset : offset + CHUNK]
        if offset == 0:
            return self._head
        return await asyncio.to_thread(
            _pread, self._fh, min(CHUNK, self.length - offset), self._start + offset
        )

    async def eight_bit(self) -> tuple[bool, bool]:
        """(the header section, the body) hold an octet above 127: read once, a
        chunk at a time in a thread for a spooled file, so a large message is
        never in memory whole."""
        if self._eight_bit is None:
            if self._fh is None:
                self._eight_bit = _scan([self._head])
            else:
                self._eight_bit = await asyncio.to_thread(_scan, self._chunks())
        return self._eight_bit

    def _chunks(self) -> Iterator[bytes]:
        fh = cast(BinaryIO, self._fh)
        yield self._head
        for offset in range(len(self._head), self.length, CHUNK):
            yield _pread(fh, min(CHUNK, self.length - offset), self._start + offset)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _scan(chunks: Iterable[bytes]) -> tuple[bool, bool]:
    """Whether the header section and the body (after the first empty line) hold
    8-bit octets; the spool holds CRLF lines, so the header ends at CRLF CRLF."""
    header_8bit = body_8bit = False
    in_header, tail = True, b"\r\n"  # an empty first line: no header at all
    for chunk in chunks:
        if in_header:
            end = (tail + chunk).find(b"\r\n\r\n")
            if end < 0:
                header_8bit = header_8bit or not chunk.isascii()
                tail = (tail + chunk)[-3:]
                continue
            split = max(0, end + 4 - len(tail))
            header_8bit = header_8bit or not chunk[:split].isascii()
            chunk, in_header = chunk[split:], False
        body_8bit = body_8bit or not chunk.isascii()
        if body_8bit:
            break
    return header_8bit, body_8bit


def _pread(fh: BinaryIO, size: int, position: int) -> bytes:
    """Exactly `size` bytes at `position` (no shared file offset: safe to repeat)."""
    try:
        data = os.pread(fh.fileno(), size, position)
        while len(data) < size:
            more = os.pread(fh.fileno(), size - len(data), position + len(data))
            if not more:
                raise ContentError(f"content truncated at {position + len(data)}")
            data += more
    except OSError as exc:
        raise ContentError(str(exc)) from exc
    return data
