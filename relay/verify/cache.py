"""The verification cache: each probe's answer, kept as Postfix's verify(8) keeps it.

A positive answer is used for 31 days and asked again (in the background) after 7;
a negative one is used for 3 days and asked again after 3 hours
(address_verify_positive_expire_time, _refresh_time and their negative twins).
Transient answers (4xx, no answer) are not kept. The file (docs/spool.md) is
the spool's `verify.cache`: appended per answer, compacted at start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from relay.log import oplog

DAY = 86_400.0
POSITIVE_EXPIRE = 31 * DAY
POSITIVE_REFRESH = 7 * DAY
NEGATIVE_EXPIRE = 3 * DAY
NEGATIVE_REFRESH = 3 * 3600.0

Key = tuple[str, str]  # (provider, address lowercased)


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool  # the provider took the address (2xx); else refused it (5xx at RCPT)
    reply: str
    at: float  # epoch seconds of the probe

    def expired(self, now: float) -> bool:
        return now - self.at >= (POSITIVE_EXPIRE if self.ok else NEGATIVE_EXPIRE)

    def stale(self, now: float) -> bool:
        """Due to be asked again (meanwhile it still answers)."""
        return now - self.at >= (POSITIVE_REFRESH if self.ok else NEGATIVE_REFRESH)


class VerifyCache:
    """Answers by (provider, address); survives a restart through `path`."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[Key, Answer] = {}
        self._fh: TextIO | None = None

    def get(self, key: Key, now: float) -> Answer | None:
        answer = self.answers.get(key)
        if answer is not None and answer.expired(now):
            del self.answers[key]
            return None
        return answer

    def put(self, key: Key, answer: Answer) -> None:
        self.answers[key] = answer
        try:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._fh.write(_line(key, answer))
            self._fh.flush()
        except OSError as exc:  # a cache: the answer is still used, only not kept
            oplog.warning("verification cache not written", path=str(self.path), error=str(exc))

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def load(self, now: float) -> None:
        """Read the answers kept (once the spool is ours), drop the expired, compact."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            oplog.warning("verification cache not read", path=str(self.path), error=str(exc))
            return
        for raw in text.splitlines():
            try:
                line = json.loads(raw)
                key = (str(line["p"]), str(line["a"]))
                answer = Answer(bool(line["ok"]), str(line["r"]), float(line["t"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line, or not ours
            if not answer.expired(now):
                self.answers[key] = answer
        self._compact()

    def _compact(self) -> None:
        """The live answers into a fresh file, put in place by a rename."""
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(_line(key, a) for key, a in self.answers.items())
            os.replace(tmp, self.path)
        except OSError as exc:
            oplog.warning("verification cache not compacted", path=str(self.path), error=str(exc))


def _line(key: Key, a: Answer) -> str:
    return json.dumps({"p": key[0], "a": key[1], "ok": a.ok, "r": a.reply, "t": a.at}) + "\n"
