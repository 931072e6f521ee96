"""Compact JSON for the spool's records and the delivery log, written on every message.

orjson encodes an envelope in about 1 µs where the standard library's encoder
takes 10 (docs/performance.md). What orjson refuses (a lone surrogate from
undecodable client text, an integer beyond 64 bits) is encoded by the standard
library instead, so no input the old encoder took is refused now; so is
anything with a non-ASCII character or DEL, which orjson would write as UTF-8 where
the files have always held `\\u` escapes (orjson has no ASCII option). The
output is then the standard library's byte for byte, but for floats under 1e-4
or from 1e16 (`0.00001` for `1e-05`), which read back the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

_RECORD = json.JSONEncoder(separators=(",", ":"))
_LINE = json.JSONEncoder(separators=(",", ":"), default=str)
# the log's values that are not JSON types are written as str(value), as json's
# default=str did: dataclasses and datetimes too (orjson would encode them itself)
_LINE_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
)


def record(obj: Any) -> bytes:
    """A spool record: JSON types only (anything else is a TypeError, a bug)."""
    return _dumps(obj, None, None, _RECORD)


def line(obj: Any) -> bytes:
    """A log line's JSON (no newline): a value of another type is written as its str()."""
    return _dumps(obj, str, _LINE_OPTIONS, _LINE)


def _dumps(
    obj: Any, default: Callable[[Any], Any] | None, option: int | None, slow: json.JSONEncoder
) -> bytes:
    try:
        out = orjson.dumps(obj, default, option)
    except orjson.JSONEncodeError:  # the standard library takes it, or raises its TypeError
        return slow.encode(obj).encode()
    # json escapes DEL as well as every non-ASCII character
    return out if out.isascii() and b"\x7f" not in out else slow.encode(obj).encode()
