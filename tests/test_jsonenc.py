"""relay.jsonenc writes what the standard library's compact encoder wrote, byte for byte."""

from __future__ import annotations

import dataclasses
import datetime
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import jsonenc

COMPACT = json.JSONEncoder(separators=(",", ":"))
LINE = json.JSONEncoder(separators=(",", ":"), default=str)

# floats as the spool and log hold them (epochs, durations); outside [1e-4, 1e16)
# orjson writes exponents its own way (1e-05 as 0.00001), which reads back the same
floats = st.floats(min_value=1e-4, max_value=1e15, allow_nan=False) | st.just(0.0)
scalars = st.none() | st.booleans() | st.integers(-(2**80), 2**80) | floats | st.text()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_records_are_the_standard_librarys_bytes(value: object) -> None:
    # st.text() includes non-ASCII and lone surrogates; integers beyond 64 bits
    assert jsonenc.record(value) == COMPACT.encode(value).encode()


@given(values)
def test_log_lines_are_the_standard_librarys_bytes(value: object) -> None:
    assert jsonenc.line(value) == LINE.encode(value).encode()


@dataclasses.dataclass
class Point:
    x: int


def test_log_values_of_other_types_are_their_str() -> None:
    when = datetime.datetime(2026, 12, 3, 6, 0, tzinfo=datetime.UTC)
    fields = {"at": when, "p": Point(1), 7: "seven", "sender": "s\u00e9nder@example.org"}
    assert jsonenc.line(fields) == LINE.encode(fields).encode()
    assert json.loads(jsonenc.line(fields)) == {
        "at": "2026-12-03 06:00:00+00:00",
        "p": "Point(x=1)",
        "7": "seven",
        "sender": "s\u00e9nder@example.org",
    }


def test_a_record_of_another_type_is_refused() -> None:
    with pytest.raises(TypeError):
        jsonenc.record({"at": object()})


def test_small_floats_read_back_the_same() -> None:
    for value in (1e-05, 3.8409980565845195e-07, 1e16, 1.5e300):
        assert json.loads(jsonenc.record([value])) == [value]


def test_every_ascii_character_is_escaped_as_before() -> None:
    text = "".join(map(chr, range(128)))
    assert jsonenc.record({"t": text}) == COMPACT.encode({"t": text}).encode()
