"""Following the delivery log like `tail -F`: across rotation, truncation and restarts.

The position is (inode, offset of the next unread line). After a restart the
saved inode is looked for first at the log's own path, then at `<log>.1` (the
file logrotate just renamed), so lines written while the probe was down are
read from where it stopped; a position that is found nowhere starts the
current file from its beginning. Only whole lines are consumed: a line being
written is read once its newline is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from relay.log import oplog

READ_CHUNK = 1 << 20


@dataclass
class Position:
    inode: int = 0
    offset: int = 0


class LogFollower:
    """Reads the events appended to one delivery log since the last call."""

    def __init__(self, path: Path, position: Position | None = None):
        self.path = path
        self.position = position or Position()
        self._fh: BinaryIO | None = None
        self.corrupt_lines = 0

    def _open_at_start(self) -> bool:
        """Open the file the saved position belongs to (or the current log from 0)."""
        saved = self.position
        candidates = [self.path, self.path.with_name(self.path.name + ".1")]
        for path in candidates if saved.inode else ():
            try:
                fh = open(path, "rb")  # noqa: SIM115 - kept open while following
            except OSError:
                continue
            if os.fstat(fh.fileno()).st_ino == saved.inode:
                fh.seek(min(saved.offset, os.fstat(fh.fileno()).st_size))
                self._fh = fh
                return True
            fh.close()
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return False
        if saved.inode:
            oplog.warning("delivery log position not found; reading the log from its start",
                          path=str(self.path))  # fmt: skip
        self.position = Position(os.fstat(self._fh.fileno()).st_ino, 0)
        return True

    def read(self) -> Iterator[dict[str, Any]]:
        """The events of the whole lines appended since the last call, in order."""
        if self._fh is None and not self._open_at_start():
            return
        while True:
            yield from self._drain()
            step = self._next_step()
            if step == "rotated":
                yield from self._drain()  # what the writer added before it reopened
                self._reopen()
            elif step != "truncated":
                return

    def _drain(self) -> Iterator[dict[str, Any]]:
        assert self._fh is not None
        fh = self._fh
        fh.seek(self.position.offset)
        rest = b""
        while True:
            chunk = fh.read(READ_CHUNK)
            if not chunk:
                return
            data = rest + chunk
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            rest = data[end + 1 :]
            for line in data[: end + 1].splitlines():
                ev = self._decode(line)
                if ev is not None:
                    yield ev
            self.position.offset += end + 1

    def _decode(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            ev = json.loads(line)
        except ValueError:
            self.corrupt_lines += 1
            return None
        return ev if isinstance(ev, dict) else None

    def _next_step(self) -> str:
        """After EOF: "rotated" once the writer uses a new file, "truncated", or "" (wait)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return ""  # rotated, the new file not created yet: keep the old one for now
        if st.st_ino != self.position.inode:
            # Switch only once the writer has reopened (the new file has lines): until
            # then its lines still land in the old file.
            return "rotated" if st.st_size > 0 else ""
        if st.st_size < self.position.offset:  # copytruncate
            self.position.offset = 0
            return "truncated"
        return ""

    def _reopen(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        self.position = Position(os.fstat(self._fh.fileno()).st_ino, 0)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
