"""The inputs of a report: which log files, in what order, how opened; the time window.

Rotated files of one log are read oldest first (base.jsonl.2.gz, .1, then
base.jsonl) so that messages close early and memory stays low; gzip is detected
by its magic bytes, not the name. Filter bounds and event timestamps are aware
UTC datetimes (docs/report.md, "Filters").
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, BinaryIO, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relay.report.model import ReportError

# --------------------------------------------------------------------------- time bounds


def parse_bound(value: str | datetime | date, *, end: bool = False) -> datetime:
    """A filter bound as an aware UTC datetime.

    RFC 3339 (`Z` or an offset; no offset means UTC) or a plain date. A plain
    date means that day's midnight UTC for `--since`, and for `--until` (`end`)
    the end of that day, i.e. the next midnight (until is always exclusive).
    """
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, date):
        d = value + timedelta(days=1) if end else value
        return datetime.combine(d, time(), UTC)
    else:
        text = value.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            try:
                return parse_bound(date.fromisoformat(text), end=end)
            except ValueError:
                raise ValueError(f"{value!r} is not a valid date") from None
        try:
            t = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
        except ValueError:
            raise ValueError(f"{value!r} is not RFC 3339 or a date") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def parse_ts(ts: str) -> datetime | None:
    """An event's `ts` as an aware datetime (UTC if it has no offset); None if invalid."""
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def check_tz(name: str) -> tzinfo:
    """The zone `--tz` names (IANA, e.g. Europe/Paris, or UTC); ReportError if unknown."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(
            f"--tz: unknown time zone {name!r} (an IANA name, e.g. Europe/Paris)"
        ) from None


# --------------------------------------------------------------------------- input files


def _rotation_key(path: str) -> tuple[str, int]:
    """Oldest first within a rotation set: base.jsonl.3.gz, .2, .1, then base.jsonl."""
    name = path[:-3] if path.endswith(".gz") else path
    m = re.fullmatch(r"(.*)\.(\d+)", name)
    if m:
        return (m.group(1), -int(m.group(2)))
    return (name, 0)


def order_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Distinct paths, rotated files of one log oldest first (keeps memory low)."""
    seen: set[str] = set()
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        real = os.path.realpath(s)
        if real not in seen:
            seen.add(real)
            out.append(s)
    return sorted(out, key=_rotation_key)


def check_inputs(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Raise ReportError `PATH: file not found` (etc.) for an unusable input."""
    for p in paths:
        s = os.fspath(p)
        if not os.path.exists(s):
            raise ReportError(f"{s}: file not found")
        if os.path.isdir(s):
            raise ReportError(f"{s}: is a directory")
        if not os.access(s, os.R_OK):
            raise ReportError(f"{s}: permission denied")


def open_log(path: str) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def read_events(paths: Iterable[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Every event of the logs, rotated files oldest first; unparsable lines skipped
    (for readers that do not count them: the report's own readers do)."""
    for path in order_inputs(paths):
        with open_log(path) as fh:
            for raw in fh:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    yield ev


class LineCounts(Protocol):
    """What a log reader counts: the delivery report's InputStats, placement's report."""

    files: list[str]
    lines: int
    corrupt_lines: int
    errors: list[str]


def read_counted(path: str, counts: LineCounts, handle: Callable[[dict[str, Any]], bool]) -> None:
    """Feed every JSON object line of one log to `handle`, counting lines, corrupt lines
    (unparsable, not an object, or refused by `handle`) and unreadable files, the way
    every report section counts its inputs."""
    counts.files.append(path)
    loads = json.JSONDecoder().decode
    try:
        with open_log(path) as f:
            for raw in f:
                counts.lines += 1
                try:
                    ev = loads(raw.decode())
                except ValueError:  # also UnicodeDecodeError
                    if raw.strip():
                        counts.corrupt_lines += 1
                    continue
                if type(ev) is not dict or not handle(ev):
                    counts.corrupt_lines += 1
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        counts.corrupt_lines += 1
        counts.errors.append(f"{path}: truncated or corrupt gzip data ({exc})")
    except OSError as exc:
        counts.errors.append(f"{path}: {exc.strerror or exc}")
